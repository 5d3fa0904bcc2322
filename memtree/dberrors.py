"""What a database error means: the one place that reads driver and SQLAlchemy errors.

:func:`classify` turns any exception into a :class:`Fault`: memtree's
:class:`~memtree.errors.DatabaseError` (which carries the fault it was translated with),
a raw SQLAlchemy error raised in a handler's own session, or a handler's exception that
wraps either. :func:`translate` turns a driver error into memtree's own exception, once,
at the store boundary (:func:`memtree.store.translate_errors`) and in the CLI.

Everything else asks a :class:`Fault` instead of matching error texts: the worker's
back-off (:func:`classify_error`) and its choice to release a run without spending an
attempt (:func:`is_infrastructure_error`). This module never retries, sleeps or logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import exc as sa_exc

from memtree.errors import DatabaseError, MemtreeError, SchemaMissingError
from memtree.models import TABLE_NAME
from memtree.types import find_failure

__all__ = [
    "Fault",
    "FaultKind",
    "classify",
    "classify_error",
    "is_infrastructure_error",
    "translate",
]


class FaultKind(StrEnum):
    """What went wrong underneath, most specific first (the order :func:`classify` tries)."""

    #: memtree's table or one of its newer columns is absent: run ``memtree db upgrade``.
    SCHEMA_MISSING = "schema_missing"
    #: The transaction was chosen to roll back: a deadlock or serialization failure
    #: (PostgreSQL 40P01/40001; MySQL/MariaDB 1213, and 1205 lock wait timeout).
    DEADLOCK = "deadlock"
    #: The disk under the database is full.
    DISK_FULL = "disk_full"
    #: Another session holds the database, a table or a row (SQLite busy or locked).
    BUSY = "busy"
    #: A connection could not be opened or was lost, or a SQLite file cannot be opened or read.
    CONNECTION = "connection"
    #: Any other error the driver calls operational or an interface failure, or an I/O error.
    OPERATIONAL = "operational"
    #: Anything else: the statement's own error (a constraint, a type), or not a database error.
    OTHER = "other"


# How long a loop waits before it tries again after each kind, and the word it logs.
_BACKOFF_S = {
    FaultKind.SCHEMA_MISSING: 1.0,
    FaultKind.DEADLOCK: 0.1,
    FaultKind.DISK_FULL: 30.0,
    FaultKind.BUSY: 0.1,
    FaultKind.CONNECTION: 1.0,
    FaultKind.OPERATIONAL: 1.0,
    FaultKind.OTHER: 0.5,
}
_LABEL = {
    FaultKind.SCHEMA_MISSING: "schema missing",
    FaultKind.DEADLOCK: "deadlock",
    FaultKind.DISK_FULL: "disk full",
    FaultKind.BUSY: "busy",
    FaultKind.CONNECTION: "I/O",
    FaultKind.OPERATIONAL: "I/O",
    FaultKind.OTHER: "other",
}


@dataclass(frozen=True, slots=True)
class Fault:
    """What :func:`classify` made of an error.

    ``infrastructure`` is whether a run that failed with it counts as the database's
    failure, not the job's: a connection failure anywhere in the error's cause/context
    chain, unless the handler raised a :class:`~memtree.types.JobFailure` (its own verdict).
    """

    kind: FaultKind
    infrastructure: bool = False

    @property
    def backoff_s(self) -> float:
        """How long a loop waits before it tries the operation again."""
        return _BACKOFF_S[self.kind]

    @property
    def label(self) -> str:
        """The word a log line uses for it ("busy", "I/O", "disk full", ...)."""
        return _LABEL[self.kind]


def classify(error: BaseException) -> Fault:
    """What ``error`` means for whoever has to retry it or settle the run that raised it."""
    if isinstance(error, DatabaseError) and error.fault is not None:
        return error.fault
    connection = _connection_failure_in_chain(error)
    return Fault(
        _kind(error, connection),
        infrastructure=connection and find_failure(error) is None,
    )


def translate(error: sa_exc.DBAPIError) -> SchemaMissingError | DatabaseError:
    """memtree's exception for a driver error (raise it ``from error``): a missing table or
    column is a :class:`SchemaMissingError`, anything else a :class:`DatabaseError` that
    carries its :class:`Fault`."""
    driver = error.orig if error.orig is not None else error
    detail = str(driver).strip()
    fault = classify(error)
    if fault.kind is FaultKind.SCHEMA_MISSING:
        return SchemaMissingError(detail)
    return DatabaseError(f"{type(driver).__name__}: {detail}", fault=fault)


def classify_error(error: BaseException) -> tuple[str, float]:
    """How a loop backs off after a database error: (label, seconds)."""
    fault = classify(error)
    return fault.label, fault.backoff_s


def is_infrastructure_error(error: BaseException) -> bool:
    """True when a run failed because the database could not be reached, not because of
    the job: a connection that could not be opened (refused, too many clients, the server
    starting or stopping, a SQLite file that cannot be opened or read) or that was lost
    (server closed it, admin shutdown), anywhere in the error's cause/context chain, as
    SQLAlchemy raised it or as memtree's :class:`DatabaseError` wraps it.

    This is the one place that decides it. A run that fails this way is released without
    spending an attempt; any other error is the job's own. A :class:`JobFailure` in the
    chain is the handler's own verdict and wins.
    """
    return classify(error).infrastructure


# -- the rules -------------------------------------------------------------------------

# What a missing memtree table says, and what a column newer than the table says
# (SQLite's text, then PostgreSQL's).
_SCHEMA_MISSING_TEXT = (
    f"no such table: {TABLE_NAME}",
    f'relation "{TABLE_NAME}" does not exist',
    "no such column: lease_token",
    'column "lease_token" does not exist',
    "no such column: cancel_requested_at_ms",
    'column "cancel_requested_at_ms" does not exist',
    "no such column: heal_count",
    'column "heal_count" does not exist',
    "no such column: failure_",
)
# The columns newer revisions add, as MySQL's ER_BAD_FIELD_ERROR (1054) names them (its
# ER_NO_SUCH_TABLE, 1146, names the table).
_NEWER_COLUMNS = ("lease_token", "cancel_requested_at_ms", "heal_count", "failure_")
# PostgreSQL's deadlock_detected and serialization_failure; MySQL's and MariaDB's
# ER_LOCK_DEADLOCK and ER_LOCK_WAIT_TIMEOUT (their drivers put the number in args[0]).
_DEADLOCK_SQLSTATES = ("40P01", "40001")
_DEADLOCK_MYSQL_ERRNOS = (1213, 1205)

# What a connection failure says, lowercased, where the driver gives no code for it: psycopg
# at connect ("connection failed: ... too many clients", "Connection refused") and on a
# dropped connection, SQLite when its file cannot be opened or read.
_CONNECTION_FAILURE_TEXT = (
    "connection failed",
    "could not connect",
    "connection refused",
    "too many clients",
    "too many connections",
    "remaining connection slots",
    "server closed the connection",
    "terminating connection",
    "the database system is",
    "connection is closed",
    "connection already closed",
    "no connection to the server",
    "consuming input failed",
    "could not receive data",
    "could not send data",
    "ssl syscall error",
    "unable to open database file",
    "disk i/o error",
    "can't connect to mysql server",
    "server has gone away",
    "lost connection to mysql server",
)
# MySQL's and MariaDB's: too many connections, server shutdown, connection killed, and the
# client's cannot connect / gone away / lost connection.
_CONNECTION_MYSQL_ERRNOS = (1040, 1053, 1927, 2002, 2003, 2006, 2013, 4031)
# SQLSTATEs of a connection that failed or was taken away: class 08 (connection
# exception), too_many_connections, admin/crash shutdown, cannot_connect_now.
_CONNECTION_SQLSTATES = ("53300", "57P01", "57P02", "57P03")

_OPERATIONAL = (sa_exc.OperationalError, sa_exc.InterfaceError)


def _kind(error: BaseException, connection: bool) -> FaultKind:
    # The error memtree or SQLAlchemy wrapped: past memtree's own exceptions to the
    # SQLAlchemy one, then to the driver's.
    cause: BaseException = error
    while isinstance(cause, MemtreeError) and cause.__cause__ is not None:
        cause = cause.__cause__
    wrapped = cause
    if isinstance(cause, sa_exc.DBAPIError) and cause.orig is not None:
        cause = cause.orig
    message = str(cause).lower()
    text = f"{type(cause).__name__} {message}"
    driver = isinstance(wrapped, sa_exc.DBAPIError)
    if driver and (_schema_missing(message) or _mysql_schema_missing(cause, message)):
        return FaultKind.SCHEMA_MISSING
    # Codes before texts: PostgreSQL's deadlock report says "blocked by process".
    if driver and (
        _sqlstate(cause) in _DEADLOCK_SQLSTATES or _mysql_errno(cause) in _DEADLOCK_MYSQL_ERRNOS
    ):
        return FaultKind.DEADLOCK
    if "disk is full" in text or "no space left" in text or "diskfull" in text:
        return FaultKind.DISK_FULL
    if "locked" in text or "busy" in text:
        return FaultKind.BUSY
    if connection:
        return FaultKind.CONNECTION
    operational = isinstance(error, _OPERATIONAL) or isinstance(error.__cause__, _OPERATIONAL)
    if operational or "i/o" in text or "connection" in text or "server closed" in text:
        return FaultKind.OPERATIONAL
    return FaultKind.OTHER


def _schema_missing(message: str) -> bool:
    return any(phrase in message for phrase in _SCHEMA_MISSING_TEXT) or (
        'column "failure_' in message and "does not exist" in message
    )


def _mysql_schema_missing(driver_error: BaseException, message: str) -> bool:
    errno = _mysql_errno(driver_error)
    if errno == 1146:
        return f".{TABLE_NAME}'" in message or f"'{TABLE_NAME}'" in message
    return errno == 1054 and any(f"'{column}" in message for column in _NEWER_COLUMNS)


def _sqlstate(driver_error: object) -> str | None:
    sqlstate = getattr(driver_error, "sqlstate", None)
    return sqlstate if isinstance(sqlstate, str) else None


def _mysql_errno(driver_error: BaseException) -> int | None:
    first = driver_error.args[0] if driver_error.args else None
    return first if isinstance(first, int) and not isinstance(first, bool) else None


def _connection_failure_in_chain(error: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _is_connection_failure(current):
            return True
        if current.__cause__ is not None:
            current = current.__cause__
        elif current.__suppress_context__:
            current = None
        else:
            current = current.__context__
    return False


def _is_connection_failure(error: BaseException) -> bool:
    if isinstance(error, sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True  # a pooled connection found dead, or no connection to be had
    if not isinstance(error, _OPERATIONAL):
        return False
    if error.connection_invalidated:
        return True  # SQLAlchemy's dialect recognised a disconnect
    orig = error.orig
    sqlstate = _sqlstate(orig)
    if sqlstate is not None and (sqlstate.startswith("08") or sqlstate in _CONNECTION_SQLSTATES):
        return True
    if orig is not None and _mysql_errno(orig) in _CONNECTION_MYSQL_ERRNOS:
        return True
    sqlite_name = getattr(orig, "sqlite_errorname", None)
    if isinstance(sqlite_name, str) and (
        sqlite_name == "SQLITE_CANTOPEN" or sqlite_name.startswith("SQLITE_IOERR")
    ):
        return True
    text = str(orig).lower()
    return any(phrase in text for phrase in _CONNECTION_FAILURE_TEXT)
