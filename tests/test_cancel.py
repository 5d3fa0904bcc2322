"""Cancellation: a ready job at once, a running one by asking its handler to stop."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from sqlalchemy import Engine, Integer, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from memtree import CancelOutcome, JobStatus, NewJob, Queue
from memtree.worker import Handlers, JobContext, Worker
from tests.conftest import FakeClock
from tests.flavors import Step, add, handler, wait, wait_cancelled


class Base(DeclarativeBase):
    pass


class Mark(Base):
    __tablename__ = "cancel_marks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)


def test_cancel_a_ready_job_at_once_and_free_its_key(queue: Queue, clock: FakeClock) -> None:
    job_id = queue.enqueue(NewJob("k", dedupe_key="only-one"))
    assert queue.cancel(job_id or "") is CancelOutcome.CANCELLED
    job = queue.get_job(job_id or "")
    assert job is not None and job.status is JobStatus.CANCELLED
    assert job.completed_at_ms == clock.now_ms
    assert queue.claim_next() is None
    assert queue.enqueue(NewJob("k", dedupe_key="only-one")) is not None, "the key is free"


def test_cancel_a_running_job_asks_it_to_stop(queue: Queue) -> None:
    job_id = queue.enqueue(NewJob("k"))
    claimed = queue.claim_next()
    assert claimed is not None
    assert queue.cancel(job_id or "") is CancelOutcome.REQUESTED
    assert queue.cancel_requested([job_id or "", "job:other"]) == {job_id}
    assert not queue.mark_done(claimed), "a run asked to stop does not end done"
    assert not queue.mark_failed(claimed, "late")
    assert queue.mark_cancelled(claimed)
    job = queue.get_job(job_id or "")
    assert job is not None and job.status is JobStatus.CANCELLED


def test_cancel_of_a_finished_or_unknown_job_changes_nothing(queue: Queue) -> None:
    job_id = queue.enqueue(NewJob("k"))
    claimed = queue.claim_next()
    assert claimed is not None and queue.mark_done(claimed)
    assert queue.cancel(job_id or "") is CancelOutcome.FINISHED
    assert queue.cancel("job:missing") is None
    assert not queue.mark_cancelled(claimed)


def test_a_cancelled_job_whose_worker_died_is_recovered_as_cancelled(queue: Queue) -> None:
    job_id = queue.enqueue(NewJob("k"))
    assert queue.claim_next(lock_duration_ms=-1) is not None
    queue.cancel(job_id or "")
    assert queue.recover_stale_locks() == 1
    job = queue.get_job(job_id or "")
    assert job is not None and job.status is JobStatus.CANCELLED
    assert job.failure_reason is None


def test_release_of_a_cancelled_running_job_ends_it_cancelled(queue: Queue) -> None:
    job_id = queue.enqueue(NewJob("k"))
    assert queue.claim_next() is not None
    queue.cancel(job_id or "")
    assert queue.release_running_locks() == 1
    job = queue.get_job(job_id or "")
    assert job is not None and job.status is JobStatus.CANCELLED


def test_a_running_handler_sees_the_request_and_the_job_ends_cancelled(
    wall_queue: Queue, engine: Engine, executor: str
) -> None:
    Base.metadata.create_all(engine)
    started = threading.Event()
    seen: list[bool] = []
    handlers = Handlers()

    def long_job(ctx: JobContext) -> Iterator[Step]:
        yield add(Mark())
        started.set()
        seen.append((yield wait_cancelled(30)))
        seen.append(ctx.cancelled)

    handlers.register("long")(handler(executor, long_job))
    job_id = wall_queue.enqueue(NewJob("long"))
    worker = Worker(wall_queue, handlers, poll_interval_s=0.05)
    runner = threading.Thread(target=worker.run_until_idle)
    runner.start()
    assert started.wait(30)
    assert wall_queue.cancel(job_id or "") is CancelOutcome.REQUESTED
    runner.join(60)
    assert seen == [True, True]
    job = wall_queue.get_job(job_id or "")
    assert job is not None and job.status is JobStatus.CANCELLED
    with Session(engine) as session:
        assert session.scalars(select(Mark)).all() == [], "a cancelled run's writes roll back"


def test_a_handler_that_ignores_the_request_still_ends_cancelled(
    wall_queue: Queue, executor: str
) -> None:
    started, resume = threading.Event(), threading.Event()
    handlers = Handlers()

    def stubborn(ctx: JobContext) -> Iterator[Step]:
        started.set()
        assert (yield wait(resume, 30))
        ctx.enqueue(NewJob("followup"))

    handlers.register("stubborn")(handler(executor, stubborn))
    job_id = wall_queue.enqueue(NewJob("stubborn"))
    runner = threading.Thread(target=Worker(wall_queue, handlers).run_until_idle)
    runner.start()
    assert started.wait(30)
    wall_queue.cancel(job_id or "")
    resume.set()
    runner.join(60)
    job = wall_queue.get_job(job_id or "")
    assert job is not None and job.status is JobStatus.CANCELLED
    assert wall_queue.count_total() == 1, "no follow-up from a cancelled run"
