"""The memory tree: the application memtree began as (the TinyCortex crate's job queue),
built on the generic queue, which never imports it.

- :mod:`memtree.tree.kinds`: :class:`JobKind`, :data:`CLAIM_ORDER`, :data:`RETIRED_KINDS`.
- :mod:`memtree.tree.payloads`: the payloads and their dedupe keys, as the crate writes them.
- :mod:`memtree.tree.jobs`: one ``NewJob`` constructor per kind (``jobs.extract_chunk(...)``).
- :mod:`memtree.tree.app`: :func:`queue` and :func:`worker`, a Queue and a Worker configured
  as the original runs them (claim order, retired kinds, the ``llm`` gate, ``flush_stale``).
- :mod:`memtree.tree.demo`: ``memtree demo``.

A program sharing ``mem_tree_jobs`` with the crate builds its queue with :func:`queue`, so
it never claims the kinds the crate retired and purges them as the crate does.
"""

from memtree.tree import app, jobs, payloads
from memtree.tree.app import (
    FLUSH_STALE_SCHEDULE,
    GATES,
    LLM_GATE,
    enqueue_flush_stale,
    queue,
    worker,
)
from memtree.tree.kinds import CLAIM_ORDER, RETIRED_KINDS, JobKind, is_retired_kind


def __getattr__(name: str) -> object:
    if name == "FLUSH_STALE_INTERVAL_S":  # deprecated; app's __getattr__ warns
        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLAIM_ORDER",
    "FLUSH_STALE_SCHEDULE",
    "GATES",
    "LLM_GATE",
    "RETIRED_KINDS",
    "JobKind",
    "enqueue_flush_stale",
    "is_retired_kind",
    "jobs",
    "payloads",
    "queue",
    "worker",
]
