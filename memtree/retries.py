"""Trying memtree's own transactions again when the database chose them to roll back.

InnoDB (and PostgreSQL, more rarely) resolves a deadlock by rolling one transaction
back. When that transaction is memtree's own (a :class:`memtree.Queue` method's), it
did nothing yet that anyone saw, so it is run again, a few times, after a short random
pause. A transaction of the caller's (a free function on the application's session) is
never retried here: only the caller can run its own work again.

    @retried_on_deadlock
    def mark_done(self, job): ...  # one transaction of its own, run again whole

    for attempt in deadlock_retries():
        with attempt, queue.transaction() as conn:
            ...
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import ParamSpec, TypeVar

from memtree.dberrors import FaultKind
from memtree.errors import DatabaseError

__all__ = ["DEADLOCK_TRIES", "MAX_PAUSE_S", "Attempt", "deadlock_retries", "retried_on_deadlock"]

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger("memtree.retries")

#: How many times a transaction runs before its deadlock reaches the caller.
DEADLOCK_TRIES = 10
#: The longest pause between two runs (the pauses double from 5 ms, at random below that).
MAX_PAUSE_S = 0.25


class Attempt:
    """One run of a transaction: swallows a deadlock it may try again after."""

    __slots__ = ("last", "succeeded")

    def __init__(self, last: bool) -> None:
        self.last = last
        self.succeeded = False

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            self.succeeded = True
            return False
        if self.last or not _deadlocked(exc):
            return False
        log.info("memtree's transaction was a deadlock victim; running it again: %s", exc)
        return True


def _deadlocked(exc: BaseException) -> bool:
    return (
        isinstance(exc, DatabaseError)
        and exc.fault is not None
        and exc.fault.kind is FaultKind.DEADLOCK
    )


def deadlock_retries(tries: int | None = None) -> Iterator[Attempt]:
    """Attempts until one succeeds, or the last one's error goes to the caller (after
    :data:`DEADLOCK_TRIES` of them unless ``tries`` says otherwise). The pauses between
    them are random and grow, up to :data:`MAX_PAUSE_S`, so the transactions that
    deadlocked do not meet again in the same order."""
    tries = DEADLOCK_TRIES if tries is None else tries
    for number in range(tries):
        attempt = Attempt(last=number == tries - 1)
        yield attempt
        if attempt.succeeded:
            return
        time.sleep(random.uniform(0.0, min(MAX_PAUSE_S, 0.005 * 2**number)))


def retried_on_deadlock(work: Callable[P, T]) -> Callable[P, T]:
    """``work`` run again, whole, when a deadlock rolled its transaction back. Only for a
    function whose every transaction is its own, and which a rolled-back run leaves as if
    it never ran."""

    @functools.wraps(work)
    def retried(*args: P.args, **kwargs: P.kwargs) -> T:
        for attempt in deadlock_retries():
            with attempt:
                return work(*args, **kwargs)
        raise AssertionError("unreachable: the last attempt returns or raises")

    return retried
