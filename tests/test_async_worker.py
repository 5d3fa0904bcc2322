"""A worker inside an application's own event loop, with ``async def`` handlers.

The behaviour both executors share (outcomes, transactional completion, lease loss,
heartbeat, cancellation, shutdown, gates, SIGKILL chaos) is tested once for both, by the
``executor`` fixture (tests/flavors.py); this file tests what only asyncio has: running
inside the application's loop, cancelling that task, and the loop staying free.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from sqlalchemy import Engine, Integer, String, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

import memtree
from memtree import ConfigurationError, JobStatus, NewJob, Queue
from memtree.worker import AsyncJobContext, Handlers, JobContext, Worker
from tests.test_transactional import _async_url


class Base(DeclarativeBase):
    pass


class Visit(Base):
    __tablename__ = "async_visits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(60))


@pytest.fixture
def app(wall_queue: Queue, engine: Engine) -> Queue:
    Base.metadata.create_all(engine)
    return wall_queue


def visits(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return sorted(session.scalars(select(Visit.job_id)))


async def until(predicate: object, timeout: float = 30.0) -> None:
    """Poll ``predicate`` (a blocking callable) off the loop until it is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):  # type: ignore[arg-type]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_a_worker_runs_its_async_handlers_on_the_applications_loop(
    app: Queue, engine: Engine, db_url: str
) -> None:
    """``async with worker`` in the application's loop: requests enqueue through their own
    ``AsyncSession``, each job runs once on that loop, its write commits with it, and a
    ``def`` handler beside it runs in a thread."""
    loop = asyncio.get_running_loop()
    loops: list[object] = []
    threads: list[str] = []
    handlers = Handlers()

    @handlers.register("visit")
    async def visit(ctx: AsyncJobContext) -> None:
        loops.append(asyncio.get_running_loop())
        ctx.session.add(Visit(job_id=ctx.job.id))
        await asyncio.sleep(0.01)
        ctx.enqueue(NewJob("audit", {"of": ctx.job.id}))

    @handlers.register("audit")
    def audit(ctx: JobContext) -> None:
        threads.append(threading.current_thread().name)

    app_engine = create_async_engine(_async_url(db_url))
    ids: list[str | None] = []
    try:
        async with Worker(app, handlers, gates=(), poll_interval_s=0.05):
            for n in range(20):
                async with AsyncSession(app_engine) as session, session.begin():
                    ids.append(await memtree.enqueue_async(session, NewJob("visit", {"n": n})))
            await until(lambda: app.count_by_status(JobStatus.DONE) == 40)
    finally:
        await app_engine.dispose()
    assert loops and all(running is loop for running in loops)
    assert len(threads) == 20 and all(name.startswith("memtree-handler") for name in threads)
    assert visits(engine) == sorted(i or "" for i in ids), "each job's write committed once"


async def test_cancelling_the_workers_task_shuts_it_down_gracefully(app: Queue) -> None:
    """A lifespan that cancels ``worker.run_async()``: the running handler finishes within
    the grace and is settled; then the task ends cancelled."""
    started = asyncio.Event()
    handlers = Handlers()

    @handlers.register("short")
    async def short(ctx: AsyncJobContext) -> None:
        started.set()
        await asyncio.sleep(0.3)

    job_id = app.enqueue(NewJob("short"))
    worker = Worker(app, handlers, gates=(), shutdown_grace_s=30)
    task = asyncio.get_running_loop().create_task(worker.run_async())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    job = app.get_job(job_id or "")
    assert job is not None and job.status is JobStatus.DONE


async def test_past_the_grace_an_async_run_is_cancelled_and_its_lease_given_back(
    app: Queue, engine: Engine
) -> None:
    cancelled = threading.Event()
    started = asyncio.Event()
    handlers = Handlers()

    @handlers.register("stuck")
    async def stuck(ctx: AsyncJobContext) -> None:
        ctx.session.add(Visit(job_id=ctx.job.id))
        await ctx.session.flush()
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    job_id = app.enqueue(NewJob("stuck"))
    async with Worker(app, handlers, gates=(), shutdown_grace_s=0.2):
        await asyncio.wait_for(started.wait(), 30)
    assert cancelled.is_set(), "the handler's task was cancelled at the end of the grace"
    job = app.get_job(job_id or "")
    assert job is not None and job.status is JobStatus.READY
    assert job.attempts == 0 and job.lease_token is None
    assert visits(engine) == [], "its write rolled back"


async def test_a_slow_handler_does_not_hold_up_the_others_or_the_loop(app: Queue) -> None:
    """Four handlers sleeping on the loop at once: the worker runs them concurrently, and
    the application's own coroutines keep running meanwhile."""
    handlers = Handlers()
    active, peak = [0], [0]

    @handlers.register("nap")
    async def nap(ctx: AsyncJobContext) -> None:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        await asyncio.sleep(0.5)
        active[0] -= 1

    app.enqueue_many(NewJob("nap", n) for n in range(4))
    ticks = 0
    async with Worker(app, handlers, gates=(), concurrency=4, poll_interval_s=0.05):
        deadline = time.monotonic() + 30
        while app.count_by_status(JobStatus.DONE) < 4 and time.monotonic() < deadline:
            ticks += 1
            await asyncio.sleep(0.01)
    assert peak[0] == 4
    assert ticks > 20, "the application's loop kept running while the handlers slept"


def test_an_async_handlers_session_can_come_from_the_application(
    app: Queue, engine: Engine, db_url: str
) -> None:
    """``async_session_factory``: the application's own ``async_sessionmaker``; its session
    is still the job's settlement transaction."""
    # The sessions run on the worker's loop, which is gone when the test disposes of the
    # engine: no pool, so no connection outlives the loop it was made on (aiomysql cannot
    # close one from another loop).
    app_engine = create_async_engine(_async_url(db_url), poolclass=NullPool)
    factory = async_sessionmaker(app_engine, expire_on_commit=False)
    made: list[AsyncSession] = []
    handlers = Handlers()

    @handlers.register("count")
    async def count(ctx: AsyncJobContext) -> None:
        made.append(ctx.session)
        ctx.session.add(Visit(job_id=ctx.job.id))
        assert await ctx.session.scalar(select(func.count()).select_from(Visit)) is not None

    job_id = app.enqueue(NewJob("count"))
    worker = Worker(app, handlers, gates=(), async_session_factory=factory)
    try:
        assert worker.run_until_idle() == 1
    finally:
        asyncio.run(app_engine.dispose())
    assert len(made) == 1 and made[0].bind is app_engine
    assert visits(engine) == [job_id]


def test_an_async_context_has_no_sync_session(app: Queue) -> None:
    """``ctx.session`` of an async handler is an ``AsyncSession``; the sync one is refused
    loudly rather than opening a second transaction."""
    errors: list[BaseException] = []
    handlers = Handlers()

    @handlers.register("k")
    async def k(ctx: AsyncJobContext) -> None:
        assert isinstance(ctx.session, AsyncSession)
        try:
            JobContext.session.fget(ctx)  # type: ignore[attr-defined]
        except ConfigurationError as exc:
            errors.append(exc)

    app.enqueue(NewJob("k"))
    assert Worker(app, handlers, gates=()).run_until_idle() == 1
    assert len(errors) == 1 and "AsyncSession" in str(errors[0])


async def test_a_queue_on_the_applications_async_engine(engine: Engine, db_url: str) -> None:
    """An application with only an ``AsyncEngine``: ``Queue(async_engine)`` runs memtree's
    own statements on a synchronous engine to the same database, and on PostgreSQL its
    async handlers' sessions share the application's engine."""
    Base.metadata.create_all(engine)
    app_engine = memtree.configure_engine(create_async_engine(memtree.async_url(db_url)))
    queue = Queue(app_engine)
    await asyncio.to_thread(queue.migrate)
    binds: list[object] = []
    handlers = Handlers()

    @handlers.register("visit")
    async def visit(ctx: AsyncJobContext) -> None:
        binds.append(ctx.session.bind)
        ctx.session.add(Visit(job_id=ctx.job.id))

    try:
        assert queue.async_engine is app_engine and queue.engine.url.drivername in (
            "sqlite",
            "postgresql+psycopg",
            "mariadb+pymysql",
        )
        async with AsyncSession(app_engine) as session, session.begin():
            job_id = await memtree.enqueue_async(session, NewJob("visit"))
        async with Worker(queue, handlers, gates=(), poll_interval_s=0.05):
            await until(lambda: queue.count_by_status(JobStatus.DONE) == 1)
    finally:
        queue.close()
        await app_engine.dispose()
    assert visits(engine) == [job_id]
    shared = binds[0] is app_engine
    assert shared == (engine.dialect.name != "sqlite"), "SQLite's handlers get their own"


def test_a_queue_refuses_what_is_not_an_engine_or_a_url() -> None:
    with pytest.raises(ConfigurationError, match="Engine, an AsyncEngine or a database URL"):
        Queue(42)  # type: ignore[arg-type]
