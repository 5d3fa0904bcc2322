"""Enqueue and settle in the application's own transaction: commit keeps both, rollback neither."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, String, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import memtree
from memtree import JobStatus, NewJob, Queue, wakeup


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str] = mapped_column(String(100))


@pytest.fixture
def app_queue(queue: Queue, engine: Engine) -> Queue:
    Base.metadata.create_all(engine)
    return queue


def orders(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(select(Order.note).order_by(Order.id)))


def test_domain_row_and_job_commit_together(app_queue: Queue, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        session.add(Order(note="paid"))
        job_id = memtree.enqueue(session, NewJob("send_receipt", {"order": 1}))
    assert orders(engine) == ["paid"]
    assert app_queue.get_job(job_id or "") is not None


def test_rollback_leaves_neither_domain_row_nor_job(app_queue: Queue, engine: Engine) -> None:
    with Session(engine) as session:
        session.add(Order(note="doomed"))
        assert memtree.enqueue(session, NewJob("send_receipt", {"order": 2})) is not None
        session.rollback()
    assert orders(engine) == []
    assert app_queue.count_total() == 0


def test_exception_inside_the_unit_of_work_rolls_the_job_back(
    app_queue: Queue, engine: Engine
) -> None:
    with pytest.raises(RuntimeError), Session(engine) as session, session.begin():
        session.add(Order(note="half"))
        memtree.enqueue_many(session, [NewJob("a"), NewJob("b")])
        raise RuntimeError("payment declined")
    assert orders(engine) == [] and app_queue.count_total() == 0


def test_enqueue_on_a_connection_in_the_callers_transaction(
    app_queue: Queue, engine: Engine
) -> None:
    with engine.connect() as conn:
        memtree.enqueue(conn, NewJob("k"))
        conn.rollback()
        memtree.enqueue(conn, NewJob("k", {"kept": True}))
        conn.commit()
    assert app_queue.count_total() == 1


def test_mark_done_commits_with_the_handlers_writes(app_queue: Queue, engine: Engine) -> None:
    app_queue.enqueue(NewJob("ship", {"order": 7}))
    job = app_queue.claim_next()
    assert job is not None
    with Session(engine) as session, session.begin():
        session.add(Order(note="shipped"))
        assert memtree.mark_done(session, job, [NewJob("notify", {"order": 7})])
    assert orders(engine) == ["shipped"]
    assert app_queue.count_by_status(JobStatus.DONE) == 1
    assert app_queue.count_by_status(JobStatus.READY) == 1


def test_mark_done_on_a_lost_lease_lets_the_caller_roll_back(
    app_queue: Queue, engine: Engine
) -> None:
    app_queue.enqueue(NewJob("ship"))
    job = app_queue.claim_next(lock_duration_ms=-1)
    assert job is not None
    app_queue.recover_stale_locks()
    with Session(engine) as session:
        session.add(Order(note="twice"))
        if not memtree.mark_done(session, job, [NewJob("notify")]):
            session.rollback()
        else:  # pragma: no cover - the assertion below fails the test
            session.commit()
    assert orders(engine) == []
    assert app_queue.count_total() == 1
    assert app_queue.count_by_status(JobStatus.READY) == 1


def test_rolled_back_mark_done_leaves_the_job_running(app_queue: Queue, engine: Engine) -> None:
    app_queue.enqueue(NewJob("ship"))
    job = app_queue.claim_next()
    assert job is not None
    with Session(engine) as session:
        assert memtree.mark_done(session, job)
        session.rollback()
    assert app_queue.count_by_status(JobStatus.RUNNING) == 1
    assert app_queue.mark_done(job), "the lease is still held after the rollback"


def _async_url(db_url: str) -> str:
    return memtree.async_url(db_url).render_as_string(hide_password=False)


async def test_enqueue_async_commits_and_rolls_back_with_the_async_session(
    app_queue: Queue, db_url: str
) -> None:
    async_engine = create_async_engine(_async_url(db_url))
    try:
        async with AsyncSession(async_engine) as session:
            session.add(Order(note="async-doomed"))
            assert await memtree.enqueue_async(session, NewJob("k", {"n": 1})) is not None
            await session.rollback()
        async with AsyncSession(async_engine) as session, session.begin():
            session.add(Order(note="async-paid"))
            job_id = await memtree.enqueue_async(session, NewJob("k", {"n": 2}, dedupe_key="d"))
            assert await memtree.enqueue_async(session, NewJob("k", dedupe_key="d")) is None
        async with async_engine.connect() as conn:
            assert await memtree.enqueue_async(conn, NewJob("k", {"n": 3})) is not None
            await conn.commit()
    finally:
        await async_engine.dispose()
    assert orders(app_queue.engine) == ["async-paid"]
    stored = app_queue.get_job(job_id or "")
    assert stored is not None and stored.payload == {"n": 2}
    assert app_queue.count_total() == 2


# -- waking this process's workers ----------------------------------------------------------


@pytest.fixture
def woken(app_queue: Queue, engine: Engine) -> Iterator[threading.Event]:
    """What an idle worker of this process waits on."""
    wake = threading.Event()
    wakeup.subscribe(engine, wake)
    try:
        yield wake
    finally:
        wakeup.unsubscribe(engine, wake)


def test_an_enqueue_wakes_workers_when_its_session_commits_not_before(
    engine: Engine, woken: threading.Event
) -> None:
    with Session(engine) as session, session.begin():
        memtree.enqueue(session, NewJob("k"))
        assert not woken.is_set()
    assert woken.is_set()


def test_an_enqueue_many_wakes_workers_when_its_session_commits_not_before(
    engine: Engine, woken: threading.Event
) -> None:
    with Session(engine) as session, session.begin():
        memtree.enqueue_many(session, [NewJob("k"), NewJob("k")])
        assert not woken.is_set()
    assert woken.is_set()


def test_a_rolled_back_enqueue_wakes_no_worker_even_at_the_sessions_next_commit(
    engine: Engine, woken: threading.Event
) -> None:
    with Session(engine) as session:
        memtree.enqueue(session, NewJob("k"))
        session.rollback()
        session.add(Order(note="later"))
        session.commit()
    assert not woken.is_set()


def test_an_enqueue_in_a_released_savepoint_wakes_workers_at_the_outer_commit(
    engine: Engine, woken: threading.Event
) -> None:
    with Session(engine) as session, session.begin():
        with session.begin_nested():
            memtree.enqueue(session, NewJob("k"))
        assert not woken.is_set(), "a released savepoint has committed nothing yet"
    assert woken.is_set()


def test_a_suppressed_enqueue_wakes_no_worker(
    app_queue: Queue, engine: Engine, woken: threading.Event
) -> None:
    app_queue.enqueue(NewJob("k", dedupe_key="held"))
    woken.clear()
    with Session(engine) as session, session.begin():
        assert memtree.enqueue(session, NewJob("k", dedupe_key="held")) is None
    assert not woken.is_set()
