"""The memory tree's queue and worker, configured as the original crate runs them.

:func:`queue` is a :class:`memtree.Queue` with the tree's claim order and retired kinds;
:func:`worker` is a :class:`memtree.Worker` with the ``llm`` gate and, when it handles
``flush_stale``, the periodic ``flush_stale`` enqueue. Both take every other setting of
the class they build, and may override the tree's own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import URL, Engine

from memtree.config import seconds
from memtree.queue import Queue
from memtree.tree import jobs
from memtree.tree.kinds import CLAIM_ORDER, RETIRED_KINDS, JobKind
from memtree.worker import AsyncHandler, Gate, Handler, Worker

__all__ = [
    "FLUSH_STALE_INTERVAL_S",
    "GATES",
    "LLM_GATE",
    "enqueue_flush_stale",
    "queue",
    "worker",
]

#: The original's LLM gate: one LLM-bound job at a time per worker.
LLM_GATE = Gate(
    "llm",
    1,
    (JobKind.EXTRACT_CHUNK, JobKind.SEAL, JobKind.REEMBED_BACKFILL, JobKind.SEAL_DOCUMENT),
)
#: The gates of a tree worker.
GATES: tuple[Gate, ...] = (LLM_GATE,)
#: How often a tree worker that handles ``flush_stale`` enqueues the current block's job.
FLUSH_STALE_INTERVAL_S = 60.0


def enqueue_flush_stale(queue: Queue, max_age_secs: int | None = None) -> str | None:
    """Enqueue the ``flush_stale`` job of the current 3-hour UTC block; None if it exists.

    Safe in every worker process at once: the job is deduped per block."""
    return queue.enqueue(jobs.flush_stale(queue.now_ms(), max_age_secs))


def queue(bind: Engine | str | URL, **settings: Any) -> Queue:
    """A :class:`memtree.Queue` with the tree's claim order and retired kinds."""
    settings.setdefault("claim_order", CLAIM_ORDER)
    settings.setdefault("retired_kinds", RETIRED_KINDS)
    return Queue(bind, **settings)


def worker(
    queue: Queue,
    handlers: Mapping[str, Handler | AsyncHandler],
    *,
    flush_stale_interval_s: float = FLUSH_STALE_INTERVAL_S,
    **settings: Any,
) -> Worker:
    """A :class:`memtree.Worker` with the ``llm`` gate, enqueueing ``flush_stale`` every
    ``flush_stale_interval_s`` when ``handlers`` handle it."""
    interval_s = seconds("flush_stale_interval_s", flush_stale_interval_s)
    upkeep: list[tuple[str, float, Callable[[Queue], object]]] = list(settings.pop("upkeep", ()))
    if JobKind.FLUSH_STALE in handlers:
        upkeep.append((JobKind.FLUSH_STALE.value, interval_s, enqueue_flush_stale))
    settings.setdefault("gates", GATES)
    return Worker(queue, handlers, upkeep=upkeep, **settings)
