"""memtree on an engine the application built itself, and the SQLite lock rule: memtree's
own transactions take the write lock up front on any engine, while a handler's session
holds it only from its first write to its commit."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import Engine, Integer, String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import memtree
from memtree import ConfigurationError, JobStatus, NewJob, Queue, Worker
from memtree.engine import _sqlite3_of
from memtree.worker import JobContext
from tests.flavors import Step, add, execute, flush, handler, in_session, sleep, wait


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "app_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String(100))


def pragma(engine: Engine, name: str) -> object:
    with engine.connect() as conn:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


def test_threads_claiming_on_the_applications_own_engine_settle_every_job_once(
    db_url: str,
) -> None:
    """Six threads looping claim_batch(7) then mark_done over 600 jobs on a plain
    ``sqlalchemy.create_engine`` engine: no "database is locked", every job done once."""
    engine = sqlalchemy.create_engine(memtree.engine.normalize_url(db_url))
    queue = Queue(engine)
    queue.migrate()
    queue.enqueue_many(NewJob("k", {"n": n}) for n in range(600))
    settled: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def claimer() -> None:
        try:
            while True:
                batch = queue.claim_batch(7)
                if not batch:
                    return
                for job in batch:
                    assert queue.mark_done(job)
                    with lock:
                        settled[job.id] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claimer) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert errors == []
        assert len(settled) == 600 and set(settled.values()) == {1}
        assert queue.count_by_status(JobStatus.DONE) == 600
    finally:
        engine.dispose()


@pytest.mark.sqlite
def test_queue_sets_up_the_applications_sqlite_engine_and_keeps_its_longer_timeout(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    plain = sqlalchemy.create_engine(url)
    assert pragma(plain, "busy_timeout") == 5000  # sqlite3's default
    Queue(plain)
    plain.dispose()
    assert pragma(plain, "busy_timeout") == memtree.engine.SQLITE_BUSY_TIMEOUT_MS
    assert pragma(plain, "journal_mode") == "wal"

    patient = sqlalchemy.create_engine(url, connect_args={"timeout": 60})
    Queue(patient)
    assert pragma(patient, "busy_timeout") == 60_000
    plain.dispose()
    patient.dispose()


@pytest.mark.sqlite
def test_configure_engine_can_keep_the_files_journal_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = memtree.configure_engine(sqlalchemy.create_engine(url), sqlite_journal_mode=None)
    queue = Queue(engine)  # already set up: Queue changes nothing more
    queue.migrate()
    queue.enqueue(NewJob("k"))
    assert pragma(engine, "journal_mode") == "delete"
    assert memtree.configure_engine(engine) is engine  # a second call does nothing
    assert pragma(engine, "journal_mode") == "delete"
    with pytest.raises(ConfigurationError, match="journal_mode"):
        memtree.configure_engine(sqlalchemy.create_engine(url), sqlite_journal_mode="fast")

    engine.dispose()
    own = memtree.create_engine(url, sqlite_journal_mode="TRUNCATE")
    assert pragma(own, "journal_mode") == "truncate"
    assert pragma(own, "synchronous") == 2, "a rollback journal needs synchronous=FULL"
    own.dispose()


@pytest.mark.sqlite
def test_memtrees_own_transaction_takes_the_write_lock_up_front_on_any_engine(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.db"
    queue = Queue(sqlalchemy.create_engine(f"sqlite:///{path}"))
    queue.migrate()
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    with queue.transaction(), pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    other.close()
    queue.engine.dispose()


@pytest.fixture(
    params=[
        pytest.param("memtree", id="memtree-engine"),
        pytest.param("app", id="app-engine"),
        pytest.param("keep", id="rollback-journal", marks=pytest.mark.sqlite),
    ]
)
def lock_rule_engine(request: pytest.FixtureRequest, db_url: str) -> Iterator[Engine]:
    if request.param == "keep" and not db_url.startswith("sqlite"):
        pytest.skip("journal modes are SQLite's")
    if request.param == "memtree":
        engine = memtree.create_engine(db_url)
    elif request.param == "app":
        engine = sqlalchemy.create_engine(memtree.engine.normalize_url(db_url))
    else:
        engine = memtree.create_engine(db_url, sqlite_journal_mode=None)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("custom_factory", [False, True], ids=["default-session", "sessionmaker"])
def test_a_handler_that_reads_then_waits_does_not_hold_the_write_lock(
    lock_rule_engine: Engine, custom_factory: bool, executor: str
) -> None:
    """The README's pattern: read through ``ctx.session``, wait on an external call, then
    write. Meanwhile the application's own enqueue and domain write commit promptly; the
    handler's write still commits with the job's completion."""
    if custom_factory and executor == "asyncio":
        pytest.skip("session_factory builds sync handlers' sessions")
    engine = lock_rule_engine
    Base.metadata.create_all(engine)
    queue = Queue(engine)
    queue.migrate()
    queue.enqueue(NewJob("slow"))
    has_read, may_go_on = threading.Event(), threading.Event()

    def slow(ctx: JobContext) -> Iterator[Step]:
        yield execute(select(func.count()).select_from(Note))
        has_read.set()
        assert (yield wait(may_go_on, 60)), "the test never let the handler go on"
        yield add(Note(text=f"written by {ctx.job.id}"))

    factory = sessionmaker(bind=engine, expire_on_commit=False) if custom_factory else None
    worker = Worker(queue, {"slow": handler(executor, slow)}, gates=(), session_factory=factory)
    runner = threading.Thread(target=worker.run_until_idle)
    runner.start()
    try:
        assert has_read.wait(30)
        started = time.monotonic()
        with Session(engine) as session, session.begin():
            session.add(Note(text="the application's own write"))
            memtree.enqueue(session, NewJob("later", {"n": 1}))
        waited = time.monotonic() - started
    finally:
        may_go_on.set()
        runner.join(60)
    # Before, this waited for the busy timeout (15 s) and then failed.
    assert waited < 5, f"the application's write waited {waited:.1f} s for the handler"
    with Session(engine) as session:
        notes = sorted(session.scalars(select(Note.text)))
    assert len(notes) == 2 and notes[0] == "the application's own write"
    assert queue.count_by_status(JobStatus.DONE) == 1


def test_a_handler_session_holds_the_write_lock_from_its_first_write_to_the_commit(
    engine: Engine, db_url: str, executor: str
) -> None:
    """The rule's other half: once the handler wrote, its transaction is a writer's, so
    its reads after the write see its own write and the job completes with it."""
    Base.metadata.create_all(engine)
    queue = Queue(engine)
    queue.migrate()
    queue.enqueue(NewJob("write_then_read"))
    seen: list[int] = []

    def write_then_read(ctx: JobContext) -> Iterator[Step]:
        yield add(Note(text="mine"))
        yield flush()
        seen.append((yield execute(select(func.count()).select_from(Note))).scalar() or 0)
        if db_url.startswith("sqlite"):

            def in_a_transaction(session: Session) -> bool:
                raw = session.connection().connection.dbapi_connection
                return bool(_sqlite3_of(raw).in_transaction)

            assert (yield in_session(in_a_transaction))

    worker = Worker(queue, {"write_then_read": handler(executor, write_then_read)}, gates=())
    assert worker.run_until_idle() == 1
    assert seen == [1]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT text FROM app_notes")).scalars().all() == ["mine"]


class Tally(Base):
    __tablename__ = "app_tallies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)


def test_handlers_that_read_for_update_then_write_lose_no_update(
    db_url: str, executor: str
) -> None:
    """Code written for PostgreSQL (lock the row FOR UPDATE, then change it) keeps its
    meaning on SQLite: there the FOR UPDATE read begins the write transaction."""
    engine = memtree.create_engine(db_url)
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add(Tally(id=1, n=0))
    queue = Queue(engine)
    queue.migrate()
    queue.enqueue_many(NewJob("bump", {"n": n}) for n in range(40))

    def bump(ctx: JobContext) -> Iterator[Step]:
        counter = (yield execute(select(Tally).with_for_update())).scalars().one()
        seen = counter.n
        yield sleep(0.002)  # another handler's turn, if the read did not lock
        counter.n = seen + 1

    worker = Worker(queue, {"bump": handler(executor, bump)}, gates=(), concurrency=4)
    try:
        assert worker.run_until_idle() == 40
        with Session(engine) as session:
            assert session.get(Tally, 1).n == 40  # type: ignore[union-attr]
    finally:
        engine.dispose()
