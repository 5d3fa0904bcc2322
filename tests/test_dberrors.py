"""memtree.dberrors: real driver errors, provoked cheaply, classified into one Fault each."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import Engine, text

import memtree
from memtree import JobFailure, NewJob, Queue
from memtree.dberrors import (
    Fault,
    FaultKind,
    classify,
    classify_error,
    is_infrastructure_error,
    translate,
)


def raised(operation: object, *args: object) -> BaseException:
    """The exception ``operation(*args)`` raises."""
    with pytest.raises(Exception) as info:
        operation(*args)  # type: ignore[operator]
    return info.value


def statement_error(engine: Engine, sql: str) -> sqlalchemy.exc.DBAPIError:
    """The SQLAlchemy error one statement raises, as a handler's own session would see it."""
    with engine.connect() as conn:
        error = raised(conn.execute, text(sql))
    assert isinstance(error, sqlalchemy.exc.DBAPIError)
    return error


# -- a missing table, on every database --------------------------------------------------


def test_a_missing_memtree_table_is_schema_missing_and_translates_to_schema_missing_error(
    engine: Engine,
) -> None:
    error = statement_error(engine, "SELECT id FROM mem_tree_jobs")
    assert classify(error).kind is FaultKind.SCHEMA_MISSING
    assert isinstance(translate(error), memtree.SchemaMissingError)


def test_enqueue_in_the_callers_session_on_an_empty_database_raises_schema_missing(
    engine: Engine,
) -> None:
    with engine.begin() as conn:
        error = raised(memtree.enqueue, conn, NewJob("k"))
    assert isinstance(error, memtree.SchemaMissingError)
    assert isinstance(error.__cause__, sqlalchemy.exc.DBAPIError), "the driver's error is kept"


def test_a_handlers_own_missing_table_is_not_memtrees_schema(engine: Engine) -> None:
    error = statement_error(engine, "SELECT id FROM orders")
    fault = classify(error)
    assert fault.kind is not FaultKind.SCHEMA_MISSING and not fault.infrastructure
    translated = translate(error)
    assert type(translated) is memtree.DatabaseError and translated.fault == fault


def test_a_missing_column_of_a_newer_schema_is_schema_missing(engine: Engine) -> None:
    with engine.begin() as conn:
        key = "VARCHAR(255)" if engine.dialect.name in ("mysql", "mariadb") else "TEXT"
        conn.execute(text(f"CREATE TABLE mem_tree_jobs (id {key} PRIMARY KEY)"))
    error = statement_error(engine, "SELECT heal_count FROM mem_tree_jobs")
    assert classify(error).kind is FaultKind.SCHEMA_MISSING


# -- a database that cannot be reached ---------------------------------------------------


def unreachable(engine: Engine) -> str:
    if engine.dialect.name == "sqlite":
        return f"sqlite:////nonexistent-{uuid.uuid4().hex}/memtree.db"
    return "postgresql+psycopg://root@127.0.0.1:1/nowhere"  # nothing listens on port 1


def test_a_refused_connection_is_an_infrastructure_connection_fault(engine: Engine) -> None:
    lost = sqlalchemy.create_engine(unreachable(engine))
    try:
        error = raised(lost.connect)
    finally:
        lost.dispose()
    assert classify(error) == Fault(FaultKind.CONNECTION, infrastructure=True)
    assert classify_error(error) == ("I/O", 1.0)


def test_a_queue_that_cannot_connect_raises_a_database_error_carrying_its_fault(
    engine: Engine,
) -> None:
    queue = Queue(unreachable(engine))
    try:
        error = raised(queue.count_total)
    finally:
        queue.engine.dispose()
    assert isinstance(error, memtree.DatabaseError)
    assert error.fault == Fault(FaultKind.CONNECTION, infrastructure=True)
    assert is_infrastructure_error(error)


def test_a_connection_failure_under_a_job_failure_is_not_infrastructure(engine: Engine) -> None:
    lost = sqlalchemy.create_engine(unreachable(engine))
    try:
        try:
            try:
                lost.connect()
            except sqlalchemy.exc.OperationalError as exc:
                raise JobFailure.unrecoverable("customer_db_gone") from exc
        except JobFailure as verdict:
            fault = classify(verdict)
    finally:
        lost.dispose()
    assert fault == Fault(FaultKind.CONNECTION, infrastructure=False)


# -- SQLite: a locked file, a full disk ---------------------------------------------------


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "memtree.db"


@pytest.mark.sqlite
def test_a_locked_sqlite_file_is_busy_not_infrastructure(sqlite_path: Path) -> None:
    queue = Queue(memtree.create_engine(f"sqlite:///{sqlite_path}", sqlite_busy_timeout_ms=0))
    queue.migrate()
    other = sqlite3.connect(sqlite_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        error = raised(queue.enqueue, NewJob("k"))
        other.execute("ROLLBACK")
    finally:
        other.close()
        queue.engine.dispose()
    assert isinstance(error, memtree.DatabaseError)
    assert error.fault == Fault(FaultKind.BUSY, infrastructure=False)
    assert classify_error(error) == ("busy", 0.1)


@pytest.mark.sqlite
def test_a_full_sqlite_database_is_disk_full(sqlite_path: Path) -> None:
    engine = sqlalchemy.create_engine(f"sqlite:///{sqlite_path}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x BLOB)"))
        with engine.connect() as conn:
            conn.execute(text("PRAGMA max_page_count = 3"))
            error = raised(conn.execute, text("INSERT INTO t VALUES (zeroblob(100000))"))
    finally:
        engine.dispose()
    assert classify(error) == Fault(FaultKind.DISK_FULL, infrastructure=False)
    assert classify_error(error) == ("disk full", 30.0)


# -- PostgreSQL: a deadlock ---------------------------------------------------------------


@pytest.mark.postgresql
def test_a_postgresql_deadlock_is_a_deadlock_not_busy(pg_server_url: str) -> None:
    """Its report says "blocked by process", which a text match would call busy."""
    engine = sqlalchemy.create_engine(pg_server_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS pair"))
        conn.execute(text("CREATE TABLE pair (id int PRIMARY KEY)"))
        conn.execute(text("INSERT INTO pair VALUES (1), (2)"))
    first, second = engine.connect(), engine.connect()
    errors: list[BaseException] = []
    try:
        for conn in (first, second):
            conn.execute(text("SET deadlock_timeout = '50ms'"))
        first.execute(text("UPDATE pair SET id = id WHERE id = 1"))
        second.execute(text("UPDATE pair SET id = id WHERE id = 2"))

        def cross(conn: sqlalchemy.Connection, row: int) -> None:
            try:
                conn.execute(text("UPDATE pair SET id = id WHERE id = :row"), {"row": row})
            except sqlalchemy.exc.DBAPIError as exc:
                errors.append(exc)
                conn.rollback()

        thread = threading.Thread(target=cross, args=(second, 1))
        thread.start()
        cross(first, 2)
        thread.join(30)
    finally:
        first.close()
        second.close()
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE pair"))
        engine.dispose()
    assert len(errors) == 1, "exactly one of the two is chosen to roll back"
    assert "locked" in str(errors[0]).lower()
    assert classify(errors[0]) == Fault(FaultKind.DEADLOCK, infrastructure=False)
    assert classify_error(errors[0]) == ("deadlock", 0.1)


# -- rules without a cheap real error ------------------------------------------------------


class DriverError(Exception):
    """A driver's exception with the attributes psycopg and MySQL drivers give theirs."""

    def __init__(self, *args: object, sqlstate: str | None = None) -> None:
        super().__init__(*args)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("orig", "kind"),
    [
        (DriverError("could not serialize access", sqlstate="40001"), FaultKind.DEADLOCK),
        (DriverError(1213, "Deadlock found when trying to get lock"), FaultKind.DEADLOCK),
        (DriverError(1205, "Lock wait timeout exceeded"), FaultKind.DEADLOCK),
        (DriverError(1062, "Duplicate entry"), FaultKind.OPERATIONAL),
        (DriverError("too many clients", sqlstate="53300"), FaultKind.CONNECTION),
        (DriverError("admin shutdown", sqlstate="57P01"), FaultKind.CONNECTION),
    ],
)
def test_driver_codes_decide_before_texts(orig: Exception, kind: FaultKind) -> None:
    assert classify(sqlalchemy.exc.OperationalError("SELECT 1", {}, orig)).kind is kind


def test_a_number_outside_a_driver_error_is_not_a_mysql_code() -> None:
    assert classify(ValueError(1213)).kind is FaultKind.OTHER


def test_a_translated_error_is_classified_by_the_fault_it_carries_not_its_text() -> None:
    carried = Fault(FaultKind.DISK_FULL)
    error = memtree.DatabaseError("server closed the connection unexpectedly", fault=carried)
    error.__cause__ = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection"))
    assert classify(error) is carried
    assert not is_infrastructure_error(error)
