"""Engines configured for a job queue: SQLite in WAL with immediate write transactions,
PostgreSQL on psycopg 3.

:func:`create_engine` is what ``Queue("sqlite:///memtree.db")`` uses. An application
that shares one engine between its own tables and memtree should build it here too,
so that SQLite writers wait for each other instead of failing with "database is
locked".
"""

from __future__ import annotations

import functools
import time
from typing import Any

import sqlalchemy
from sqlalchemy import URL, Engine, event, make_url
from sqlalchemy import exc as sa_exc

from memtree.dialects import dialect_for
from memtree.errors import ConfigurationError

__all__ = [
    "DEFAULT_DATABASE_URL",
    "PING_AFTER_IDLE_S",
    "SQLITE_BUSY_TIMEOUT_MS",
    "create_engine",
    "normalize_url",
]

DEFAULT_DATABASE_URL = "sqlite:///memtree.db"
#: How long a SQLite writer waits for the write lock before giving up (the original's 15 s).
SQLITE_BUSY_TIMEOUT_MS = 15_000
#: A pooled PostgreSQL connection idle for this long is checked before it is used.
PING_AFTER_IDLE_S = 1.0


def normalize_url(url: str | URL) -> URL:
    """``postgresql://`` means psycopg 3 here; every other URL is left as it is."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


#: SQLite's text values as ``str``, with replacement characters for bytes that are not
#: UTF-8. A ``partial`` of ``str`` runs in C: a Python function here would run for every
#: text value of every row read.
_decode_text = functools.partial(str, encoding="utf-8", errors="replace")


def _configure_sqlite(engine: Engine, synchronous: str, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # memtree issues BEGIN itself (below); the driver's implicit BEGIN would be
        # DEFERRED and could fail with SQLITE_BUSY instead of waiting.
        dbapi_connection.isolation_level = None
        # Another program may have written bytes that are not UTF-8: read them with
        # replacement characters rather than fail every claim that picks the row.
        dbapi_connection.text_factory = _decode_text
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if engine.url.database not in (None, "", ":memory:"):
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
        finally:
            cursor.close()

    # SQLAlchemy runs the dialect's BEGIN where it would run its own, and wraps its errors
    # like any statement's. (A "begin" event would work too, but any engine-level
    # connection event makes SQLAlchemy join an event dispatcher onto every connection it
    # opens, which costs a tenth of a one-job transaction.)
    engine.dialect.do_begin = _begin_immediate  # type: ignore[method-assign]


def _begin_immediate(dbapi_connection: Any) -> None:
    # IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so a
    # transaction that reads before it writes cannot fail on the upgrade.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("BEGIN IMMEDIATE")
    finally:
        cursor.close()


def create_engine(
    url: str | URL = DEFAULT_DATABASE_URL,
    *,
    sqlite_synchronous: str = "NORMAL",
    sqlite_busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS,
    **kwargs: Any,
) -> Engine:
    """A SQLAlchemy engine set up for memtree (and safe for the application's own use).

    SQLite gets WAL, a busy timeout (15 s by default), ``synchronous`` as given (``NORMAL`` keeps
    every commit across a process crash; ``FULL`` also across power loss) and
    ``BEGIN IMMEDIATE`` transactions. ``postgresql://`` URLs use psycopg 3, and a pooled
    connection idle for a second is checked before use (unless ``pool_pre_ping`` is given).
    """
    synchronous = sqlite_synchronous.upper()
    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigurationError(
            f"sqlite_synchronous must be OFF, NORMAL, FULL or EXTRA, not {sqlite_synchronous!r}"
        )
    parsed = normalize_url(url)
    dialect_for(parsed.get_backend_name())  # an unsupported database fails before its driver loads
    engine = sqlalchemy.create_engine(parsed, **kwargs)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, synchronous, int(sqlite_busy_timeout_ms))
    elif "pool_pre_ping" not in kwargs:
        _ping_after_idle(engine)
    return engine


def _ping_after_idle(engine: Engine) -> None:
    """Check a pooled connection at checkout only when it sat idle for a while.

    A connection the server dropped while it was idle (restart, failover, idle timeout,
    ``pg_terminate_backend``) is replaced before the application uses it, as
    ``pool_pre_ping`` would do, without paying that round trip on every checkout of a
    busy connection. One that breaks while in use fails its statement, and SQLAlchemy
    then discards the whole pool.
    """

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("memtree_checked_in", 0.0) < PING_AFTER_IDLE_S:
            return
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
            dbapi_connection.rollback()
        except Exception as exc:
            raise sa_exc.DisconnectionError(str(exc)) from exc

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["memtree_checked_in"] = time.monotonic()
