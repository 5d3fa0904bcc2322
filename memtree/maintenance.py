"""Upkeep of a queue: recovery, self-heal, pruning, purging, releasing, the periodic enqueue.

The plain functions are what an operator's command runs once (``memtree recover``,
``memtree jobs prune``, ...); :class:`Upkeep` is the schedule a worker's loop runs them
on, each at its own interval. Each function is safe to run in every worker process at
once: recovery and release are fenced to expired or own leases, the self-heal requeue
skips any key that is active again, and pruning deletes in bounded chunks. Nothing here
builds a statement (the SQL is in :mod:`memtree.settle` and :mod:`memtree.store`),
sleeps, or catches a database error: whoever runs the schedule decides how to survive one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from memtree.config import positive_int, seconds
from memtree.errors import ConfigurationError
from memtree.queue import Queue
from memtree.types import DEFAULT_SELF_HEAL_LIMIT, Job, JobStatus

if TYPE_CHECKING:
    from memtree.metrics import Metrics

__all__ = [
    "PRUNE_CHUNK_ROWS",
    "PRUNE_MAX_CHUNKS",
    "Upkeep",
    "prune",
    "purge_retired",
    "recover",
    "release",
    "retry_failed",
    "self_heal",
]

log = logging.getLogger("memtree.maintenance")

#: Rows one prune statement deletes at most.
PRUNE_CHUNK_ROWS = 10_000
#: Statements one scheduled prune runs at most (a million rows); the next pass goes on.
PRUNE_MAX_CHUNKS = 100


def recover(queue: Queue) -> int:
    """Return running jobs whose lease expired to ready; how many."""
    return queue.recover_stale_locks()


def self_heal(queue: Queue, limit: int = DEFAULT_SELF_HEAL_LIMIT) -> int:
    """Requeue transiently failed jobs self-healed fewer than ``limit`` times; unrecoverable
    ones, and those out of heals, stay parked for an operator."""
    return queue.requeue_transient_failed(limit)


def retry_failed(queue: Queue, *, transient_only: bool = False) -> int:
    """An operator's retry, not a self-heal: every failed job (or every one not failed
    unrecoverable) gets a fresh budget, without a limit, and its heal count starts over."""
    return queue.requeue_transient_failed(None) if transient_only else queue.requeue_failed()


def prune(
    queue: Queue,
    completed_before_ms: int,
    status: JobStatus | str = JobStatus.DONE,
    *,
    chunk_rows: int = PRUNE_CHUNK_ROWS,
    max_chunks: int | None = PRUNE_MAX_CHUNKS,
    on_chunk: Callable[[int], object] | None = None,
) -> int:
    """Delete finished jobs of ``status`` completed before the cutoff, ``chunk_rows`` per
    statement (each its own transaction), until a chunk comes back short or ``max_chunks``
    ran (``None``: no limit). ``on_chunk`` hears the running total after each chunk."""
    if max_chunks is not None:
        positive_int("max_chunks", max_chunks)
    total = 0
    chunks = 0
    while max_chunks is None or chunks < max_chunks:
        pruned = queue.prune(status, completed_before_ms, limit=chunk_rows)
        total += pruned
        chunks += 1
        if on_chunk is not None:
            on_chunk(total)
        if pruned < chunk_rows:
            break
    return total


def purge_retired(queue: Queue) -> int:
    """Delete every job of a retired kind (workers do it when they start)."""
    return queue.purge_retired_jobs()


def release(queue: Queue, held: Sequence[Job]) -> int:
    """Give back the running leases in ``held`` (a stopping worker's own): ready again now."""
    return queue.release_running_locks(held)


#: How a schedule runs one task: ``guarded(task, name)`` returns the task's result, or
#: None when it failed and the runner dealt with it (logged it, backed off).
Guard = Callable[[Callable[[], Any], str], Any]


class Upkeep:
    """The upkeep schedule of one worker, on the monotonic clock its loop reads.

    Each turn the loop calls :meth:`run_due`; every task whose interval has passed since
    it last ran (every task, the first time) runs once, in the order recover, self-heal,
    the ``periodic`` tasks of the application (``(name, interval_s, task)``, each task
    called with the queue, and a worker's :class:`~memtree.Schedule` ticks), prune (only with
    ``retention_ms``: done rows completed longer ago, at most :data:`PRUNE_MAX_CHUNKS`
    chunks a pass). :meth:`next_due` tells an idle loop how long it may sleep.
    """

    def __init__(
        self,
        queue: Queue,
        *,
        recover_interval_s: float,
        self_heal_interval_s: float,
        prune_interval_s: float,
        periodic: Iterable[tuple[str, float, Callable[[Queue], object]]] = (),
        self_heal_limit: int = DEFAULT_SELF_HEAL_LIMIT,
        retention_ms: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        limit = positive_int("self_heal_limit", self_heal_limit, allow_zero=True)
        prune_s = seconds("prune_interval_s", prune_interval_s)
        self._tasks: dict[str, tuple[float, Callable[[], object]]] = {
            "recover": (seconds("recover_interval_s", recover_interval_s), self._recover),
            "self_heal": (
                seconds("self_heal_interval_s", self_heal_interval_s),
                lambda: self_heal(queue, limit),
            ),
        }
        for name, interval_s, task in periodic:
            if name in self._tasks or name == "prune":
                raise ConfigurationError(f"two upkeep tasks are named {name!r}")
            self._tasks[name] = (seconds(f"{name} interval", interval_s), partial(task, queue))
        if retention_ms is not None:
            retention = positive_int("retention_ms", retention_ms)
            self._tasks["prune"] = (prune_s, lambda: prune(queue, queue.now_ms() - retention))
        self.queue = queue
        self.metrics = metrics
        self._due: dict[str, float] = {}

    def run_due(self, now: float, guarded: Guard) -> None:
        """Run every task due at ``now`` (monotonic seconds) through ``guarded``; log what
        moved jobs. A task that failed is not tried again before its next interval."""
        for name, (interval_s, task) in self._tasks.items():
            if now < self._due.get(name, 0.0):
                continue
            self._due[name] = now + interval_s
            result = guarded(task, name)
            if isinstance(result, int) and result:
                log.info("maintenance %s: %d jobs", name, result)

    def next_due(self) -> float | None:
        """When (monotonic seconds) the next task is due; None before the first turn."""
        return min(self._due.values(), default=None)

    def _recover(self) -> int:
        recovered = recover(self.queue)
        if recovered and self.metrics is not None:
            self.metrics.recovered.inc(recovered)
        return recovered
