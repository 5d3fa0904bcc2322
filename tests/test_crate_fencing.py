"""Fencing against the original crate's claims, on every database.

The crate's claim keeps whatever ``lease_token`` the row has, and its recovery does not
clear it. So once the crate recovers a job memtree's stale worker still runs and claims
it again, the row is ``running`` under the crate with memtree's old token: every memtree
settle, single or batched, must still be refused, and leave the row as the crate has it.
The crate's recovery and claim run as the crate wrote them (``tests/tinycortex.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from sqlalchemy import text

from memtree import (
    DEFAULT_LOCK_DURATION_MS,
    CancelOutcome,
    FailureClass,
    Job,
    JobFailure,
    JobStatus,
    NewJob,
    Queue,
    SettledBatch,
)
from tests import tinycortex
from tests.conftest import FakeClock

pytestmark = pytest.mark.not_on_mysql("the original crate never ran on MySQL")


@pytest.fixture
def queue(tree_queue: Queue) -> Queue:
    """The crate's table is shared through the tree's queue."""
    return tree_queue


def crate_recovers_and_claims_again(queue: Queue, clock: FakeClock) -> None:
    """The lease runs out; the crate's startup recovery and its next claim take the job."""
    clock.advance(DEFAULT_LOCK_DURATION_MS + 1)
    now = clock()
    with queue.engine.begin() as conn:
        conn.execute(
            text(tinycortex.numbered_to_named(tinycortex.RECOVER_STALE_LOCKS)),
            tinycortex.named(now),
        )
        claimed = conn.execute(
            text(tinycortex.numbered_to_named(tinycortex.CLAIM_NEXT)),
            tinycortex.named(now, now + tinycortex.DEFAULT_LOCK_DURATION_MS),
        ).all()
    assert len(claimed) == 1


@pytest.fixture
def stale(queue: Queue, clock: FakeClock) -> Job:
    """memtree's claim of a job the crate has since recovered and claimed again."""
    queue.enqueue(NewJob("extract_chunk", {"chunk_id": "c"}, "extract:c"))
    job = queue.claim_next()
    assert job is not None and job.lease_token is not None
    crate_recovers_and_claims_again(queue, clock)
    now_row = queue.get_job(job.id)
    assert now_row is not None and now_row.status is JobStatus.RUNNING
    assert now_row.lease_token == job.lease_token, "the crate's claim keeps the token"
    assert (now_row.attempts, now_row.started_at_ms) != (job.attempts, job.started_at_ms)
    return job


SETTLES: dict[str, Callable[[Queue, Job], object]] = {
    "mark_done": lambda q, job: q.mark_done(job, [NewJob("followup")]),
    "mark_failed (retry)": lambda q, job: q.mark_failed(job, RuntimeError("boom")),
    "mark_failed (attempts spent)": lambda q, job: q.mark_failed(
        dataclasses.replace(job, max_attempts=job.attempts), RuntimeError("boom")
    ),
    "mark_failed (unrecoverable)": lambda q, job: q.mark_failed(
        job, "no", JobFailure("budget", FailureClass.UNRECOVERABLE)
    ),
    "mark_deferred": lambda q, job: q.mark_deferred(job, q.now_ms() + 1000, "later"),
    "mark_released": lambda q, job: q.mark_released(job, q.now_ms() + 1000, "unreachable"),
    "extend_lease": lambda q, job: q.extend_lease(job),
    "mark_done_many": lambda q, job: q.mark_done_many([(job, [NewJob("followup")])]),
    "complete_and_claim": lambda q, job: q.complete_and_claim([(job, [])], (), 0)[0],
    "extend_leases": lambda q, job: q.extend_leases([job]),
    "release_running_locks (held)": lambda q, job: q.release_running_locks([job]),
}
REFUSED: tuple[object, ...] = (False, set(), 0, SettledBatch())


@pytest.mark.parametrize("settle", list(SETTLES.values()), ids=list(SETTLES))
def test_no_settle_of_a_stale_claim_touches_a_job_the_crate_claimed_again(
    queue: Queue, stale: Job, settle: Callable[[Queue, Job], object]
) -> None:
    before = queue.get_job(stale.id)
    total = queue.count_total()
    assert settle(queue, stale) in REFUSED
    assert queue.get_job(stale.id) == before, "the crate's run was changed"
    assert queue.count_total() == total, "a stale claim's follow-up was enqueued"


def test_a_stale_claim_cannot_end_a_cancelled_crate_run(queue: Queue, stale: Job) -> None:
    """A cancel request on the crate's run is the crate's to answer, not the stale claim's."""
    assert queue.cancel(stale.id) is CancelOutcome.REQUESTED
    before = queue.get_job(stale.id)
    assert queue.mark_cancelled(stale) is False
    assert queue.get_job(stale.id) == before


def test_a_batch_settles_its_current_claims_and_refuses_the_one_the_crate_took(
    queue: Queue, stale: Job
) -> None:
    queue.enqueue(NewJob("extract_chunk", {"chunk_id": "d"}, "extract:d"))
    current = queue.claim_next()
    assert current is not None
    assert queue.extend_leases([stale, current]) == {current.id}
    outcome, _ = queue.complete_and_claim([(stale, []), (current, [])], (), 0)
    assert outcome == SettledBatch(frozenset({current.id}), frozenset())
    row = queue.get_job(stale.id)
    assert row is not None and row.status is JobStatus.RUNNING and row.attempts == 2


def test_the_crate_settles_its_own_claim_after_memtree_refused_the_stale_one(
    queue: Queue, stale: Job, clock: FakeClock
) -> None:
    """The refused settles leave the crate's fence intact: its own mark_done still lands."""
    for settle in SETTLES.values():
        settle(queue, stale)
    row = queue.get_job(stale.id)
    assert row is not None
    with queue.engine.begin() as conn:
        # PostgreSQL's IS takes no parameter; the start is not NULL here, so = tests the same.
        settled = conn.execute(
            text(
                tinycortex.numbered_to_named(tinycortex.MARK_DONE).replace(
                    "started_at_ms IS :p4", "started_at_ms = :p4"
                )
            ),
            tinycortex.named(clock(), row.id, row.attempts, row.started_at_ms),
        )
    assert settled.rowcount == 1
    done = queue.get_job(stale.id)
    assert done is not None and done.status is JobStatus.DONE
