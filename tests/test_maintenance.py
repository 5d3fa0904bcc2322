"""The original's scheduler_tests.rs, ported: flush_stale per 3-hour block, and self-heal
(bounded: a job is self-healed at most the self-heal limit, then it stays failed); then
memtree.maintenance's other functions and the worker's schedule on a fake monotonic clock."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine

from memtree import (
    DEFAULT_SELF_HEAL_LIMIT,
    ConfigurationError,
    JobFailure,
    JobStatus,
    NewJob,
    Queue,
)
from memtree.maintenance import (
    Upkeep,
    prune,
    purge_retired,
    recover,
    release,
    retry_failed,
    self_heal,
)
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


# -- the plain functions ---------------------------------------------------------------------


def finish(queue: Queue, count: int, kind: str = "k") -> None:
    """``count`` jobs settled done now."""
    queue.enqueue_many([NewJob(kind, i) for i in range(count)])
    for job in queue.claim_batch(count, lock_duration_ms=60_000):
        assert queue.mark_done(job)


def test_prune_deletes_in_chunks_and_stops_at_the_chunk_limit(
    queue: Queue, clock: FakeClock
) -> None:
    finish(queue, 5)
    clock.advance(1000)
    heard: list[int] = []
    assert prune(queue, clock.now_ms, chunk_rows=2, max_chunks=2, on_chunk=heard.append) == 4
    assert heard == [2, 4]
    assert queue.count_by_status(JobStatus.DONE) == 1, "the next pass goes on"
    assert prune(queue, clock.now_ms, chunk_rows=2, max_chunks=None) == 1


def test_prune_stops_after_a_short_chunk_and_keeps_newer_and_other_rows(
    queue: Queue, clock: FakeClock
) -> None:
    finish(queue, 3)
    cutoff = clock.advance(1000)
    finish(queue, 2, "newer")
    queue.enqueue(NewJob("waiting"))
    heard: list[int] = []
    assert prune(queue, cutoff, chunk_rows=10, on_chunk=heard.append) == 3
    assert heard == [3], "one statement: its chunk came back short"
    assert queue.count_by_status(JobStatus.DONE) == 2
    assert queue.count_by_status(JobStatus.READY) == 1


def test_recover_release_retry_and_purge_report_the_jobs_they_moved(
    queue: Queue, clock: FakeClock
) -> None:
    queue.enqueue_many([NewJob("a"), NewJob("b"), NewJob("f", max_attempts=1)])
    a, _ = queue.claim_batch(2, kinds=["a", "b"], lock_duration_ms=1000)
    failed = queue.claim_next(kinds=["f"])
    assert failed is not None and queue.mark_failed(failed, "boom", JobFailure.unrecoverable("x"))
    assert release(queue, [a]) == 1
    assert recover(queue) == 0, "b's lease has not expired"
    clock.advance(1001)
    assert recover(queue) == 1
    assert retry_failed(queue, transient_only=True) == 0, "unrecoverable"
    assert retry_failed(queue) == 1
    assert purge_retired(queue) == 0
    assert queue.count_by_status(JobStatus.READY) == 3


# -- the schedule on a fake monotonic clock -----------------------------------------------


class Runner:
    """A guard that records which tasks ran and hands back what they returned."""

    def __init__(self, *, failing: bool = False) -> None:
        self.ran: list[str] = []
        self.failing = failing

    def __call__(self, task: Callable[[], Any], name: str) -> Any:
        self.ran.append(name)
        return None if self.failing else task()


def upkeep(queue: Queue, **settings: Any) -> Upkeep:
    intervals = {"recover_interval_s": 1.0, "self_heal_interval_s": 10.0, "prune_interval_s": 5.0}
    return Upkeep(queue, **{**intervals, **settings})


def test_the_schedule_runs_every_task_at_first_then_each_on_its_interval(queue: Queue) -> None:
    schedule = upkeep(
        queue, periodic=[("flush_stale", 60.0, enqueue_flush_stale)], retention_ms=1000
    )
    runner = Runner()
    assert schedule.next_due() is None, "nothing scheduled before the first turn"
    schedule.run_due(100.0, runner)
    assert runner.ran == ["recover", "self_heal", "flush_stale", "prune"]
    assert schedule.next_due() == 101.0
    schedule.run_due(100.9, runner)
    assert len(runner.ran) == 4
    schedule.run_due(101.0, runner)
    schedule.run_due(105.5, runner)
    assert runner.ran[4:] == ["recover", "recover", "prune"]
    assert schedule.next_due() == 106.5


def test_the_schedule_runs_no_periodic_task_and_no_prune_unless_asked(queue: Queue) -> None:
    runner = Runner()
    upkeep(queue).run_due(0.0, runner)
    assert runner.ran == ["recover", "self_heal"]
    assert queue.count_total() == 0, "no flush_stale job"


def test_a_failed_task_waits_for_its_next_interval(queue: Queue) -> None:
    schedule = upkeep(queue)
    runner = Runner(failing=True)
    schedule.run_due(0.0, runner)
    schedule.run_due(0.5, runner)
    assert runner.ran == ["recover", "self_heal"]
    schedule.run_due(1.0, runner)
    assert runner.ran[2:] == ["recover"]


def test_the_schedule_prunes_past_retention_recovers_counts_and_logs(
    queue: Queue, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import CollectorRegistry

    from memtree.metrics import Metrics

    finish(queue, 2)
    clock.advance(2000)
    finish(queue, 1, "recent")
    queue.enqueue(NewJob("stale"))
    assert queue.claim_next(kinds=["stale"], lock_duration_ms=1) is not None
    clock.advance(10)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    schedule = upkeep(queue, retention_ms=1000, self_heal_limit=0, metrics=metrics)
    with caplog.at_level(logging.INFO, logger="memtree.maintenance"):
        schedule.run_due(0.0, Runner())
    assert queue.count_by_status(JobStatus.DONE) == 1, "the recent job is kept"
    assert queue.count_by_status(JobStatus.READY) == 1
    assert registry.get_sample_value("memtree_jobs_recovered_total") == 1
    assert [r.getMessage() for r in caplog.records] == [
        "maintenance recover: 1 jobs",
        "maintenance prune: 2 jobs",
    ]


@pytest.mark.parametrize(
    "setting",
    [
        {"recover_interval_s": 0},
        {"self_heal_interval_s": -1.0},
        {"prune_interval_s": float("nan")},
        {"periodic": [("flush_stale", 0, enqueue_flush_stale)]},
        {"periodic": [("recover", 1.0, enqueue_flush_stale)]},
        {"retention_ms": 0},
        {"self_heal_limit": -1},
    ],
)
def test_the_schedule_is_validated_when_it_is_built(queue: Queue, setting: dict[str, Any]) -> None:
    name = next(iter(setting))
    with pytest.raises(
        ConfigurationError, match="recover|flush_stale" if name == "periodic" else name
    ):
        upkeep(queue, **setting)
