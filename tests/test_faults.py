"""The worker when the database fails underneath it: a handler whose ``ctx.session`` cannot
connect or loses its connection (released, not failed), and a SQLite file deleted or
replaced under a running worker (it stops).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import Engine, make_url, text
from sqlalchemy.orm import Session, sessionmaker

import memtree
from memtree import JobFailure, JobStatus, NewJob, Queue
from memtree.testing import FakeClock
from memtree.worker import (
    INFRASTRUCTURE_RETRY_BASE_MS,
    Handlers,
    JobContext,
    Worker,
    is_infrastructure_error,
)
from tests.conftest import START_MS

# -- helpers ---------------------------------------------------------------------------


def unreachable_url(engine: Engine) -> str:
    """A database of the same kind that cannot be opened: a closed port, a missing directory."""
    if engine.dialect.name == "sqlite":
        return f"sqlite:////nonexistent-{uuid.uuid4().hex}/memtree.db"
    return "postgresql://root@127.0.0.1:1/nowhere"


def selecting(runs: list[int]) -> Handlers:
    """A handler that reads through ``ctx.session``, recording the attempt of each run."""
    handlers = Handlers()

    @handlers.register("reads")
    def reads(ctx: JobContext) -> None:
        runs.append(ctx.job.attempts)
        ctx.session.execute(text("SELECT 1"))

    return handlers


def sessions(*engines: Engine) -> Callable[[], Session]:
    """A session factory binding its n-th session to the n-th engine, then to the last."""
    made = iter(engines[:-1])

    def factory() -> Session:
        return Session(bind=next(made, engines[-1]))

    return factory


def run_once(worker: Worker, clock: FakeClock) -> None:
    """Move the fake clock to the next due job and work until idle again."""
    due = worker.queue.next_due_ms()
    if due is not None:
        clock.set(max(due, clock.now_ms))
    worker.run_until_idle()


def job_of(queue: Queue, job_id: str | None) -> memtree.Job:
    job = queue.get_job(job_id or "")
    assert job is not None
    return job


# -- infrastructure errors -------------------------------------------------------------


def test_a_run_whose_session_cannot_connect_is_released_without_spending_an_attempt(
    queue: Queue, engine: Engine, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    broken = memtree.create_engine(unreachable_url(engine))
    runs: list[int] = []
    job_id = queue.enqueue(NewJob("reads", max_attempts=2))
    worker = Worker(
        queue, selecting(runs), gates=(), session_factory=sessions(broken, broken, broken, engine)
    )
    try:
        with caplog.at_level(logging.WARNING, logger="memtree.worker"):
            for expected_delay_ms in (1_000, 2_000, 4_000):
                released_at = clock.now_ms
                run_once(worker, clock)
                job = job_of(queue, job_id)
                assert (job.status, job.attempts) == (JobStatus.READY, 0), "no attempt spent"
                assert job.available_at_ms == clock.now_ms + expected_delay_ms
                assert job.last_error is not None
                assert clock.now_ms >= released_at
            run_once(worker, clock)
    finally:
        broken.dispose()
    job = job_of(queue, job_id)
    assert (job.status, job.attempts) == (JobStatus.DONE, 1)
    assert runs == [1, 1, 1, 1], "every run was the job's first attempt"
    released = [r for r in caplog.records if "could not be reached" in r.getMessage()]
    assert len(released) == 3 and all(r.levelno == logging.WARNING for r in released)
    assert not [r for r in caplog.records if r.getMessage().startswith(f"job {job_id} failed")]


def test_a_database_that_stays_unreachable_spends_an_attempt_after_the_release_limit(
    queue: Queue, engine: Engine, clock: FakeClock
) -> None:
    """Not an invisible loop: after ``max_infrastructure_releases`` releases in a row, the
    next such run counts as a failure."""
    broken = memtree.create_engine(unreachable_url(engine))
    runs: list[int] = []
    job_id = queue.enqueue(NewJob("reads", max_attempts=1))
    worker = Worker(
        queue,
        selecting(runs),
        gates=(),
        max_infrastructure_releases=2,
        session_factory=sessions(broken),
    )
    try:
        for _ in range(6):
            run_once(worker, clock)
    finally:
        broken.dispose()
    job = job_of(queue, job_id)
    assert (job.status, job.attempts) == (JobStatus.FAILED, 1)
    assert len(runs) == 3, "two releases, then one failure with the only attempt"
    assert job.last_error is not None and "OperationalError" in job.last_error


def test_with_no_infrastructure_releases_an_unreachable_session_fails_the_run(
    queue: Queue, engine: Engine, clock: FakeClock
) -> None:
    broken = memtree.create_engine(unreachable_url(engine))
    job_id = queue.enqueue(NewJob("reads", max_attempts=1))
    worker = Worker(
        queue,
        selecting([]),
        gates=(),
        max_infrastructure_releases=0,
        session_factory=sessions(broken),
    )
    try:
        run_once(worker, clock)
    finally:
        broken.dispose()
    assert job_of(queue, job_id).status is JobStatus.FAILED


@pytest.mark.parametrize("value", [-1, 1.5, True, None])
def test_max_infrastructure_releases_is_validated_when_the_worker_is_built(
    queue: Queue, value: object
) -> None:
    with pytest.raises(memtree.ConfigurationError, match="max_infrastructure_releases"):
        Worker(queue, selecting([]), max_infrastructure_releases=value)  # type: ignore[arg-type]


def test_mark_released_gives_the_attempt_back_only_to_the_claim_it_came_from(
    queue: Queue, clock: FakeClock
) -> None:
    """No age cap either: a job older than the defer-age cap is released, not failed."""
    job_id = queue.enqueue(NewJob("reads", max_attempts=3))
    clock.advance(queue.max_defer_age_ms + 1)
    stale = queue.claim_next(lock_duration_ms=-1)
    assert stale is not None
    assert queue.recover_stale_locks() == 1
    current = queue.claim_next()
    assert current is not None and (current.id, current.attempts) == (job_id, 2)
    assert not queue.mark_released(stale, clock.now_ms + 5, "gone"), "a stale claim"
    assert queue.mark_released(current, clock.now_ms + 5, ConnectionError("too many clients"))
    job = job_of(queue, job_id)
    assert (job.status, job.attempts, job.available_at_ms) == (JobStatus.READY, 1, clock.now_ms + 5)
    assert job.last_error == "ConnectionError: too many clients"
    assert job.lease_token is None and job.started_at_ms is None


def operational(message: str) -> memtree.DatabaseError:
    """A driver error as memtree's store boundary hands it on."""
    error = memtree.DatabaseError(message)
    error.__cause__ = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception(message))
    return error


@pytest.mark.parametrize(
    ("error", "infrastructure"),
    [
        (operational("sorry, too many clients already"), True),
        (operational('too many connections for role "app"'), True),
        (operational("connection failed: Connection refused"), True),
        (operational("terminating connection due to administrator command"), True),
        (operational("the database system is starting up"), True),
        (operational("server closed the connection unexpectedly"), True),
        (operational("unable to open database file"), True),
        (operational("disk I/O error"), True),
        (sqlalchemy.exc.DisconnectionError("gone"), True),
        (operational("deadlock detected"), False),
        (operational("database is locked"), False),
        (ValueError("connection failed"), False),
        (sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key")), False),
    ],
)
def test_only_connection_failures_are_infrastructure_errors(
    error: BaseException, infrastructure: bool
) -> None:
    assert is_infrastructure_error(error) is infrastructure


def test_a_connection_failure_the_handler_wrapped_is_still_infrastructure() -> None:
    try:
        try:
            raise operational("sorry, too many clients already")
        except memtree.DatabaseError as exc:
            raise RuntimeError("could not load the order") from exc
    except RuntimeError as wrapped:
        assert is_infrastructure_error(wrapped)


def test_a_job_failure_the_handler_raised_is_its_own_verdict() -> None:
    try:
        try:
            raise operational("sorry, too many clients already")
        except memtree.DatabaseError as exc:
            raise JobFailure.unrecoverable("customer_db_gone") from exc
    except JobFailure as verdict:
        assert not is_infrastructure_error(verdict)


# -- PostgreSQL: a role with a connection limit, a connection killed at commit ---------


@pytest.fixture
def pg_queue(pg_server_url: str) -> Iterator[Queue]:
    """A migrated queue on the PostgreSQL test database, on a fake clock."""
    admin = sqlalchemy.create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    admin.dispose()
    engine = memtree.create_engine(pg_server_url)
    queue = Queue(engine, clock=FakeClock(START_MS))
    queue.migrate()
    try:
        yield queue
    finally:
        engine.dispose()


@pytest.fixture
def limited_role(pg_queue: Queue) -> Iterator[str]:
    """A role allowed one connection at a time, with the rights a handler's session needs."""
    role = f"memtree_limited_{uuid.uuid4().hex[:8]}"
    with pg_queue.engine.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 1'))
        conn.execute(text(f'GRANT USAGE ON SCHEMA public TO "{role}"'))
        conn.execute(text(f'GRANT ALL ON mem_tree_jobs TO "{role}"'))
        conn.commit()
    try:
        yield role
    finally:
        with pg_queue.engine.connect() as conn:
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE "{role}"'))
            conn.commit()


@pytest.mark.postgresql
def test_too_many_clients_for_the_handlers_session_spends_no_attempt(
    pg_queue: Queue, limited_role: str
) -> None:
    """The issue's 40 workers against ``max_connections=30``, in small: the handler's role
    has one connection, and another session holds it."""
    clock = pg_queue._clock
    assert isinstance(clock, FakeClock)
    url = make_url(str(pg_queue.engine.url.render_as_string(hide_password=False)))
    limited = memtree.create_engine(url.set(username=limited_role))
    hog = limited.connect()
    hog.execute(text("SELECT 1"))
    runs: list[int] = []
    job_id = pg_queue.enqueue(NewJob("reads", max_attempts=1))
    worker = Worker(pg_queue, selecting(runs), gates=(), session_factory=sessionmaker(limited))
    try:
        for _ in range(3):
            run_once(worker, clock)
            job = job_of(pg_queue, job_id)
            assert (job.status, job.attempts) == (JobStatus.READY, 0)
            assert "too many connections" in (job.last_error or "")
        hog.close()  # the connection comes free
        run_once(worker, clock)
    finally:
        hog.close()
        limited.dispose()
    job = job_of(pg_queue, job_id)
    assert (job.status, job.attempts) == (JobStatus.DONE, 1)
    assert len(runs) == 4


@pytest.mark.postgresql
def test_a_connection_lost_before_the_completion_commits_spends_no_attempt(
    pg_queue: Queue, pg_server_url: str
) -> None:
    clock = pg_queue._clock
    assert isinstance(clock, FakeClock)
    admin = sqlalchemy.create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    runs: list[int] = []
    handlers = Handlers()

    @handlers.register("killed")
    def killed(ctx: JobContext) -> None:
        runs.append(ctx.job.attempts)
        pid = ctx.session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        if len(runs) == 1:  # the server drops this session's connection before the commit
            with admin.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    job_id = pg_queue.enqueue(NewJob("killed", max_attempts=1))
    worker = Worker(pg_queue, handlers, gates=())
    try:
        run_once(worker, clock)
        job = job_of(pg_queue, job_id)
        assert (job.status, job.attempts) == (JobStatus.READY, 0)
        assert job.available_at_ms == clock.now_ms + INFRASTRUCTURE_RETRY_BASE_MS
        run_once(worker, clock)
    finally:
        admin.dispose()
    job = job_of(pg_queue, job_id)
    assert (job.status, job.attempts) == (JobStatus.DONE, 1)
    assert runs == [1, 1]


# -- a SQLite file deleted or replaced under a running worker ---------------------------


def remove_database_files(path: Path) -> None:
    """``rm memtree.db memtree.db-wal memtree.db-shm``: the open connections keep theirs."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def migrated_file(path: Path) -> Queue:
    queue = Queue(memtree.create_engine(f"sqlite:///{path}"))
    queue.migrate()
    return queue


class Held:
    """Handlers that start, tell the test, and wait for it; ``uses_session`` runs one that
    writes through ``ctx.session`` (settled in the handler's thread), otherwise one that
    does not (settled by the loop in a batch)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        self.handlers = Handlers()
        for kind, uses_session in (("plain", False), ("transactional", True)):
            self.handlers.register(kind)(self._handler(uses_session))

    def _handler(self, uses_session: bool) -> Callable[[JobContext], None]:
        def handler(ctx: JobContext) -> None:
            self.started.set()
            assert self.go.wait(30)
            if uses_session:
                ctx.session.execute(text("SELECT 1"))

        return handler


class WorkerThread(threading.Thread):
    def __init__(self, worker: Worker) -> None:
        super().__init__(daemon=True)
        self.worker = worker
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.worker.run(install_signal_handlers=False)
        except BaseException as exc:  # the test looks at it
            self.error = exc


def status_in(conn: sqlite3.Connection, job_id: str | None) -> tuple[str, int] | None:
    row = conn.execute(
        "SELECT status, attempts FROM mem_tree_jobs WHERE id = ?", (job_id,)
    ).fetchone()
    return None if row is None else (row[0], row[1])


@pytest.mark.sqlite
@pytest.mark.parametrize("kind", ["plain", "transactional"])
@pytest.mark.parametrize("change", ["deleted", "replaced by another file"])
def test_a_worker_stops_when_its_sqlite_file_changes_and_settles_nothing_more(
    tmp_path: Path, kind: str, change: str
) -> None:
    path = tmp_path / "memtree.db"
    queue = migrated_file(path)
    held = Held()
    job_id = queue.enqueue(NewJob(kind))
    # Reads the original file after it is gone: it holds its own descriptors of it.
    witness = sqlite3.connect(path)
    assert status_in(witness, job_id) == ("ready", 0)
    worker = Worker(queue, held.handlers, gates=(), poll_interval_s=0.05, shutdown_grace_s=30)
    thread = WorkerThread(worker)
    thread.start()
    replacement: tuple[str | None, Path] | None = None
    try:
        assert held.started.wait(30)
        assert status_in(witness, job_id) == ("running", 1)
        if change == "deleted":
            remove_database_files(path)
        else:
            other = migrated_file(tmp_path / "restored.db")
            theirs = other.enqueue(NewJob(kind))
            other.engine.dispose()
            remove_database_files(path)
            os.replace(tmp_path / "restored.db", path)
            replacement = (theirs, path)
        time.sleep(0.3)  # a few polls: the worker notices before the handler returns
        held.go.set()
        thread.join(10)
        assert not thread.is_alive(), "the worker did not stop"
    finally:
        held.go.set()
        worker.stop()
        thread.join(30)
    assert isinstance(thread.error, memtree.DatabaseFileChangedError)
    assert thread.error.change == change and thread.error.path == str(path)
    assert status_in(witness, job_id) == ("running", 1), "nothing settled into the old file"
    witness.close()
    if replacement is not None:
        theirs, restored = replacement
        new = sqlite3.connect(restored)
        try:
            assert status_in(new, theirs) == ("ready", 0), "nothing claimed from the new file"
            assert status_in(new, job_id) is None
        finally:
            new.close()
    queue.engine.dispose()


@pytest.mark.sqlite
def test_an_idle_worker_notices_its_sqlite_file_deleted_within_a_poll(tmp_path: Path) -> None:
    path = tmp_path / "memtree.db"
    queue = migrated_file(path)
    worker = Worker(queue, Held().handlers, gates=(), poll_interval_s=0.05)
    thread = WorkerThread(worker)
    thread.start()
    try:
        time.sleep(0.2)
        remove_database_files(path)
        thread.join(10)
        assert not thread.is_alive(), "the worker did not stop"
    finally:
        worker.stop()
        thread.join(30)
        queue.engine.dispose()
    assert isinstance(thread.error, memtree.DatabaseFileChangedError)
    assert "deleted" in str(thread.error)


@pytest.mark.sqlite
@pytest.mark.slow
def test_memtree_worker_exits_non_zero_when_its_sqlite_file_is_deleted(tmp_path: Path) -> None:
    path = tmp_path / "memtree.db"
    migrated_file(path).engine.dispose()
    (tmp_path / "idle_app.py").write_text("handlers = {'nothing': lambda ctx: None}\n")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "memtree"),
            "--database-url",
            f"sqlite:///{path}",
            "worker",
            "--app",
            "idle_app:handlers",
            "--poll-interval",
            "0.05",
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()  # the banner: the worker is up
        assert "memtree worker" in first, first
        time.sleep(0.3)
        remove_database_files(path)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 1
    assert "was deleted while the worker ran" in stderr
    assert "Traceback" not in stderr
