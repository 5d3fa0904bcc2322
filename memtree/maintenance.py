"""Periodic upkeep the worker runs on its own intervals, exposed as plain functions.

Each is safe to run in every worker process at once: the ``flush_stale`` enqueue is
deduped per 3-hour UTC block, and the requeue skips any key that is active again.
"""

from __future__ import annotations

from memtree.queue import Queue
from memtree.types import DEFAULT_SELF_HEAL_LIMIT, NewJob

__all__ = ["enqueue_flush_stale", "self_heal"]


def enqueue_flush_stale(queue: Queue, max_age_secs: int | None = None) -> str | None:
    """Enqueue the ``flush_stale`` job of the current 3-hour UTC block; None if it exists."""
    return queue.enqueue(NewJob.flush_stale(queue.now_ms(), max_age_secs))


def self_heal(queue: Queue, limit: int = DEFAULT_SELF_HEAL_LIMIT) -> int:
    """Requeue transiently failed jobs self-healed fewer than ``limit`` times; unrecoverable
    ones, and those out of heals, stay parked for an operator."""
    return queue.requeue_transient_failed(limit)
