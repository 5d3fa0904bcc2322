"""Settlement: the original's store_settle_tests.rs, ported, plus the lease fencing it lacked."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from memtree import (
    DEFAULT_LOCK_DURATION_MS,
    DEFAULT_MAX_DEFER_AGE_MS,
    FailureClass,
    InvalidJobError,
    Job,
    JobFailure,
    JobStatus,
    NewJob,
    Queue,
    backoff_ms,
)
from memtree.tree import jobs
from memtree.tree.payloads import Leaf, SourceTarget
from tests.conftest import FakeClock


def extract_job(chunk: str, max_attempts: int = 5) -> NewJob:
    return NewJob("extract_chunk", {"chunk_id": chunk}, f"extract:{chunk}", None, max_attempts)


def claim(queue: Queue, lock_duration_ms: int = DEFAULT_LOCK_DURATION_MS) -> Job:
    job = queue.claim_next(lock_duration_ms)
    assert job is not None, "expected a claimable job"
    return job


def row(queue: Queue, job_id: str | None) -> Job:
    job = queue.get_job(job_id or "")
    assert job is not None
    return job


def make_due(queue: Queue, job_id: str | None) -> None:
    with queue.engine.begin() as conn:
        conn.execute(
            text("UPDATE mem_tree_jobs SET available_at_ms = 0 WHERE id = :id"), {"id": job_id}
        )


# -- the original's store_settle_tests.rs, on the wall clock -------------------------


def test_mark_done_settles_current_lessee(wall_queue: Queue) -> None:
    job_id = wall_queue.enqueue(extract_job("c-happy"))
    assert wall_queue.mark_done(claim(wall_queue))
    done = row(wall_queue, job_id)
    assert done.status is JobStatus.DONE
    assert done.completed_at_ms is not None
    assert done.locked_until_ms is None


def test_mark_done_commits_followup_in_parent_settlement_transaction(queue: Queue) -> None:
    parent_id = queue.enqueue(extract_job("c-parent"))
    followup = jobs.append_buffer(Leaf("c-parent"), SourceTarget("slack:#atomic"))
    assert queue.mark_done(claim(queue), [followup])
    assert row(queue, parent_id).status is JobStatus.DONE
    assert queue.count_by_status(JobStatus.READY) == 1
    assert queue.count_total() == 2


def test_mark_failed_typed_unrecoverable_terminates_immediately(queue: Queue) -> None:
    job_id = queue.enqueue(extract_job("c-budget"))
    claimed = claim(queue)
    assert claimed.attempts == 1
    assert queue.mark_failed(claimed, "Insufficient budget", JobFailure.budget_exhausted())
    failed = row(queue, job_id)
    assert failed.status is JobStatus.FAILED
    assert failed.completed_at_ms == queue.now_ms()
    assert failed.failure_reason == "budget_exhausted"
    assert failed.failure_class == FailureClass.UNRECOVERABLE
    assert failed.last_error == "Insufficient budget"


def test_mark_failed_typed_transient_still_retries(wall_queue: Queue) -> None:
    job_id = wall_queue.enqueue(extract_job("c-transient"))
    before = wall_queue.now_ms()
    assert wall_queue.mark_failed(claim(wall_queue), "503 upstream", JobFailure.transient("up"))
    retried = row(wall_queue, job_id)
    assert retried.status is JobStatus.READY, "transient must retry"
    assert retried.available_at_ms > before
    assert (retried.failure_reason, retried.failure_class) == (None, None)


def test_count_failed_unrecoverable_excludes_transient_and_untyped(queue: Queue) -> None:
    def fail_one(chunk: str, max_attempts: int, failure: JobFailure | None) -> None:
        queue.enqueue(extract_job(chunk, max_attempts))
        assert queue.mark_failed(claim(queue), "boom", failure)

    fail_one("c-unrec", 5, JobFailure.budget_exhausted())
    fail_one("c-trans", 1, JobFailure.transient("net"))
    fail_one("c-null", 1, None)
    assert queue.count_by_status(JobStatus.FAILED) == 3
    assert queue.count_failed_unrecoverable() == 1


def test_mark_failed_retries_then_terminates(queue: Queue, clock: FakeClock) -> None:
    job = jobs.append_buffer(Leaf("c1"), SourceTarget("slack:#x"))
    job_id = queue.enqueue(NewJob(job.kind, job.payload, job.dedupe_key, max_attempts=2))
    assert queue.mark_failed(claim(queue), "boom")
    retried = row(queue, job_id)
    assert retried.status is JobStatus.READY
    assert retried.available_at_ms == clock.now_ms + backoff_ms(1)
    assert retried.last_error == "boom"
    assert queue.claim_next() is None, "not due before its backoff"
    clock.advance(backoff_ms(1))
    assert queue.mark_failed(claim(queue), "fatal")
    failed = row(queue, job_id)
    assert failed.status is JobStatus.FAILED
    assert failed.last_error == "fatal"
    assert failed.completed_at_ms is not None
    assert (failed.failure_reason, failed.failure_class) == (None, None)


def test_mark_failed_persists_full_error_unredacted(queue: Queue) -> None:
    job_id = queue.enqueue(extract_job("c-raw", 1))
    raw = "upstream returned 401: Bearer abc123.def-456 token rejected"
    assert queue.mark_failed(claim(queue), raw)
    assert row(queue, job_id).last_error == raw


def test_requeue_failed_resets_failed_jobs_only(queue: Queue) -> None:
    id_a = queue.enqueue(extract_job("a", 1))
    assert queue.mark_failed(claim(queue), "Insufficient budget", JobFailure.budget_exhausted())
    id_b = queue.enqueue(extract_job("b"))
    assert queue.requeue_failed() == 1
    a = row(queue, id_a)
    assert a.status is JobStatus.READY
    assert a.attempts == 0
    assert (a.failure_reason, a.failure_class, a.last_error, a.completed_at_ms) == (None,) * 4
    assert a.available_at_ms == queue.now_ms()
    assert row(queue, id_b).status is JobStatus.READY


def test_requeue_transient_failed_skips_unrecoverable_jobs(queue: Queue) -> None:
    id_a = queue.enqueue(extract_job("a-transient", 1))
    assert queue.mark_failed(claim(queue), "connection reset by peer")
    id_b = queue.enqueue(extract_job("b-unrec", 1))
    assert queue.mark_failed(claim(queue), "Insufficient budget", JobFailure.budget_exhausted())
    assert queue.requeue_transient_failed() == 1
    assert row(queue, id_a).status is JobStatus.READY
    b = row(queue, id_b)
    assert b.status is JobStatus.FAILED
    assert b.failure_class == "unrecoverable"


def test_recover_stale_locks_resets_running_rows(queue: Queue) -> None:
    job_id = queue.enqueue(extract_job("c1"))
    claim(queue, -1)
    assert queue.recover_stale_locks() == 1
    recovered = row(queue, job_id)
    assert recovered.status is JobStatus.READY
    assert recovered.last_error == "recovered_from_stale_lock"
    assert recovered.lease_token is None


def test_release_running_locks_resets_running_rows_regardless_of_lease(queue: Queue) -> None:
    job_id = queue.enqueue(extract_job("c-release"))
    claim(queue)
    assert queue.recover_stale_locks() == 0, "a live lease is not stale"
    assert queue.release_running_locks() == 1
    released = row(queue, job_id)
    assert released.status is JobStatus.READY
    assert released.attempts == 0, "shutdown must not spend a retry"
    assert released.locked_until_ms is None
    assert released.started_at_ms is None


def test_stale_worker_settlement_is_noop(queue: Queue) -> None:
    job_id = queue.enqueue(extract_job("c-stale"))
    worker_a = claim(queue, -1)
    assert queue.recover_stale_locks() == 1
    worker_b = claim(queue)
    assert worker_b.attempts == 2
    assert not queue.mark_done(worker_a)
    current = row(queue, job_id)
    assert current.status is JobStatus.RUNNING
    assert current.attempts == 2


def test_stale_worker_mark_failed_is_noop(queue: Queue) -> None:
    job_id = queue.enqueue(extract_job("c-stale-fail"))
    worker_a = claim(queue, -1)
    assert queue.recover_stale_locks() == 1
    assert claim(queue).attempts == 2
    assert not queue.mark_failed(worker_a, "stale error")
    current = row(queue, job_id)
    assert current.status is JobStatus.RUNNING
    assert current.last_error != "stale error"
    assert current.attempts == 2


def test_mark_deferred_does_not_increment_attempts(queue: Queue) -> None:
    job_id = queue.enqueue(extract_job("c-defer-1"))
    first = claim(queue)
    assert first.attempts == 1
    assert queue.mark_deferred(first, 0, "rate_limited")
    deferred = row(queue, job_id)
    assert deferred.status is JobStatus.READY
    assert deferred.attempts == 0, "defer gives the claim's attempt back"
    assert deferred.last_error == "rate_limited"
    assert deferred.available_at_ms == 0
    assert deferred.locked_until_ms is None
    assert deferred.started_at_ms is None
    second = claim(queue)
    assert second.id == job_id
    assert second.attempts == 1, "defer did not count toward the budget"


def test_mark_deferred_parks_jobs_that_exceed_the_defer_age_bound(queue: Queue) -> None:
    job_id = queue.enqueue(extract_job("c-defer-expired"))
    claimed = claim(queue)
    with queue.engine.begin() as conn:
        conn.execute(
            text("UPDATE mem_tree_jobs SET created_at_ms = :t WHERE id = :id"),
            {"t": queue.now_ms() - DEFAULT_MAX_DEFER_AGE_MS - 1, "id": job_id},
        )
    assert queue.mark_deferred(claimed, 2**63 - 1, "still blocked")
    parked = row(queue, job_id)
    assert parked.status is JobStatus.FAILED
    assert parked.failure_reason == "defer_age_exceeded"
    assert parked.failure_class == "unrecoverable"
    assert parked.completed_at_ms == queue.now_ms()


def test_deferred_row_not_claimable_until_until_ms(queue: Queue, clock: FakeClock) -> None:
    job_id = queue.enqueue(extract_job("c-defer-2"))
    assert queue.mark_deferred(claim(queue), clock.now_ms + 60_000, "warming_up")
    assert queue.claim_next() is None, "not claimable before until_ms"
    clock.advance(60_000)
    again = claim(queue)
    assert again.id == job_id
    assert again.attempts == 1


def test_mixed_outcomes_stress(queue: Queue, clock: FakeClock) -> None:
    ids = [queue.enqueue(extract_job(f"c-mix-{c}")) for c in "abc"]
    claims = [claim(queue) for _ in range(3)]
    assert sorted(job.id for job in claims) == sorted(ids)  # type: ignore[type-var]
    by_id = {job.id: job for job in claims}
    until = clock.now_ms + 30_000
    assert queue.mark_done(by_id[ids[0]])  # type: ignore[index]
    assert queue.mark_failed(by_id[ids[1]], "transient_error")  # type: ignore[index]
    assert queue.mark_deferred(by_id[ids[2]], until, "rate_limited")  # type: ignore[index]
    a, b, c = (row(queue, job_id) for job_id in ids)
    assert a.status is JobStatus.DONE and a.completed_at_ms is not None
    assert b.status is JobStatus.READY and b.attempts == 1
    assert b.available_at_ms > clock.now_ms
    assert c.status is JobStatus.READY and c.attempts == 0
    assert c.available_at_ms == until and c.started_at_ms is None


def test_mark_deferred_stale_lease_is_noop(queue: Queue) -> None:
    job_id = queue.enqueue(extract_job("c-defer-stale"))
    worker_a = claim(queue, -1)
    assert queue.recover_stale_locks() == 1
    assert claim(queue).attempts == 2
    stale_until = queue.now_ms() + 999_000
    assert not queue.mark_deferred(worker_a, stale_until, "stale_defer")
    current = row(queue, job_id)
    assert current.status is JobStatus.RUNNING
    assert current.attempts == 2
    assert current.last_error != "stale_defer"
    assert current.available_at_ms != stale_until


# -- fencing the original could not do -------------------------------------------------


def test_stale_worker_cannot_settle_recovered_job_before_reclaim(queue: Queue) -> None:
    """The original fenced on attempts + started_at, which a recovered row keeps."""
    job_id = queue.enqueue(extract_job("c-recovered"))
    worker_a = claim(queue, -1)
    assert queue.recover_stale_locks() == 1
    assert not queue.mark_done(worker_a)
    assert not queue.mark_failed(worker_a, "late")
    assert not queue.mark_deferred(worker_a, 0, "late")
    assert not queue.extend_lease(worker_a)
    assert row(queue, job_id).status is JobStatus.READY


def test_settle_after_defer_and_reclaim_in_the_same_millisecond_is_refused(
    queue: Queue,
) -> None:
    """Defer gives the attempt back, so attempts and started_at match again; the token does not."""
    job_id = queue.enqueue(extract_job("c-same-ms"))
    first = claim(queue)
    assert queue.mark_deferred(first, 0, "later")
    second = claim(queue)
    assert (second.attempts, second.started_at_ms) == (first.attempts, first.started_at_ms)
    assert not queue.mark_done(first), "the first claim's settle must not match the second"
    assert row(queue, job_id).status is JobStatus.RUNNING
    assert queue.mark_done(second)


def test_settle_is_refused_after_release_and_reclaim(queue: Queue) -> None:
    job_id = queue.enqueue(extract_job("c-released"))
    first = claim(queue)
    assert queue.release_running_locks() == 1
    second = claim(queue)
    assert not queue.mark_failed(first, "old")
    assert queue.mark_done(second)
    assert row(queue, job_id).status is JobStatus.DONE


def test_second_settle_of_one_claim_is_refused(queue: Queue) -> None:
    queue.enqueue(extract_job("c-twice"))
    job = claim(queue)
    assert queue.mark_done(job)
    assert not queue.mark_done(job)
    assert not queue.mark_failed(job, "after done")
    assert queue.count_by_status(JobStatus.DONE) == 1


def test_followups_are_not_enqueued_when_the_lease_was_lost(queue: Queue) -> None:
    queue.enqueue(extract_job("c-lost"))
    job = claim(queue, -1)
    queue.recover_stale_locks()
    assert not queue.mark_done(job, [NewJob("followup")])
    assert queue.count_total() == 1


def test_extend_lease_moves_the_lease_and_keeps_the_claim(queue: Queue, clock: FakeClock) -> None:
    job_id = queue.enqueue(extract_job("c-beat"))
    job = claim(queue, 1000)
    clock.advance(900)
    assert queue.extend_lease(job, 5000)
    assert row(queue, job_id).locked_until_ms == clock.now_ms + 5000
    clock.advance(2000)
    assert queue.recover_stale_locks() == 0, "the heartbeat kept the lease"
    assert queue.mark_done(job)


def test_recover_fails_a_job_with_no_attempts_left(queue: Queue) -> None:
    """A job that kills its worker every time must not loop forever."""
    job_id = queue.enqueue(extract_job("c-killer", 2))
    claim(queue, -1)
    assert queue.recover_stale_locks() == 1
    assert row(queue, job_id).status is JobStatus.READY
    claim(queue, -1)
    assert queue.recover_stale_locks() == 1
    dead = row(queue, job_id)
    assert dead.status is JobStatus.FAILED
    assert dead.failure_reason == "stale_lock_exhausted"
    assert dead.failure_class == FailureClass.TRANSIENT
    assert dead.completed_at_ms == queue.now_ms()


def test_recover_keeps_an_existing_last_error(queue: Queue, clock: FakeClock) -> None:
    job_id = queue.enqueue(extract_job("c-err"))
    assert queue.mark_failed(claim(queue), "first failure")
    clock.advance(backoff_ms(1))
    with queue.engine.begin() as conn:  # a claim by another program that keeps last_error
        conn.execute(
            text("UPDATE mem_tree_jobs SET status = 'running', locked_until_ms = 1 WHERE id = :id"),
            {"id": job_id},
        )
    assert queue.recover_stale_locks() == 1
    assert row(queue, job_id).last_error == "first failure"


def test_release_running_locks_releases_only_the_held_claims(queue: Queue) -> None:
    queue.enqueue_many([extract_job("mine"), extract_job("theirs")])
    mine = queue.claim_next(kinds=["extract_chunk"])
    theirs = queue.claim_next()
    assert mine is not None and theirs is not None
    assert queue.release_running_locks([mine]) == 1
    assert row(queue, mine.id).status is JobStatus.READY
    assert row(queue, theirs.id).status is JobStatus.RUNNING
    assert queue.release_running_locks([]) == 0


def test_mark_failed_finds_a_job_failure_in_the_exception_chain(queue: Queue) -> None:
    job_id = queue.enqueue(extract_job("c-chain"))
    try:
        try:
            raise JobFailure.unrecoverable("auth_revoked")
        except JobFailure as inner:
            raise RuntimeError("provider call failed") from inner
    except RuntimeError as outer:
        assert queue.mark_failed(claim(queue), outer)
    failed = row(queue, job_id)
    assert failed.status is JobStatus.FAILED
    assert failed.failure_reason == "auth_revoked"
    assert failed.last_error is not None
    assert "provider call failed" in failed.last_error and "auth_revoked" in failed.last_error


def test_mark_failed_takes_the_failure_passed_as_error(queue: Queue) -> None:
    job_id = queue.enqueue(extract_job("c-direct"))
    assert queue.mark_failed(claim(queue), JobFailure.unrecoverable("bad_input"))
    assert row(queue, job_id).failure_class == "unrecoverable"


def test_mark_failed_on_the_last_attempt_records_a_transient_class(queue: Queue) -> None:
    job_id = queue.enqueue(extract_job("c-last", 1))
    assert queue.mark_failed(claim(queue), "net", JobFailure.transient("net_down"))
    failed = row(queue, job_id)
    assert (failed.status, failed.failure_reason, failed.failure_class) == (
        JobStatus.FAILED,
        "net_down",
        "transient",
    )


def test_mark_deferred_rejects_a_non_integer_time(queue: Queue) -> None:
    queue.enqueue(extract_job("c-bad-until"))
    job = claim(queue)
    with pytest.raises(InvalidJobError):
        queue.mark_deferred(job, 1.5, "x")  # type: ignore[arg-type]
    assert queue.get_job(job.id).status is JobStatus.RUNNING  # type: ignore[union-attr]


# -- requeue and the dedupe index ------------------------------------------------------


def fail_for_good(queue: Queue, job: NewJob, failure: JobFailure | None = None) -> str:
    job_id = queue.enqueue(job)
    assert job_id is not None
    claimed = queue.claim_next(kinds=[job.kind])
    assert claimed is not None and claimed.id == job_id
    assert queue.mark_failed(claimed, "boom", failure or JobFailure.unrecoverable("x"))
    return job_id


def test_requeue_leaves_a_failed_row_whose_key_is_active_again(queue: Queue) -> None:
    failed_id = fail_for_good(queue, NewJob("k", dedupe_key="shared"))
    active_id = queue.enqueue(NewJob("k", dedupe_key="shared"))
    assert active_id is not None
    assert queue.requeue_failed() == 0
    assert row(queue, failed_id).status is JobStatus.FAILED
    assert row(queue, active_id).status is JobStatus.READY


def test_requeue_of_several_failed_rows_with_one_key_requeues_only_the_newest(
    queue: Queue, clock: FakeClock
) -> None:
    older = fail_for_good(queue, NewJob("k", dedupe_key="shared"))
    clock.advance(10)
    newer = fail_for_good(queue, NewJob("k", dedupe_key="shared"))
    unkeyed = fail_for_good(queue, NewJob("k"))
    assert queue.requeue_failed() == 2
    assert row(queue, older).status is JobStatus.FAILED
    assert row(queue, newer).status is JobStatus.READY
    assert row(queue, unkeyed).status is JobStatus.READY
    assert queue.requeue_failed() == 0, "the older row's key is active now"


def test_requeue_transient_considers_only_transient_rows_for_the_newest(
    queue: Queue, clock: FakeClock
) -> None:
    transient = fail_for_good(queue, NewJob("k", dedupe_key="s"), JobFailure.transient("t"))
    transient_row = row(queue, transient)
    assert transient_row.status is JobStatus.READY  # a transient failure retries first
    # Exhaust it: make it due and fail until the budget is spent.
    for _ in range(10):
        clock.advance(10 * 60 * 60 * 1000)
        job = queue.claim_next()
        if job is None:
            break
        queue.mark_failed(job, "again", JobFailure.transient("t"))
    assert row(queue, transient).status is JobStatus.FAILED
    clock.advance(10)
    fail_for_good(queue, NewJob("k", dedupe_key="s"), JobFailure.unrecoverable("u"))
    assert queue.requeue_transient_failed() == 1
    assert row(queue, transient).status is JobStatus.READY


def test_requeue_job_retries_one_failed_or_cancelled_job(queue: Queue) -> None:
    failed = fail_for_good(queue, NewJob("k", dedupe_key="one"))
    cancelled = queue.enqueue(NewJob("k"))
    queue.cancel(cancelled or "")
    ready = queue.enqueue(NewJob("k", {"ready": True}))
    assert queue.requeue_job(failed)
    assert queue.requeue_job(cancelled or "")
    assert not queue.requeue_job(ready or ""), "a ready job is not retried"
    assert not queue.requeue_job("job:unknown")
    for job_id in (failed, cancelled):
        job = row(queue, job_id)
        assert (job.status, job.attempts, job.cancel_requested_at_ms) == (JobStatus.READY, 0, None)


def test_requeue_job_leaves_a_job_whose_key_is_active_again(queue: Queue) -> None:
    failed = fail_for_good(queue, NewJob("k", dedupe_key="busy"))
    queue.enqueue(NewJob("k", dedupe_key="busy"))
    assert not queue.requeue_job(failed)
    assert row(queue, failed).status is JobStatus.FAILED
