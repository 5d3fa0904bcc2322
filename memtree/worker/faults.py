"""What a database error means for the worker: how long to back off, and whether a
run failed because the database could not be reached rather than because of the job.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

from memtree.errors import DatabaseError, MemtreeError
from memtree.types import find_failure

__all__ = ["classify_error", "is_infrastructure_error"]


def classify_error(error: BaseException) -> tuple[str, float]:
    """How the loop backs off after a database error: (label, seconds), the original's table."""
    cause: BaseException = error
    while isinstance(cause, DatabaseError | MemtreeError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, sa_exc.DBAPIError) and cause.orig is not None:
        cause = cause.orig
    text = f"{type(cause).__name__} {cause}".lower()
    if "disk is full" in text or "no space left" in text or "diskfull" in text:
        return "disk full", 30.0
    if "locked" in text or "busy" in text:
        return "busy", 0.1
    operational = isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError) or (
        isinstance(error.__cause__, sa_exc.OperationalError | sa_exc.InterfaceError)
    )
    if operational or "i/o" in text or "connection" in text or "server closed" in text:
        return "I/O", 1.0
    return "other", 0.5


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
)
# SQLSTATEs of a connection that failed or was taken away: class 08 (connection
# exception), too_many_connections, admin/crash shutdown, cannot_connect_now.
_CONNECTION_SQLSTATES = ("53300", "57P01", "57P02", "57P03")


def _is_connection_failure(error: BaseException) -> bool:
    if isinstance(error, sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True  # a pooled connection found dead, or no connection to be had
    if not isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
        return False
    if error.connection_invalidated:
        return True  # SQLAlchemy's dialect recognised a disconnect
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and (
        sqlstate.startswith("08") or sqlstate in _CONNECTION_SQLSTATES
    ):
        return True
    sqlite_name = getattr(orig, "sqlite_errorname", None)
    if isinstance(sqlite_name, str) and (
        sqlite_name == "SQLITE_CANTOPEN" or sqlite_name.startswith("SQLITE_IOERR")
    ):
        return True
    text = str(orig).lower()
    return any(phrase in text for phrase in _CONNECTION_FAILURE_TEXT)


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
    if find_failure(error) is not None:
        return False
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
