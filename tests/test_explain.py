"""``memtree.explain``: every branch of why a job is where it is, on every engine, plus
the worker registry it reads and ``memtree explain`` on the command line."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import insert

import memtree
from memtree import store
from memtree.models import jobs
from memtree.queue import ClaimGroup
from memtree.testing import FakeClock
from memtree.types import FailureClass, JobFailure, NewJob

ExplainReason = memtree.ExplainReason


def worker_row(
    queue: memtree.Queue, kinds: tuple[str, ...], worker_id: str = "w1"
) -> store.WorkerRow:
    now = queue.now_ms()
    row = store.WorkerRow(worker_id, f"host:{worker_id}", kinds, 4, memtree.__version__, now, now)
    queue.beat_worker(row)
    return row


def claim_as(queue: memtree.Queue, worker: store.WorkerRow, kind: str) -> memtree.Job:
    exchanged = queue.exchange([], [ClaimGroup(1, (kind,))], 1, claimant=worker.id)
    (job,) = exchanged.claimed[0]
    return job


def why(
    queue: memtree.Queue, job_id: str, limits: tuple[memtree.Gate | memtree.RateLimit, ...] = ()
) -> memtree.Explanation:
    found = memtree.explain(queue, job_id, limits)
    assert found is not None
    return found


def test_an_unknown_job_has_no_explanation(queue: memtree.Queue) -> None:
    assert memtree.explain(queue, "job:nope") is None


def test_a_job_due_later_is_scheduled(queue: memtree.Queue, clock: FakeClock) -> None:
    job_id = queue.enqueue(NewJob("mail", {}, available_at_ms=clock() + 90_000))
    assert job_id is not None
    found = why(queue, job_id)
    assert found.reason is ExplainReason.SCHEDULED
    assert found.facts["due_in_ms"] == 90_000
    assert "due in 1.5 min" in found.summary


def test_a_failed_attempt_waits_out_its_backoff(queue: memtree.Queue, clock: FakeClock) -> None:
    queue.enqueue(NewJob("mail", {}))
    job = queue.claim_next()
    assert job is not None
    assert queue.mark_failed(job, RuntimeError("smtp down, password=hunter2"))
    found = why(queue, job.id)
    assert found.reason is ExplainReason.BACKOFF
    assert "after attempt 1 of 5 failed" in found.summary
    assert found.facts["due_in_ms"] > 0
    assert "smtp down" in found.facts["last_error"]
    assert "hunter2" not in json.dumps(found.as_dict())  # scrubbed


def test_a_deferred_job_names_its_reason(queue: memtree.Queue, clock: FakeClock) -> None:
    queue.enqueue(NewJob("mail", {}))
    job = queue.claim_next()
    assert job is not None
    assert queue.mark_deferred(job, clock() + 5_000, "waiting for the upstream index")
    found = why(queue, job.id)
    assert found.reason is ExplainReason.DEFERRED
    assert any("waiting for the upstream index" in line for line in found.details)


def test_a_retired_kind_is_never_claimed(tree_queue: memtree.Queue, clock: FakeClock) -> None:
    with tree_queue.transaction() as conn:
        conn.execute(
            insert(jobs).values(
                id="job:old",
                kind="topic_route",
                payload_json="{}",
                status="ready",
                attempts=0,
                max_attempts=5,
                available_at_ms=clock(),
                created_at_ms=clock(),
            )
        )
    assert why(tree_queue, "job:old").reason is ExplainReason.RETIRED_KIND


def test_a_due_job_with_no_worker_running_says_so(queue: memtree.Queue, clock: FakeClock) -> None:
    job_id = queue.enqueue(NewJob("mail", {}))
    assert job_id is not None
    found = why(queue, job_id)
    assert found.reason is ExplainReason.NO_WORKER
    assert "no worker process is running" in found.summary
    # A worker that stopped beating long ago does not count as running.
    worker_row(queue, ("mail",))
    clock.advance(store.WORKER_GONE_MS + 1)
    assert why(queue, job_id).reason is ExplainReason.NO_WORKER


def test_a_due_job_whose_kind_no_running_worker_handles(queue: memtree.Queue) -> None:
    job_id = queue.enqueue(NewJob("mail", {}))
    assert job_id is not None
    worker_row(queue, ("resize", "thumbnail"))
    found = why(queue, job_id)
    assert found.reason is ExplainReason.NO_WORKER
    assert "has a handler for 'mail'" in found.summary
    assert any("handles: resize, thumbnail" in line for line in found.details)


def test_a_due_job_waits_its_turn_behind_earlier_ones(
    queue: memtree.Queue, clock: FakeClock
) -> None:
    worker_row(queue, ("mail",))
    queue.enqueue(NewJob("mail", {"n": 1}))
    clock.advance(10)
    queue.enqueue(NewJob("mail", {"n": 2}))
    clock.advance(10)
    last = queue.enqueue(NewJob("mail", {"n": 3}))
    assert last is not None
    clock.advance(1_000)
    found = why(queue, last)
    assert found.reason is ExplainReason.WAITING_TURN
    assert found.facts["due_ahead"] == 2
    assert found.facts["due_for_ms"] == 1_000


def test_a_full_global_gate_names_its_holders(queue: memtree.Queue) -> None:
    gate = memtree.Gate("llm", 1, ("summarize",), scope="global")
    worker = worker_row(queue, ("summarize",))
    queue.enqueue(NewJob("summarize", {"doc": 1}))
    queue.enqueue(NewJob("summarize", {"doc": 2}))
    holder = claim_as(queue, worker, "summarize")
    waiting = next(j for j in queue.list_jobs(status=memtree.JobStatus.READY))
    found = why(queue, waiting.id, (gate,))
    assert found.reason is ExplainReason.GATE_FULL
    assert found.facts["gate"]["holders"] == [holder.id]
    assert any(holder.id in line for line in found.details)
    # Without the gate it only waits its turn; a process gate cannot be seen from here.
    assert why(queue, waiting.id).reason is ExplainReason.WAITING_TURN
    local = memtree.Gate("llm", 1, ("summarize",))
    assert why(queue, waiting.id, (local,)).reason is ExplainReason.WAITING_TURN


def test_a_partitioned_gate_is_full_only_for_its_key(queue: memtree.Queue) -> None:
    gate = memtree.Gate("seal", 1, ("seal",), scope="global", key="tree")
    worker = worker_row(queue, ("seal",))
    queue.enqueue(NewJob("seal", {"tree": "a"}, dedupe_key="a1"))
    holder = claim_as(queue, worker, "seal")
    same = queue.enqueue(NewJob("seal", {"tree": "a"}, dedupe_key="a2"))
    other = queue.enqueue(NewJob("seal", {"tree": "b"}))
    assert same is not None and other is not None
    found = why(queue, same, (gate,))
    assert found.reason is ExplainReason.GATE_FULL
    assert "tree='a'" in found.summary and found.facts["gate"]["holders"] == [holder.id]
    assert why(queue, other, (gate,)).reason is ExplainReason.WAITING_TURN


def test_a_spent_rate_limit_says_when_it_frees(queue: memtree.Queue, clock: FakeClock) -> None:
    rate = memtree.RateLimit("api", 2, 60, ("call",))
    worker = worker_row(queue, ("call",))
    job_id = queue.enqueue(NewJob("call", {}))
    assert job_id is not None
    assert queue.consume(rate) and queue.consume(rate)
    clock.advance(15_000)
    found = why(queue, job_id, (rate,))
    assert found.reason is ExplainReason.RATE_LIMITED
    assert found.facts["rate_limit"]["used"] == 2
    assert found.facts["rate_limit"]["rolls_at_ms"] - clock() == 45_000
    clock.advance(45_001)
    queue.beat_worker(worker)
    assert why(queue, job_id, (rate,)).reason is ExplainReason.WAITING_TURN


def test_a_running_job_names_its_worker_and_lease(queue: memtree.Queue, clock: FakeClock) -> None:
    worker = worker_row(queue, ("mail",))
    queue.enqueue(NewJob("mail", {}))
    job = claim_as(queue, worker, "mail")
    assert store.claimant_of(job.lease_token) == worker.id
    clock.advance(2_000)
    found = why(queue, job.id)
    assert found.reason is ExplainReason.RUNNING
    assert found.facts["worker"]["name"] == worker.name
    assert found.facts["lease_left_ms"] == queue.lock_duration_ms - 2_000
    assert any("last beat 2.0 s ago" in line for line in found.details)


def test_a_running_job_of_a_process_without_a_row(queue: memtree.Queue) -> None:
    queue.enqueue(NewJob("mail", {}))
    job = queue.claim_next()  # an application's own claim: no claimant
    assert job is not None
    found = why(queue, job.id)
    assert found.reason is ExplainReason.RUNNING
    assert "keeps no row" in found.details[-1]


def test_a_running_job_asked_to_stop(queue: memtree.Queue) -> None:
    queue.enqueue(NewJob("mail", {}))
    job = queue.claim_next()
    assert job is not None
    assert queue.cancel(job.id) is memtree.CancelOutcome.REQUESTED
    assert why(queue, job.id).reason is ExplainReason.CANCEL_REQUESTED


def test_an_expired_lease_waits_for_recovery(queue: memtree.Queue, clock: FakeClock) -> None:
    worker = worker_row(queue, ("mail",))
    queue.enqueue(NewJob("mail", {}))
    job = claim_as(queue, worker, "mail")
    clock.advance(queue.lock_duration_ms + store.WORKER_GONE_MS + 5_000)
    found = why(queue, job.id)
    assert found.reason is ExplainReason.LEASE_EXPIRED
    assert any("gone" in line for line in found.details)
    assert queue.recover_stale_locks() == 1
    assert why(queue, job.id).reason is not ExplainReason.LEASE_EXPIRED


def test_ended_jobs_say_how_they_ended(queue: memtree.Queue, clock: FakeClock) -> None:
    done_id = queue.enqueue(NewJob("mail", {"n": 1}))
    job = queue.claim_next()
    assert job is not None and job.id == done_id
    assert queue.mark_done(job)
    clock.advance(3_000)
    found = why(queue, job.id)
    assert found.reason is ExplainReason.DONE and "done 3.0 s ago" in found.summary

    cancelled = queue.enqueue(NewJob("mail", {"n": 2}))
    assert cancelled is not None
    assert queue.cancel(cancelled) is memtree.CancelOutcome.CANCELLED
    assert why(queue, cancelled).reason is ExplainReason.CANCELLED


def test_a_failed_job_gives_its_error_class_and_remedy(queue: memtree.Queue) -> None:
    queue.enqueue(NewJob("mail", {}, dedupe_key="welcome:7", max_attempts=1))
    job = queue.claim_next()
    assert job is not None
    failure = JobFailure("invalid_input", FailureClass.UNRECOVERABLE)
    assert queue.mark_failed(job, ValueError("no such mailbox"), failure)
    found = why(queue, job.id)
    assert found.reason is ExplainReason.FAILED
    assert found.facts["failure_class"] == "unrecoverable"
    assert "invalid_input" in found.summary
    assert any("self-heal never retries it" in line for line in found.details)
    # Another job took the dedupe key: this one cannot be retried while it is active.
    holder = queue.enqueue(NewJob("mail", {}, dedupe_key="welcome:7"))
    assert holder is not None
    found = why(queue, job.id)
    assert found.facts["dedupe_holder"] == holder
    assert any("cannot be retried" in line for line in found.details)


def test_a_transient_failure_is_left_to_self_heal(queue: memtree.Queue) -> None:
    queue.enqueue(NewJob("mail", {}, max_attempts=1))
    job = queue.claim_next()
    assert job is not None
    assert queue.mark_failed(job, TimeoutError("upstream timed out"))
    found = why(queue, job.id)
    assert found.reason is ExplainReason.FAILED
    assert found.facts["failure_class"] is None
    assert "(unclassified, so transient)" in found.summary
    assert any("self-heal retries it" in line for line in found.details)
    with queue.transaction() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job.id).values(heal_count=3))
    assert any("self-healed 3 times already" in line for line in why(queue, job.id).details)


def test_a_row_memtree_cannot_read(queue: memtree.Queue, clock: FakeClock) -> None:
    with queue.transaction() as conn:
        conn.execute(
            insert(jobs).values(
                id="job:odd",
                kind="mail",
                payload_json="{}",
                status="paused",
                attempts=0,
                max_attempts=5,
                available_at_ms=clock(),
                created_at_ms=clock(),
            )
        )
    found = why(queue, "job:odd")
    assert found.reason is ExplainReason.UNREADABLE
    assert "unknown status 'paused'" in found.summary


# -- the registry, kept by a real worker ----------------------------------------------


@pytest.fixture
def blocking_worker(
    queue: memtree.Queue,
) -> Iterator[tuple[memtree.Worker, threading.Event, threading.Event]]:
    started, release = threading.Event(), threading.Event()

    def handler(ctx: memtree.JobContext) -> None:
        started.set()
        release.wait(30)

    worker = memtree.Worker(
        queue, {"mail": handler}, concurrency=2, poll_interval_s=0.05, name="box:42"
    )
    thread = threading.Thread(target=lambda: worker.run(install_signal_handlers=False))
    thread.start()
    try:
        yield worker, started, release
    finally:
        release.set()
        worker.stop()
        thread.join(30)
        assert not thread.is_alive()


def test_a_running_worker_keeps_a_row_and_names_its_jobs(
    queue: memtree.Queue, blocking_worker: tuple[memtree.Worker, threading.Event, threading.Event]
) -> None:
    worker, started, release = blocking_worker
    job_id = queue.enqueue(NewJob("mail", {}))
    assert job_id is not None
    assert started.wait(30)
    (row,) = queue.list_workers()
    assert (row.id, row.name, row.kinds, row.concurrency) == (worker.id, "box:42", ("mail",), 2)
    found = why(queue, job_id)
    assert found.reason is ExplainReason.RUNNING
    assert found.facts["worker"] == {
        "id": worker.id,
        "name": "box:42",
        "seen_at_ms": row.seen_at_ms,
    }
    release.set()
    worker.stop()
    deadline = time.monotonic() + 30
    while queue.list_workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queue.list_workers() == []  # a stopping worker deletes its row
    assert why(queue, job_id).reason is ExplainReason.DONE


def test_a_beat_writes_a_row_a_peer_forgot_and_forgets_old_rows(
    queue: memtree.Queue, clock: FakeClock
) -> None:
    old = worker_row(queue, ("mail",), "old")
    clock.advance(store.WORKER_FORGET_MS + 1)
    fresh = worker_row(queue, ("mail",), "fresh")
    assert [w.id for w in queue.list_workers()] == [fresh.id]
    queue.forget_worker(fresh.id)
    queue.beat_worker(fresh)  # touched nothing: written again
    assert [w.id for w in queue.list_workers()] == [fresh.id]
    assert old.id not in {w.id for w in queue.list_workers()}
