"""Another session's row lock (PostgreSQL): the worker's loop never waits on it.

A host transaction holding ``SELECT ... FOR UPDATE`` on a running job's row used to
stall a worker whose handlers do not use ``ctx.session``: the heartbeat's and the
batched settle's UPDATEs waited on the lock on the loop thread, so nothing else was
claimed or settled until the host let go.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import sqlalchemy
from sqlalchemy import text

from memtree import CancelOutcome, JobStatus, NewJob, Queue, SettledBatch
from memtree.worker import Handlers, JobContext, Worker
from tests.test_worker import Running, wait_for

#: Row locks are PostgreSQL's: the suite's database fixture, on PostgreSQL only.
on_postgresql = pytest.mark.parametrize(
    "db_url", [pytest.param("postgresql", marks=pytest.mark.postgresql)], indirect=True
)

OTHERS = 200
#: How long the host holds its lock.
LOCK_HELD_S = 8.0


@on_postgresql
def test_a_host_row_lock_stalls_neither_claims_nor_settles_of_other_jobs(
    wall_queue: Queue, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Of two running jobs whose rows the host locks, one finishes during the lock (its
    batched done settle meets the lock) and one runs through it (its heartbeats meet the
    lock); 200 other jobs complete meanwhile, and both locked jobs complete once, after
    the host lets go, neither taken for a lost lease."""
    queue = wall_queue
    runs: Counter[str] = Counter()
    runs_lock = threading.Lock()
    running = {"finishes": threading.Event(), "runs_through": threading.Event()}
    lock_taken, lock_released = threading.Event(), threading.Event()

    def record(ctx: JobContext) -> None:
        with runs_lock:
            runs[ctx.job.id] += 1

    handlers = Handlers()

    @handlers.register("locked")
    def locked(ctx: JobContext) -> None:
        record(ctx)
        running[ctx.payload].set()
        lock_taken.wait(30)
        if ctx.payload == "runs_through":
            lock_released.wait(30)

    handlers.register("work")(record)

    targets = queue.enqueue_many([NewJob("locked", name) for name in running])
    worker = Worker(queue, handlers, concurrency=4, gates=(), heartbeat_interval_ms=200)
    host = sqlalchemy.create_engine(db_url)
    done: Callable[[], int] = lambda: queue.count_by_status(JobStatus.DONE)  # noqa: E731
    try:
        with caplog.at_level(logging.WARNING, logger="memtree"), Running(worker):
            for event in running.values():
                assert event.wait(20), "the locked jobs did not start"
            with host.connect() as conn, conn.begin():
                conn.execute(
                    text("SELECT id FROM mem_tree_jobs WHERE id = ANY(:ids) FOR UPDATE"),
                    {"ids": targets},
                )
                lock_taken.set()
                queue.enqueue_many([NewJob("work", i) for i in range(OTHERS)])
                locked_at = time.monotonic()
                wait_for(lambda: done() == OTHERS, timeout=LOCK_HELD_S)
                others_done_s = time.monotonic() - locked_at
                time.sleep(max(LOCK_HELD_S - others_done_s, 0))  # heartbeats meet the lock
                assert done() == OTHERS, "a locked job was settled through the host's lock"
                lock_released.set()
            wait_for(lambda: done() == OTHERS + 2, timeout=20)
    finally:
        host.dispose()
    assert others_done_s < LOCK_HELD_S / 2, f"the others took {others_done_s:.1f}s"
    assert len(runs) == OTHERS + 2 and set(runs.values()) == {1}, "a job ran twice"
    for job_id in targets:
        job = queue.get_job(job_id or "")
        assert job is not None and job.status is JobStatus.DONE and job.attempts == 1
    assert "lease" not in caplog.text, "a locked job was taken for a lost lease"


@on_postgresql
def test_batched_settles_skip_a_row_another_session_locks_and_say_it_is_still_held(
    queue: Queue, db_url: str
) -> None:
    """Without waiting: the locked claim is reported locked (and held, for the heartbeat),
    a stale claim of a locked row is reported neither, and the others settle."""
    queue.enqueue_many([NewJob("a", i) for i in range(3)])
    held, stale_of, free = queue.claim_batch(3)
    assert queue.release_running_locks([stale_of]) == 1
    current = queue.claim_next()
    assert current is not None and current.id == stale_of.id
    host = sqlalchemy.create_engine(db_url)
    try:
        with host.connect() as conn, conn.begin():
            # Should a settle wait after all, the server ends this session and the test fails
            # instead of hanging on a lock its own thread holds.
            conn.execute(text("SET LOCAL idle_in_transaction_session_timeout = '10s'"))
            conn.execute(
                text("SELECT id FROM mem_tree_jobs WHERE id = ANY(:ids) FOR UPDATE"),
                {"ids": [held.id, stale_of.id]},
            )
            before = {job.id: queue.get_job(job.id) for job in (held, stale_of)}
            assert queue.extend_leases([held, stale_of, free]) == {held.id, free.id}
            assert queue.release_running_locks([held, stale_of]) == 0
            outcome, _ = queue.complete_and_claim([(held, []), (stale_of, []), (free, [])], (), 0)
            assert outcome == SettledBatch(frozenset({free.id}), frozenset({held.id}))
            assert {job.id: queue.get_job(job.id) for job in (held, stale_of)} == before
        outcome, _ = queue.complete_and_claim([(held, [])], (), 0)
        assert outcome == SettledBatch(frozenset({held.id}))
    finally:
        host.dispose()


@on_postgresql
def test_a_locked_claim_asked_to_stop_is_retried_not_handed_on_to_wait_for_the_lock(
    queue: Queue, db_url: str
) -> None:
    """A batched done refuses a run asked to stop, and the worker then ends it cancelled in
    a statement of its own: while another session locks the row, the batch reports it
    locked instead, so that statement never meets the lock."""
    queue.enqueue(NewJob("a"))
    job = queue.claim_next()
    assert job is not None and queue.cancel(job.id) is CancelOutcome.REQUESTED
    host = sqlalchemy.create_engine(db_url)
    try:
        with host.connect() as conn, conn.begin():
            conn.execute(text("SET LOCAL idle_in_transaction_session_timeout = '10s'"))
            conn.execute(
                text("SELECT id FROM mem_tree_jobs WHERE id = :id FOR UPDATE"), {"id": job.id}
            )
            outcome, _ = queue.complete_and_claim([(job, [])], (), 0)
            assert outcome == SettledBatch(locked=frozenset({job.id}))
        outcome, _ = queue.complete_and_claim([(job, [])], (), 0)
        assert outcome == SettledBatch()
        assert queue.mark_cancelled(job)
    finally:
        host.dispose()


@on_postgresql
def test_a_worker_stopping_while_a_finished_jobs_row_is_locked_leaves_it_to_recovery(
    wall_queue: Queue, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """It tries to settle the job for its shutdown grace, then says it was not settled;
    the job is not taken for a lost lease, and stays running for recovery."""
    queue = wall_queue
    finished = threading.Event()
    handlers = Handlers()

    @handlers.register("a")
    def a(ctx: JobContext) -> None:
        finished.wait(30)

    (job_id,) = queue.enqueue_many([NewJob("a")])
    worker = Worker(queue, handlers, concurrency=1, gates=(), shutdown_grace_s=1.0)
    host = sqlalchemy.create_engine(db_url)
    try:
        # The worker stops (Running's exit) while the host still holds the lock.
        with (
            caplog.at_level(logging.WARNING, logger="memtree"),
            host.connect() as conn,
            conn.begin(),
            Running(worker),
        ):
            wait_for(lambda: bool(worker.running_jobs))
            conn.execute(text("SET LOCAL idle_in_transaction_session_timeout = '30s'"))
            conn.execute(
                text("SELECT id FROM mem_tree_jobs WHERE id = :id FOR UPDATE"), {"id": job_id}
            )
            finished.set()
            wait_for(lambda: not worker.running_jobs)
            time.sleep(0.3)  # a few settle attempts meet the lock
    finally:
        host.dispose()
    job = queue.get_job(job_id or "")
    assert job is not None and job.status is JobStatus.RUNNING
    assert "1 finished jobs were not settled" in caplog.text
    assert "lease lost" not in caplog.text


@on_postgresql
def test_a_claim_skipped_for_a_lock_released_at_once_is_retried_not_lost(
    queue: Queue, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock a batched settle skipped may be gone a moment later (another worker's claim
    locks a row it then finds running, until its transaction ends): the claim is still
    reported skipped, to be settled again, never taken for a lost lease. The host lets go
    between the settle's UPDATE and its read of what it skipped."""
    from memtree import settle

    queue.enqueue_many([NewJob("a", i) for i in range(2)])
    held, free = queue.claim_batch(2)
    host = sqlalchemy.create_engine(db_url)
    conn = host.connect()
    transaction = conn.begin()
    conn.execute(text("SELECT id FROM mem_tree_jobs WHERE id = :id FOR UPDATE"), {"id": held.id})
    statements = settle._held_statements("postgresql")
    original = settle._skipped_statements

    def release_first(dialect_name: str) -> dict[str, object]:
        transaction.commit()  # the lock is gone before the second read
        return original(dialect_name)

    monkeypatch.setattr(settle, "_skipped_statements", release_first)
    try:
        outcome, _ = queue.complete_and_claim([(held, []), (free, [])], (), 0)
        assert outcome == SettledBatch(frozenset({free.id}), frozenset({held.id}))
        assert statements is settle._held_statements("postgresql")
    finally:
        monkeypatch.undo()
        conn.close()
        host.dispose()
    outcome, _ = queue.complete_and_claim([(held, [])], (), 0)
    assert outcome == SettledBatch(frozenset({held.id}))
