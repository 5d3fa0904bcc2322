"""Periodic upkeep the worker runs on its own intervals, exposed as plain functions.

Each is safe to run in every worker process at once: the requeue skips any key that is
active again. (The memory tree's ``flush_stale`` enqueue is
:func:`memtree.tree.enqueue_flush_stale`.)
"""

from __future__ import annotations

from memtree.queue import Queue
from memtree.types import DEFAULT_SELF_HEAL_LIMIT

__all__ = ["self_heal"]


def self_heal(queue: Queue, limit: int = DEFAULT_SELF_HEAL_LIMIT) -> int:
    """Requeue transiently failed jobs self-healed fewer than ``limit`` times; unrecoverable
    ones, and those out of heals, stay parked for an operator."""
    return queue.requeue_transient_failed(limit)
