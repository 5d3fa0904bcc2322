"""The memory tree's kinds: their wire strings, the order they are claimed in, and the
kinds the original crate retired.

Values only; the queue settings made of them are applied by :mod:`memtree.tree.app`.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["CLAIM_ORDER", "RETIRED_KINDS", "JobKind", "is_retired_kind"]


class JobKind(StrEnum):
    """The memory tree's own kinds (the ``kind`` column, as the original crate writes it)."""

    EXTRACT_CHUNK = "extract_chunk"
    APPEND_BUFFER = "append_buffer"
    SEAL = "seal"
    FLUSH_STALE = "flush_stale"
    REEMBED_BACKFILL = "reembed_backfill"
    SEAL_DOCUMENT = "seal_document"


#: Kinds claimed before all others, in this order (the original's drain-forward order).
CLAIM_ORDER: tuple[str, ...] = (
    JobKind.SEAL.value,
    JobKind.FLUSH_STALE.value,
    JobKind.APPEND_BUFFER.value,
)
#: Kinds of the original's removed global/topic trees: a tree queue never claims nor
#: enqueues them, and its workers purge rows of them at start (the crate does the same).
RETIRED_KINDS: tuple[str, ...] = ("topic_route", "digest_daily")


def is_retired_kind(kind: str) -> bool:
    """True for the wire strings of the original's retired kinds."""
    return kind in RETIRED_KINDS
