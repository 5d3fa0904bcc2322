"""The original's scheduler_tests.rs, ported: flush_stale per 3-hour block, and self-heal
(bounded: a job is self-healed at most the self-heal limit, then it stays failed)."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import Engine

from memtree import DEFAULT_SELF_HEAL_LIMIT, ConfigurationError, JobStatus, NewJob, Queue
from memtree.maintenance import self_heal
from memtree.testing import drain
from memtree.tree import JobKind, enqueue_flush_stale
from memtree.worker import Handlers, JobContext, Worker
from tests.conftest import FakeClock


def test_enqueue_flush_stale_dedupes_within_current_block(tree_wall_queue: Queue) -> None:
    assert enqueue_flush_stale(tree_wall_queue) is not None
    assert enqueue_flush_stale(tree_wall_queue) is None, "the same 3h block is deduped"
    assert tree_wall_queue.count_by_status(JobStatus.READY) == 1
    claimed = tree_wall_queue.claim_next()
    assert claimed is not None and claimed.kind == JobKind.FLUSH_STALE


def test_enqueue_flush_stale_enqueues_again_in_the_next_block(
    tree_queue: Queue, clock: FakeClock
) -> None:
    assert enqueue_flush_stale(tree_queue) is not None
    clock.advance(3 * 60 * 60 * 1000)
    assert enqueue_flush_stale(tree_queue) is not None, "a new block, a new key"
    assert tree_queue.count_total() == 2


def test_self_heal_requeues_transient_failures(wall_queue: Queue) -> None:
    wall_queue.enqueue(NewJob("extract_chunk", {"chunk_id": "c1"}, "extract:c1", max_attempts=1))
    claim = wall_queue.claim_next()
    assert claim is not None
    assert wall_queue.mark_failed(claim, "connection reset by peer")
    assert wall_queue.count_by_status(JobStatus.FAILED) == 1
    assert self_heal(wall_queue) == 1
    assert wall_queue.count_by_status(JobStatus.READY) == 1


def always_raising(runs: list[str]) -> Handlers:
    handlers = Handlers()

    @handlers.register("flaky")
    def flaky(ctx: JobContext) -> None:
        runs.append(ctx.job.id)
        raise ValueError("always wrong")

    return handlers


@pytest.mark.parametrize("limit", [DEFAULT_SELF_HEAL_LIMIT, 1, 0])
def test_a_job_that_always_fails_is_self_healed_at_most_the_limit_then_stays_failed(
    queue: Queue, limit: int
) -> None:
    """max_attempts=2: it runs 2 * (1 + limit) times, and no later self-heal runs it again."""
    runs: list[str] = []
    job_id = queue.enqueue(NewJob("flaky", max_attempts=2))
    handlers = always_raising(runs)
    for _ in range(limit + 10):
        drain(queue, handlers)
        self_heal(queue, limit)
    drain(queue, handlers)
    assert len(runs) == 2 * (1 + limit)
    job = queue.get_job(job_id or "")
    assert job is not None
    assert (job.status, job.attempts, job.heal_count) == (JobStatus.FAILED, 2, limit)
    assert queue.requeue_transient_failed(limit) == 0


def test_self_heal_by_default_revives_a_job_a_few_times_only(queue: Queue) -> None:
    runs: list[str] = []
    queue.enqueue(NewJob("flaky", max_attempts=2))
    for _ in range(20):
        drain(queue, always_raising(runs))
        queue.requeue_transient_failed()
    assert len(runs) == 2 * (1 + DEFAULT_SELF_HEAL_LIMIT)
    assert queue.count_by_status(JobStatus.FAILED) == 1


def test_an_operators_retry_is_not_a_self_heal_and_starts_the_heals_over(queue: Queue) -> None:
    runs: list[str] = []
    job_id = queue.enqueue(NewJob("flaky", max_attempts=1))
    for _ in range(3):
        drain(queue, always_raising(runs))
        self_heal(queue, 1)
    assert len(runs) == 2
    assert queue.requeue_transient_failed(None) == 1, "the operator's --transient-only"
    assert (queue.get_job(job_id or "") or pytest.fail()).heal_count == 0
    drain(queue, always_raising(runs))
    assert self_heal(queue, 1) == 1, "a fresh heal budget"
    drain(queue, always_raising(runs))
    assert self_heal(queue, 1) == 0
    assert queue.requeue_job(job_id or "")
    assert (queue.get_job(job_id or "") or pytest.fail()).heal_count == 0
    assert len(runs) == 4


def test_a_worker_self_heals_at_most_its_self_heal_limit(engine: Engine) -> None:
    """The worker's own maintenance on the wall clock: a 10 ms self-heal interval and
    1 ms retries, against a limit of 1 heal."""
    queue = Queue(engine, retry_base_ms=1, retry_cap_ms=1)
    queue.migrate()
    runs: list[str] = []
    job_id = queue.enqueue(NewJob("flaky", max_attempts=2))
    worker = Worker(
        queue, always_raising(runs), self_heal_interval_s=0.01, self_heal_limit=1, gates=()
    )
    thread = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False})
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while len(runs) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # fifty more self-heal passes
    finally:
        worker.stop()
        thread.join(30)
    assert len(runs) == 4
    assert (queue.get_job(job_id or "") or pytest.fail()).status is JobStatus.FAILED


@pytest.mark.parametrize("limit", [-1, 1.5, True, None])
def test_self_heal_limit_is_validated_when_the_worker_is_built(queue: Queue, limit: object) -> None:
    with pytest.raises(ConfigurationError, match="self_heal_limit"):
        Worker(queue, always_raising([]), self_heal_limit=limit)  # type: ignore[arg-type]
