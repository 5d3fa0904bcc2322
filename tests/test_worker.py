"""The worker on every database: outcomes, transactional completion, leases, gates, wake-ups,
shutdown, and surviving the database going away.

No test here bounds a duration tighter than its purpose: a wake-up test allows seconds
where the fallback it proves unnecessary would take half a minute.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import Engine, Integer, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import memtree
import memtree.tree
from memtree import JobFailure, JobStatus, NewJob, Queue
from memtree.worker import AsyncJobContext, Defer, Gate, Handlers, JobContext, Worker
from tests.conftest import FakeClock
from tests.flavors import Step, add, call, flush, handler, sleep, wait

ROOT = Path(__file__).resolve().parent.parent


class Base(DeclarativeBase):
    pass


class Effect(Base):
    __tablename__ = "worker_effects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(60))


@pytest.fixture
def app(wall_queue: Queue, engine: Engine) -> Queue:
    Base.metadata.create_all(engine)
    return wall_queue


def effects(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(select(Effect.job_id)))


def status_of(queue: Queue, job_id: str | None) -> JobStatus:
    job = queue.get_job(job_id or "")
    assert job is not None
    return job.status


class Running:
    """A worker's run() in a thread, stopped and joined on exit."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.thread = threading.Thread(
            target=worker.run, kwargs={"install_signal_handlers": False}, daemon=True
        )

    def __enter__(self) -> Worker:
        self.thread.start()
        return self.worker

    def __exit__(self, *_: object) -> None:
        self.worker.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the worker did not stop"


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


# -- outcomes ---------------------------------------------------------------------------


def test_handler_outcomes_done_defer_retry_and_fail(app: Queue, executor: str) -> None:
    handlers = Handlers()

    def ok(ctx: JobContext) -> None:
        assert ctx.payload == {"n": 1}

    def later(ctx: JobContext) -> Defer:
        return Defer(delay_ms=60_000, reason="rate limited")

    def flaky(ctx: JobContext) -> None:
        raise ConnectionError("upstream 503")

    def doomed(ctx: JobContext) -> None:
        try:
            raise JobFailure.unrecoverable("auth_revoked")
        except JobFailure as failure:
            raise RuntimeError("provider refused") from failure

    def odd(ctx: JobContext) -> object:
        return 42

    for body in (ok, later, flaky, doomed, odd):
        handlers.register(body.__name__)(handler(executor, body))

    ids = app.enqueue_many(
        [NewJob("ok", {"n": 1}), NewJob("later"), NewJob("flaky"), NewJob("doomed"), NewJob("odd")]
    )
    worker = Worker(app, handlers, gates=())
    assert worker.run_until_idle() == 5
    done, later_id, flaky_id, doomed_id, odd_id = (app.get_job(i or "") for i in ids)
    assert done is not None and done.status is JobStatus.DONE
    assert later_id is not None and later_id.status is JobStatus.READY
    assert later_id.attempts == 0 and later_id.last_error == "rate limited"
    assert later_id.available_at_ms > app.now_ms() + 50_000
    assert flaky_id is not None and flaky_id.status is JobStatus.READY and flaky_id.attempts == 1
    assert flaky_id.last_error == "ConnectionError: upstream 503"
    assert doomed_id is not None and doomed_id.status is JobStatus.FAILED
    assert doomed_id.failure_reason == "auth_revoked"
    assert odd_id is not None and odd_id.status is JobStatus.READY
    assert "expected None or memtree.Defer" in (odd_id.last_error or "")
    assert worker.run_until_idle() == 0, "nothing is due any more"


def test_only_kinds_with_handlers_are_claimed(app: Queue) -> None:
    mine = app.enqueue(NewJob("mine"))
    theirs = app.enqueue(NewJob("theirs"))
    handlers = Handlers()
    handlers.register("mine")(lambda ctx: None)
    assert Worker(app, handlers).run_until_idle() == 1
    assert status_of(app, mine) is JobStatus.DONE
    assert status_of(app, theirs) is JobStatus.READY


def test_run_until_idle_drains_followups(app: Queue, executor: str) -> None:
    handlers = Handlers()

    def step(ctx: JobContext) -> None:
        if ctx.payload < 5:
            ctx.enqueue(NewJob("step", ctx.payload + 1))

    handlers.register("step")(handler(executor, step))

    app.enqueue(NewJob("step", 0))
    assert Worker(app, handlers).run_until_idle() == 6
    assert app.count_by_status(JobStatus.DONE) == 6


# -- transactional completion -------------------------------------------------------------


def test_domain_writes_and_followups_commit_with_completion(
    app: Queue, engine: Engine, executor: str
) -> None:
    handlers = Handlers()

    def write(ctx: JobContext) -> Iterator[Step]:
        yield add(Effect(job_id=ctx.job.id))
        ctx.enqueue(NewJob("after", {"parent": ctx.job.id}))

    handlers.register("write")(handler(executor, write))

    job_id = app.enqueue(NewJob("write"))
    Worker(app, handlers).run_until_idle()
    assert effects(engine) == [job_id]
    assert status_of(app, job_id) is JobStatus.DONE
    assert app.count_by_status(JobStatus.READY) == 1


def test_a_transactional_completion_claims_the_threads_next_job_in_its_transaction(
    queue: Queue, engine: Engine
) -> None:
    # On a fake clock that never moves, settle and claim in one transaction share one
    # "now": each job after the first started exactly when the one before it completed,
    # and no job was claimed by a transaction of its own.
    Base.metadata.create_all(engine)
    order: list[str] = []
    handlers = Handlers()

    @handlers.register("write")
    def write(ctx: JobContext) -> None:
        order.append(ctx.job.id)
        ctx.session.add(Effect(job_id=ctx.job.id))

    ids = [queue.enqueue(NewJob("write", i)) for i in range(4)]
    claims = [0]
    real_claim = Queue.exchange

    def counting(self: Queue, *args: object, **kwargs: object) -> object:
        result = real_claim(self, *args, **kwargs)  # type: ignore[arg-type]
        claims[0] += sum(len(batch) for batch in result.claimed)
        return result

    worker = Worker(queue, handlers, concurrency=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Queue, "exchange", counting)
        assert worker.run_until_idle() == 4
    assert claims[0] == 1, "only the first job was claimed by the loop"
    assert sorted(effects(engine)) == sorted(order) and len(order) == 4
    jobs = {job_id: queue.get_job(job_id or "") for job_id in ids}
    for before, after in itertools.pairwise(order):
        done, next_job = jobs[before], jobs[after]
        assert done is not None and next_job is not None
        assert done.status is JobStatus.DONE and next_job.attempts == 1
        assert next_job.started_at_ms == done.completed_at_ms


def test_a_completion_that_fails_to_commit_rolls_back_the_claim_of_the_next_job(
    app: Queue, engine: Engine
) -> None:
    # The first run of "clash" writes a duplicate primary key, which fails at commit
    # time: its settle and the claim of the next job go with it, and both jobs still
    # end done (the clashing one on its retry), none left running.
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add(Effect(id=1, job_id="already there"))
    handlers = Handlers()
    runs: list[tuple[str, int]] = []

    @handlers.register("clash")
    def clash(ctx: JobContext) -> None:
        runs.append((ctx.job.kind, ctx.job.attempts))
        if ctx.job.attempts == 1:
            ctx.session.add(Effect(id=1, job_id=ctx.job.id))  # flushed by the commit
        else:
            ctx.session.add(Effect(job_id=ctx.job.id))

    @handlers.register("next")
    def next_job(ctx: JobContext) -> None:
        runs.append((ctx.job.kind, ctx.job.attempts))
        ctx.session.add(Effect(job_id=ctx.job.id))

    queue = Queue(engine, retry_base_ms=1)
    clash_id = queue.enqueue(NewJob("clash"))
    next_id = queue.enqueue(NewJob("next", available_at_ms=queue.now_ms() + 1))
    worker = Worker(queue, handlers, concurrency=1)
    deadline = time.monotonic() + 30
    while queue.count_by_status(JobStatus.DONE) < 2 and time.monotonic() < deadline:
        worker.run_until_idle()
        time.sleep(0.05)
    assert status_of(app, clash_id) is JobStatus.DONE
    assert status_of(app, next_id) is JobStatus.DONE
    assert app.count_by_status(JobStatus.RUNNING) == 0
    assert ("next", 1) in runs, "the rolled-back claim of the next job cost it no attempt"
    assert set(effects(engine)) == {"already there", clash_id, next_id}


def test_chained_claims_keep_gates_and_stop_with_the_worker(app: Queue, engine: Engine) -> None:
    # Transactional handlers of a gated kind and an ungated one: a finishing job may
    # claim its successor, but never a second job of a full gate.
    Base.metadata.create_all(engine)
    active, peak = [0], [0]
    lock = threading.Lock()
    handlers = Handlers()

    def tracked(ctx: JobContext) -> None:
        gated = ctx.job.kind == "llm_call"
        if gated:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        ctx.session.add(Effect(job_id=ctx.job.id))
        if gated:
            with lock:
                active[0] -= 1

    handlers.register("llm_call")(tracked)
    handlers.register("cheap")(tracked)
    app.enqueue_many([NewJob(kind, i) for i in range(8) for kind in ("llm_call", "cheap")])
    worker = Worker(app, handlers, concurrency=4, gates=[Gate("llm", 1, ("llm_call",))])
    assert worker.run_until_idle() == 16
    assert peak[0] == 1, "a chained claim let two gated jobs run at once"
    assert len(effects(engine)) == 16

    first = threading.Event()

    def stop_here(ctx: JobContext) -> None:
        stopping.stop()
        ctx.session.add(Effect(job_id=ctx.job.id))
        first.set()

    stopping = Worker(app, {"stop_here": stop_here, "cheap": tracked}, concurrency=1)
    now = app.now_ms()
    app.enqueue_many(
        [NewJob("stop_here", 1, available_at_ms=now - 2), NewJob("cheap", 99, available_at_ms=now)]
    )
    stopping.run(install_signal_handlers=False)
    assert first.is_set()
    assert app.count_by_status(JobStatus.READY) == 1, "a stopping worker claimed no successor"
    assert app.count_by_status(JobStatus.RUNNING) == 0


def test_raising_or_deferring_rolls_back_the_handlers_writes(
    app: Queue, engine: Engine, executor: str
) -> None:
    handlers = Handlers()

    def boom(ctx: JobContext) -> Iterator[Step]:
        yield add(Effect(job_id=ctx.job.id))
        yield flush()
        ctx.enqueue(NewJob("never"))
        raise RuntimeError("after writing")

    def defer(ctx: JobContext) -> Generator[Step, Any, Defer]:
        yield add(Effect(job_id=ctx.job.id))
        yield flush()
        return Defer(delay_ms=60_000, reason="not yet")

    handlers.register("raise")(handler(executor, boom))
    handlers.register("defer")(handler(executor, defer))

    app.enqueue_many([NewJob("raise"), NewJob("defer")])
    Worker(app, handlers).run_until_idle()
    assert effects(engine) == []
    assert app.count_total() == 2, "the raising handler's follow-up was not enqueued"


def test_a_lost_lease_rolls_back_the_handlers_writes(
    app: Queue, engine: Engine, executor: str
) -> None:
    started, resume = threading.Event(), threading.Event()
    handlers = Handlers()

    def slow(ctx: JobContext) -> Iterator[Step]:
        started.set()
        assert (yield wait(resume, 30))
        yield add(Effect(job_id=ctx.job.id))
        ctx.enqueue(NewJob("followup"))

    handlers.register("slow")(handler(executor, slow))

    job_id = app.enqueue(NewJob("slow"))
    worker = Worker(app, handlers, concurrency=1)  # no free slot to re-claim it itself
    runner = threading.Thread(target=worker.run_until_idle)
    runner.start()
    assert started.wait(30)
    assert app.release_running_locks() == 1  # the lease is taken away mid-run...
    second = app.claim_next()  # ...and another worker claims the job
    assert second is not None and second.id == job_id
    resume.set()
    runner.join(60)
    assert effects(engine) == [], "the writes of a run that lost its lease never commit"
    assert status_of(app, job_id) is JobStatus.RUNNING, "the other worker's claim is intact"
    assert app.count_total() == 1, "no follow-up from the lost run"
    assert app.mark_done(second)


def test_heartbeat_keeps_a_slow_job_past_its_lease(
    queue: Queue, clock: FakeClock, executor: str
) -> None:
    """A handler runs past five leases of the queue's clock, which it moves on to 100 ms
    before each lease's end: every time, the worker's heartbeat renews the lease a whole
    lease past the queue's now before it ends, and the job is never recovered."""
    handlers = Handlers()
    recovered: list[int] = []
    renewed_by: list[int] = []

    def lease_end() -> int:
        job = queue.get_job(job_id or "")
        assert job is not None and job.locked_until_ms is not None
        return job.locked_until_ms

    def renewal_after(end: int) -> int:
        deadline = time.monotonic() + 30
        while (renewed := lease_end()) == end:
            assert time.monotonic() < deadline, "no heartbeat renewed the lease"
            time.sleep(0.005)
        return renewed

    def long_job(ctx: JobContext) -> Iterator[Step]:
        for _ in range(7):  # 7 x 400 ms: five leases and more
            end = yield call(lease_end)
            clock.set(end - 100)
            recovered.append((yield call(queue.recover_stale_locks)))
            renewed_by.append((yield call(functools.partial(renewal_after, end))) - clock.now_ms)

    handlers.register("long")(handler(executor, long_job))

    job_id = queue.enqueue(NewJob("long"))
    started_ms = clock.now_ms
    worker = Worker(queue, handlers, lock_duration_ms=500, heartbeat_interval_ms=50)
    assert worker.run_until_idle() == 1
    job = queue.get_job(job_id or "")
    assert job is not None and job.status is JobStatus.DONE
    assert job.attempts == 1, "never recovered while its worker was alive"
    assert recovered == [0] * 7
    assert renewed_by == [500] * 7, "each renewal is a whole lease from the queue's now"
    assert clock.now_ms - started_ms > 5 * 500


def test_heartbeat_notices_a_lost_lease_and_the_run_is_not_settled(
    app: Queue, caplog: pytest.LogCaptureFixture, executor: str
) -> None:
    started, resume = threading.Event(), threading.Event()
    handlers = Handlers()

    runs: list[bool] = []

    def slow(ctx: JobContext) -> Generator[Step, Any, Defer | None]:
        if runs:  # the run after the lost one: park it
            return Defer(delay_ms=60_000, reason="parked by the test")
        started.set()
        assert (yield wait(resume, 30))
        runs.append(ctx.lease_lost.is_set())
        return None

    handlers.register("slow")(handler(executor, slow))

    job_id = app.enqueue(NewJob("slow"))
    worker = Worker(app, handlers, concurrency=1, lock_duration_ms=600, heartbeat_interval_ms=100)
    runner = threading.Thread(target=worker.run_until_idle)
    with caplog.at_level(logging.WARNING, logger="memtree.worker"):
        runner.start()
        assert started.wait(30)
        app.release_running_locks()
        wait_for(lambda: "lost its lease" in caplog.text)
        resume.set()
        runner.join(60)
    assert status_of(app, job_id) is JobStatus.READY


# -- gates --------------------------------------------------------------------------------


def test_gate_holds_its_limit_without_churning_the_table(app: Queue, executor: str) -> None:
    active, peak = [0], [0]
    lock = threading.Lock()
    handlers = Handlers()

    def gated(ctx: JobContext) -> Iterator[Step]:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        yield sleep(0.05)
        with lock:
            active[0] -= 1

    handlers.register("llm_call")(handler(executor, gated))
    handlers.register("cheap")(lambda ctx: None)
    ids = app.enqueue_many([NewJob("llm_call", i) for i in range(6)] + [NewJob("cheap", 0)])
    worker = Worker(app, handlers, concurrency=4, gates=[Gate("llm", 1, ("llm_call",))])
    assert worker.run_until_idle() == 7
    assert peak[0] == 1, "the gate allowed more than one at a time"
    for job_id in ids:
        job = app.get_job(job_id or "")
        assert job is not None and job.status is JobStatus.DONE
        assert (job.attempts, job.last_error) == (1, None), "a busy gate caused no churn"


def test_default_gate_is_the_llm_gate() -> None:
    import memtree.tree

    assert [(g.name, g.limit, set(g.kinds)) for g in memtree.tree.GATES] == [
        ("llm", 1, {"extract_chunk", "seal", "reembed_backfill", "seal_document"})
    ]


# -- wake-ups and scheduling --------------------------------------------------------------


def timed_handlers(started_at: dict[str, float]) -> Handlers:
    handlers = Handlers()

    @handlers.register("ping")
    def ping(ctx: JobContext) -> None:
        started_at[ctx.job.id] = time.time()

    return handlers


def test_enqueue_in_the_same_process_wakes_an_idle_worker(app: Queue) -> None:
    started: dict[str, float] = {}
    with Running(Worker(app, timed_handlers(started), poll_interval_s=30.0)):
        time.sleep(0.3)  # let the worker go idle on its 30 s poll
        job_id = app.enqueue(NewJob("ping"))
        wait_for(lambda: job_id in started, timeout=10)


def test_enqueue_through_the_callers_session_wakes_an_idle_worker(
    app: Queue, engine: Engine
) -> None:
    started: dict[str, float] = {}
    with Running(Worker(app, timed_handlers(started), poll_interval_s=30.0)):
        time.sleep(0.3)
        with Session(engine) as session, session.begin():
            job_id = memtree.enqueue(session, NewJob("ping"))
        wait_for(lambda: job_id in started, timeout=10)


def enqueue_from_another_process(db_url: str) -> str:
    code = (
        "import sys, memtree; q = memtree.Queue(sys.argv[1]); "
        "print(q.enqueue(memtree.NewJob('ping'))); q.close()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, db_url], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.postgresql
def test_notify_wakes_a_worker_for_an_enqueue_in_another_process(app: Queue, db_url: str) -> None:
    if app.engine.dialect.name != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    started: dict[str, float] = {}
    worker = Worker(app, timed_handlers(started), poll_interval_s=30.0)
    with Running(worker):

        def listening() -> bool:
            listener = worker.producer.listener
            return listener is not None and listener.wait_listening(0.1)

        wait_for(listening)
        time.sleep(0.3)
        job_id = enqueue_from_another_process(db_url)
        wait_for(lambda: job_id in started, timeout=10)


def test_a_worker_notices_another_processes_enqueue_within_its_poll(
    app: Queue, db_url: str
) -> None:
    started: dict[str, float] = {}
    with Running(Worker(app, timed_handlers(started), poll_interval_s=0.25)):
        time.sleep(0.3)
        job_id = enqueue_from_another_process(db_url)
        wait_for(lambda: job_id in started, timeout=10)


def test_a_scheduled_job_starts_on_time_not_a_poll_late(app: Queue) -> None:
    started: dict[str, float] = {}
    with Running(Worker(app, timed_handlers(started), poll_interval_s=30.0)):
        time.sleep(0.2)
        due_ms = app.now_ms() + 800
        job_id = app.enqueue(NewJob("ping", available_at_ms=due_ms))
        wait_for(lambda: job_id in started, timeout=15)
    assert started[job_id or ""] * 1000 >= due_ms - 5, "never before it is due"


# -- shutdown -----------------------------------------------------------------------------


def test_shutdown_releases_only_its_own_leases_and_gives_attempts_back(
    app: Queue, executor: str
) -> None:
    started = threading.Event()
    handlers = Handlers()

    def stuck(ctx: JobContext) -> Iterator[Step]:
        started.set()
        yield sleep(3)

    handlers.register("stuck")(handler(executor, stuck))

    theirs = app.enqueue(NewJob("other_kind"))
    other_worker_claim = app.claim_next(kinds=["other_kind"])
    assert other_worker_claim is not None and other_worker_claim.id == theirs
    mine = app.enqueue(NewJob("stuck"))
    worker = Worker(app, handlers, shutdown_grace_s=0.2)
    with Running(worker):
        assert started.wait(30)
    job = app.get_job(mine or "")
    assert job is not None and job.status is JobStatus.READY
    assert job.attempts == 0 and job.lease_token is None
    assert status_of(app, theirs) is JobStatus.RUNNING, "another worker's lease is not ours"


def test_graceful_stop_lets_a_running_handler_finish(app: Queue, executor: str) -> None:
    started = threading.Event()
    handlers = Handlers()

    def short(ctx: JobContext) -> Iterator[Step]:
        started.set()
        yield sleep(0.3)

    handlers.register("short")(handler(executor, short))

    job_id = app.enqueue(NewJob("short"))
    with Running(Worker(app, handlers, shutdown_grace_s=30)):
        assert started.wait(30)
    assert status_of(app, job_id) is JobStatus.DONE


@pytest.mark.slow
def test_sigterm_stops_a_worker_process_and_releases_its_jobs(
    app: Queue, db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "sleepy_app.py").write_text(
        "import time\ndef nap(ctx):\n    time.sleep(60)\nhandlers = {'nap': nap}\n"
    )
    job_id = app.enqueue(NewJob("nap"))
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "memtree"),
            "--database-url",
            db_url,
            "worker",
            "--app",
            "sleepy_app:handlers",
            "--shutdown-grace",
            "0.5",
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: status_of(app, job_id) is JobStatus.RUNNING, timeout=30)
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    job = app.get_job(job_id or "")
    assert job is not None and job.status is JobStatus.READY and job.attempts == 0


# -- the database going away --------------------------------------------------------------


def test_worker_survives_its_connections_being_killed(
    app: Queue, db_url: str, engine: Engine
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("pg_terminate_backend is PostgreSQL's")
    handlers = Handlers()
    handlers.register("job")(lambda ctx: None)
    app.enqueue_many([NewJob("job", i) for i in range(5)])
    with Running(Worker(app, handlers, poll_interval_s=0.1)):
        wait_for(lambda: app.count_by_status(JobStatus.DONE) == 5)
        admin = sqlalchemy.create_engine(db_url)
        try:
            with admin.connect() as conn:
                killed = conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalar()
        finally:
            admin.dispose()
        assert killed and killed > 0
        time.sleep(1.5)  # past PING_AFTER_IDLE_S: the pool checks idle connections
        app.enqueue_many([NewJob("job", i) for i in range(5, 10)])
        wait_for(lambda: app.count_by_status(JobStatus.DONE) == 10, timeout=30)


def test_worker_survives_a_locked_sqlite_database(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("a SQLite lock")
    engine = memtree.create_engine(db_url, sqlite_busy_timeout_ms=50)
    queue = Queue(engine)
    queue.migrate()
    handlers = Handlers()
    handlers.register("job")(lambda ctx: None)
    blocker = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        worker = Worker(queue, handlers, poll_interval_s=0.05)
        with caplog.at_level(logging.WARNING, logger="memtree.worker"), Running(worker):
            blocker.execute("BEGIN EXCLUSIVE")
            time.sleep(1.0)  # the worker's polls and claims hit 'database is locked'
            blocker.execute("ROLLBACK")
            queue.enqueue_many([NewJob("job", i) for i in range(3)])
            wait_for(lambda: queue.count_by_status(JobStatus.DONE) == 3)
        assert "busy" in caplog.text
    finally:
        blocker.close()
        engine.dispose()


# -- logs -----------------------------------------------------------------------------------


def test_logged_errors_are_scrubbed_while_the_database_keeps_them(
    app: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "connect postgresql://app:hunter2@db/prod failed; password=hunter2 for a@b.example"
    handlers = Handlers()

    @handlers.register("leaky")
    def leaky(ctx: JobContext) -> None:
        raise RuntimeError(secret)

    job_id = app.enqueue(NewJob("leaky"))
    with caplog.at_level(logging.WARNING, logger="memtree.worker"):
        Worker(app, handlers).run_until_idle()
    assert "hunter2" not in caplog.text and "a@b.example" not in caplog.text
    assert "failed" in caplog.text
    job = app.get_job(job_id or "")
    assert job is not None and job.last_error == f"RuntimeError: {secret}"
    record = next(r for r in caplog.records if "failed" in r.getMessage())
    assert (record.job_id, record.kind, record.attempt) == (job_id, "leaky", 1)  # type: ignore[attr-defined]
    assert record.duration_ms >= 0  # type: ignore[attr-defined]


# -- maintenance ----------------------------------------------------------------------------


def test_maintenance_recovers_prunes_and_schedules_flush_stale(
    engine: Engine, clock: Iterator[None]
) -> None:
    fake = FakeClock()
    queue = memtree.tree.queue(engine, clock=fake)
    queue.migrate()
    old = queue.enqueue(NewJob("old"))
    stale = queue.enqueue(NewJob("stale"))
    claimed = queue.claim_batch(2, lock_duration_ms=1000)
    assert queue.mark_done(next(j for j in claimed if j.id == old))
    fake.advance(8 * 24 * 60 * 60 * 1000)  # past the 7-day retention and the stale lease
    handlers = Handlers()
    handlers.register("flush_stale")(lambda ctx: None)
    with Running(memtree.tree.worker(queue, handlers, poll_interval_s=0.05)):
        wait_for(lambda: queue.get_job(old or "") is None)
        wait_for(lambda: status_of(queue, stale) is JobStatus.READY)
        wait_for(lambda: queue.count_by_status(JobStatus.DONE) == 1)  # flush_stale ran
    flushed = [j for j in [queue.get_job(stale or "")] if j]
    assert flushed and flushed[0].last_error == "recovered_from_stale_lock"


def test_worker_settings_are_validated(app: Queue) -> None:
    with pytest.raises(memtree.ConfigurationError):
        Worker(app, {})
    with pytest.raises(memtree.ConfigurationError):
        Worker(app, {"k": "not callable"})  # type: ignore[dict-item]
    with pytest.raises(memtree.ConfigurationError):
        Worker(app, {"k": lambda ctx: None}, concurrency=0)
    with pytest.raises(memtree.ConfigurationError):
        Worker(app, {"k": lambda ctx: None}, gates=[Gate("a", 1, ("k",)), Gate("b", 1, ("k",))])
    with pytest.raises(memtree.ConfigurationError):
        Worker(memtree.tree.queue(app.engine), {"topic_route": lambda ctx: None})
    with pytest.raises(memtree.ConfigurationError):
        Worker(app, {"k": lambda ctx: None}, upkeep=[("prune", 1.0, lambda q: None)])
    with pytest.raises(memtree.ConfigurationError):
        Worker(app, {"k": lambda ctx: None}, upkeep=[("mine", 0, lambda q: None)])
    with pytest.raises(memtree.ConfigurationError):
        Defer(until_ms=1, delay_ms=1)


def test_repeated_run_until_idle_leaves_no_handler_threads_behind(app: Queue) -> None:
    handlers = Handlers()
    handlers.register("k")(lambda ctx: None)
    worker = Worker(app, handlers, concurrency=3)
    for i in range(5):
        app.enqueue(NewJob("k", i))
        assert worker.run_until_idle() == 1
    time.sleep(0.2)
    alive = [t for t in threading.enumerate() if t.name.startswith("memtree-handler")]
    assert len(alive) <= 3, f"{len(alive)} handler threads still alive"


def test_run_until_idle_does_not_return_while_a_gated_job_is_due(app: Queue) -> None:
    """A gate that frees while the loop looks elsewhere must not end the drain early."""
    handlers = Handlers()
    handlers.register("gated")(lambda ctx: time.sleep(0.01))
    app.enqueue_many([NewJob("gated", i) for i in range(12)])
    worker = Worker(app, handlers, concurrency=4, gates=[Gate("one", 1, ("gated",))])
    assert worker.run_until_idle() == 12
    assert app.count_by_status(JobStatus.READY) == 0


@pytest.mark.parametrize(
    ("message", "label", "backoff_s"),
    [
        ("database is locked", "busy", 0.1),
        ("database table is locked", "busy", 0.1),
        ("disk I/O error", "I/O", 1.0),
        ("server closed the connection unexpectedly", "I/O", 1.0),
        ("database or disk is full", "disk full", 30.0),
        ("could not extend file: No space left on device", "disk full", 30.0),
        ("division by zero", "other", 0.5),
    ],
)
def test_errors_back_off_by_the_originals_table(message: str, label: str, backoff_s: float) -> None:
    from memtree.worker import classify_error

    cause = sqlalchemy.exc.DatabaseError("SELECT 1", {}, Exception(message))
    error = memtree.DatabaseError(message)
    error.__cause__ = cause
    assert classify_error(error) == (label, backoff_s)


@pytest.mark.slow
def test_a_second_signal_exits_at_once(app: Queue, db_url: str, tmp_path: Path) -> None:
    (tmp_path / "stubborn_app.py").write_text(
        "import time\ndef nap(ctx):\n    time.sleep(120)\nhandlers = {'nap': nap}\n"
    )
    job_id = app.enqueue(NewJob("nap"))
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "memtree"),
            "--database-url",
            db_url,
            "worker",
            "--app",
            "stubborn_app:handlers",
            "--shutdown-grace",
            "120",
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: status_of(app, job_id) is JobStatus.RUNNING, timeout=30)
        process.terminate()
        time.sleep(0.5)
        assert process.poll() is None, "the first signal waits for the running handler"
        process.terminate()
        process.communicate(timeout=30)  # far less than the 120 s grace
    finally:
        process.kill()
    assert process.returncode == 128 + 15
    assert status_of(app, job_id) is JobStatus.RUNNING, "its lease expires and is recovered"


# -- handlers of both kinds ----------------------------------------------------------------


async def _coroutine_handler(ctx: AsyncJobContext) -> None:
    await asyncio.sleep(0)
    ctx.enqueue(NewJob("after", {"from": ctx.job.id}))


class _AsyncCallable:
    async def __call__(self, ctx: AsyncJobContext) -> None:
        await asyncio.sleep(0)
        ctx.enqueue(NewJob("after", {"from": ctx.job.id}))


@pytest.mark.parametrize("handler", [_coroutine_handler, _AsyncCallable()], ids=["def", "object"])
def test_an_async_handler_is_awaited_on_an_event_loop(queue: Queue, handler: object) -> None:
    """An ``async def`` (or an object whose ``__call__`` is one) registers and runs, and a
    plain handler beside it still runs in a thread."""
    handlers = Handlers()
    handlers.register("k")(handler)
    seen: list[str] = []
    handlers.register("after")(lambda ctx: seen.append(threading.current_thread().name))
    job_id = queue.enqueue(NewJob("k", {}))
    assert Worker(queue, handlers, gates=()).run_until_idle() == 2
    assert status_of(queue, job_id) is JobStatus.DONE
    assert seen and seen[0].startswith("memtree-handler")
    assert queue.count_by_status("done") == 2


def test_a_handler_that_is_not_callable_is_refused(queue: Queue) -> None:
    with pytest.raises(memtree.ConfigurationError, match="not callable"):
        Handlers().register("k")(42)
    with pytest.raises(memtree.ConfigurationError, match="not callable"):
        Worker(queue, {"k": 42})  # type: ignore[dict-item]


# -- settings validated when the worker is built ------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("lock_duration_ms", 0),
        ("lock_duration_ms", -1),
        ("heartbeat_interval_ms", 0),
        ("poll_interval_s", 0),
        ("poll_interval_s", -0.5),
        ("poll_interval_s", float("nan")),
        ("recover_interval_s", 0),
        ("self_heal_interval_s", 0),
        ("prune_interval_s", 0),
        ("shutdown_grace_s", -1),
        ("retention_ms", 0),
        ("lock_duration_ms", True),
    ],
)
def test_a_zero_or_negative_worker_setting_is_refused_not_replaced_by_its_default(
    queue: Queue, setting: str, value: object
) -> None:
    with pytest.raises(memtree.ConfigurationError, match=setting):
        Worker(queue, {"k": lambda ctx: None}, **{setting: value})  # type: ignore[arg-type]


def test_a_tree_workers_flush_stale_interval_is_validated_when_built(queue: Queue) -> None:
    with pytest.raises(memtree.ConfigurationError, match="flush_stale_interval_s"):
        memtree.tree.worker(queue, {"k": lambda ctx: None}, flush_stale_interval_s=-1)


def test_a_plain_worker_has_no_gate_and_runs_only_the_upkeep_it_is_given(
    wall_queue: Queue,
) -> None:
    """Gates and periodic enqueues are the application's: the tree's worker adds the llm
    gate and flush_stale; a plain worker adds nothing, and calls its own upkeep."""
    ran: list[Queue] = []
    handlers = {"flush_stale": lambda ctx: None, "extract_chunk": lambda ctx: None}
    plain = Worker(wall_queue, handlers, poll_interval_s=0.05, upkeep=[("mine", 60.0, ran.append)])
    assert plain.gates == () and plain.intervals["mine"] == 60.0
    with Running(plain):
        wait_for(lambda: ran == [wall_queue])
    assert wall_queue.count_total() == 0, "no flush_stale of its own"
    queue = wall_queue
    tree = memtree.tree.worker(queue, handlers)
    assert tree.gates == memtree.tree.GATES and memtree.tree.FLUSH_STALE_SCHEDULE in tree.schedules


def test_none_asks_for_a_settings_default_and_zero_grace_is_allowed(queue: Queue) -> None:
    worker = Worker(
        queue,
        {"k": lambda ctx: None},
        lock_duration_ms=None,
        heartbeat_interval_ms=None,
        poll_interval_s=None,
        recover_interval_s=None,
        shutdown_grace_s=0,
        retention_ms=None,
    )
    assert worker.lock_duration_ms == queue.lock_duration_ms
    assert worker.heartbeat_interval_ms == queue.lock_duration_ms // 3
    assert worker.poll_interval_s > 0 and worker.intervals["recover"] > 0
    assert worker.shutdown_grace_s == 0 and worker.retention_ms is None
