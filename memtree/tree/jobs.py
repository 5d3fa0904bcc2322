"""Constructors of the memory tree's jobs: one function per kind, returning a
:class:`memtree.NewJob`.

The payload shapes and dedupe keys are the original crate's, byte for byte, so Rust and
Python producers dedupe together.
"""

from __future__ import annotations

from memtree.tree.kinds import JobKind
from memtree.tree.payloads import (
    AppendBufferPayload,
    AppendTarget,
    ExtractChunkPayload,
    FlushStalePayload,
    NodeRef,
    ReembedBackfillPayload,
    SealDocumentPayload,
    SealPayload,
)
from memtree.types import NewJob, Payload

__all__ = [
    "append_buffer",
    "extract_chunk",
    "flush_stale",
    "reembed_backfill",
    "seal",
    "seal_document",
]


def _of(kind: JobKind, payload: Payload, max_attempts: int | None = None) -> NewJob:
    return NewJob(kind, payload, dedupe_key=payload.dedupe_key(), max_attempts=max_attempts)


def extract_chunk(chunk_id: str) -> NewJob:
    return _of(JobKind.EXTRACT_CHUNK, ExtractChunkPayload(chunk_id))


def append_buffer(node: NodeRef, target: AppendTarget) -> NewJob:
    return _of(JobKind.APPEND_BUFFER, AppendBufferPayload(node, target))


def seal(tree_id: str, level: int, force_now_ms: int | None = None) -> NewJob:
    return _of(JobKind.SEAL, SealPayload(tree_id, level, force_now_ms))


def flush_stale(now_ms: int, max_age_secs: int | None = None) -> NewJob:
    """A ``flush_stale`` job deduped to the UTC date and 3-hour block of ``now_ms``."""
    payload = FlushStalePayload(max_age_secs)
    return NewJob(JobKind.FLUSH_STALE, payload, dedupe_key=payload.dedupe_key_at(now_ms))


def reembed_backfill(signature: str) -> NewJob:
    return _of(JobKind.REEMBED_BACKFILL, ReembedBackfillPayload(signature), max_attempts=3)


def seal_document(
    tree_scope: str,
    doc_id: str,
    chunk_ids: list[str] | tuple[str, ...],
    version_ms: int | None = None,
) -> NewJob:
    payload = SealDocumentPayload(tree_scope, doc_id, version_ms, tuple(chunk_ids))
    return _of(JobKind.SEAL_DOCUMENT, payload)
