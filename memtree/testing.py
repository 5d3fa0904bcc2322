"""Helpers for testing an application's jobs: a clock you move, a drain, an assertion.

::

    from memtree.testing import FakeClock, assert_enqueued, drain

    def test_paying_sends_a_receipt(memtree_queue, session):
        pay(session, order_id=42)                      # enqueues inside the app's transaction
        assert_enqueued(session, kind="send_receipt", payload={"order_id": 42})
        assert drain(memtree_queue, handlers) == 1     # runs it, and whatever it enqueues

The ``memtree_queue`` and ``memtree_clock`` fixtures come from memtree's pytest plugin
(:mod:`memtree.pytest_plugin`), installed with the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from memtree import store
from memtree.queue import Queue
from memtree.types import Job, JobStatus
from memtree.worker import Handler, Worker

__all__ = ["ANY", "FakeClock", "assert_enqueued", "drain"]


class _Any:
    def __repr__(self) -> str:
        return "ANY"


#: Matches any value in :func:`assert_enqueued`.
ANY: Any = _Any()


class FakeClock:
    """Epoch milliseconds that move only when told: ``Queue(engine, clock=FakeClock())``."""

    def __init__(self, now_ms: int = 1_767_225_600_000) -> None:  # 2026-01-01T00:00:00Z
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> int:
        self.now_ms += ms
        return self.now_ms

    def set(self, now_ms: int) -> int:
        self.now_ms = now_ms
        return self.now_ms


def drain(
    queue: Queue,
    handlers: Mapping[str, Handler],
    *,
    jump_clock: bool = True,
    concurrency: int = 1,
    max_rounds: int = 10_000,
) -> int:
    """Run jobs until none of the handled kinds is due; returns how many were settled.

    With a :class:`FakeClock` on the queue and ``jump_clock``, the clock jumps to each
    retried, deferred or scheduled job in turn, so backoffs take no time at all. Gates
    are off and one handler runs at a time, so a test sees a deterministic order.
    """
    worker = Worker(queue, handlers, concurrency=concurrency, gates=(), retention_ms=None)
    clock = queue._clock if isinstance(queue._clock, FakeClock) else None
    settled = 0
    for _ in range(max_rounds):
        settled += worker.run_until_idle()
        if clock is None or not jump_clock:
            return settled
        due = queue.next_due_ms(list(handlers))
        if due is None:
            return settled
        clock.set(max(due, clock.now_ms))
    raise AssertionError(f"drain did not finish in {max_rounds} rounds: is a job looping?")


def assert_enqueued(
    target: Queue | Session | Connection | Engine,
    *,
    kind: str = ANY,
    payload: Any = ANY,
    dedupe_key: str | None = ANY,
    status: JobStatus | str = JobStatus.READY,
) -> list[Job]:
    """Assert that a job matching every given field exists (``ready`` by default).

    Works on a ``Queue``, an ``Engine``, or the caller's ``Session``/``Connection``, so
    it sees jobs enqueued in a transaction that has not committed yet. Returns the
    matching jobs; the assertion message lists the jobs there are.
    """
    wanted = JobStatus(status)
    kind_filter = None if kind is ANY else kind
    if isinstance(target, Queue):
        found = target.list_jobs(status=wanted, kind=kind_filter, limit=1000)
    elif isinstance(target, Engine):
        with target.connect() as conn:
            found = store.list_jobs(conn, status=wanted, kind=kind_filter, limit=1000)
    else:
        found = store.list_jobs(target, status=wanted, kind=kind_filter, limit=1000)
    matches = [
        job
        for job in found
        if (payload is ANY or job.payload == payload)
        and (dedupe_key is ANY or job.dedupe_key == dedupe_key)
    ]
    if not matches:
        seen = "\n".join(
            f"  {job.kind} {job.payload_json} dedupe_key={job.dedupe_key!r}" for job in found[:20]
        )
        scope = " of that kind" if kind_filter else ""
        raise AssertionError(
            f"no {wanted.value} job with kind={kind!r} payload={payload!r} "
            f"dedupe_key={dedupe_key!r}; {wanted.value} jobs{scope}:\n{seen or '  (none)'}"
        )
    return matches
