"""The memory tree's queue and worker, configured as the original crate runs them.

:func:`queue` is a :class:`memtree.Queue` with the tree's claim order and retired kinds;
:func:`worker` is a :class:`memtree.Worker` with the ``llm`` gate and, when it handles
``flush_stale``, the :data:`FLUSH_STALE_SCHEDULE`. Both take every other setting of the
class they build, and may override the tree's own.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from sqlalchemy import URL, Engine

from memtree.config import seconds
from memtree.queue import Queue
from memtree.schedule import Schedule
from memtree.tree import jobs
from memtree.tree.kinds import CLAIM_ORDER, RETIRED_KINDS, JobKind
from memtree.worker import AsyncHandler, Gate, Handler, Worker

__all__ = [
    "FLUSH_STALE_SCHEDULE",
    "GATES",
    "LLM_GATE",
    "enqueue_flush_stale",
    "queue",
    "worker",
]

#: The original's LLM gate: one LLM-bound job at a time. The original ran one worker
#: process; memtree's run as many as a deployment needs, so the gate is global: one LLM
#: call at a time across every worker on the database, the budget it exists to protect.
#: ``Gate(..., scope="process")`` in ``gates=`` gives back the per-process gate.
LLM_GATE = Gate(
    "llm",
    1,
    (JobKind.EXTRACT_CHUNK, JobKind.SEAL, JobKind.REEMBED_BACKFILL, JobKind.SEAL_DOCUMENT),
    scope="global",
)
#: The gates of a tree worker.
GATES: tuple[Gate, ...] = (LLM_GATE,)
#: ``flush_stale`` once per 3-hour UTC block, at its start. The job keeps the crate's
#: dedupe key (``flush_stale:<date>-h<block>``), so a Rust and a Python worker on one table
#: dedupe each other's block while it is active; the schedule's row fences the block for
#: every Python worker even once its job is done. A block no worker saw start (none ran)
#: is flushed once, late, when one starts.
FLUSH_STALE_SCHEDULE = Schedule(
    JobKind.FLUSH_STALE.value,
    JobKind.FLUSH_STALE.value,
    cron="0 */3 * * *",
    job=jobs.flush_stale,
    missed="run_once",
)
#: Deprecated, and unused: how often a tree worker enqueued ``flush_stale`` before it was
#: the :data:`FLUSH_STALE_SCHEDULE`.
_FLUSH_STALE_INTERVAL_S = 60.0


def __getattr__(name: str) -> Any:
    if name == "FLUSH_STALE_INTERVAL_S":
        warnings.warn(
            "FLUSH_STALE_INTERVAL_S is deprecated and unused: flush_stale is "
            "memtree.tree.FLUSH_STALE_SCHEDULE, ticked with the worker's schedules",
            DeprecationWarning,
            stacklevel=2,
        )
        return _FLUSH_STALE_INTERVAL_S
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enqueue_flush_stale(queue: Queue, max_age_secs: int | None = None) -> str | None:
    """Enqueue the ``flush_stale`` job of the current 3-hour UTC block now; None if one is
    active. An operator's or a test's: tree workers run :data:`FLUSH_STALE_SCHEDULE`."""
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
    flush_stale_interval_s: float | None = None,
    **settings: Any,
) -> Worker:
    """A :class:`memtree.Worker` with the ``llm`` gate, and :data:`FLUSH_STALE_SCHEDULE`
    among its ``schedules`` when ``handlers`` handle ``flush_stale`` (unless a schedule of
    that name is given). ``flush_stale_interval_s`` is deprecated and does nothing."""
    if flush_stale_interval_s is not None:
        seconds("flush_stale_interval_s", flush_stale_interval_s)
        warnings.warn(
            "flush_stale_interval_s is deprecated and does nothing: flush_stale is a "
            "schedule now (memtree.tree.FLUSH_STALE_SCHEDULE), ticked every second",
            DeprecationWarning,
            stacklevel=2,
        )
    schedules: list[Schedule] = list(settings.pop("schedules", ()))
    if JobKind.FLUSH_STALE in handlers and all(
        schedule.name != FLUSH_STALE_SCHEDULE.name for schedule in schedules
    ):
        schedules.append(FLUSH_STALE_SCHEDULE)
    settings.setdefault("gates", GATES)
    return Worker(queue, handlers, schedules=schedules, **settings)
