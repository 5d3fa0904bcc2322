"""Engines configured for a job queue: SQLite in WAL with immediate write transactions,
PostgreSQL on psycopg 3.

:func:`create_engine` is what ``Queue("sqlite:///memtree.db")`` uses. An application
that shares one engine between its own tables and memtree should build it here too,
so that SQLite writers wait for each other instead of failing with "database is
locked".
"""

from __future__ import annotations

from typing import Any

import sqlalchemy
from sqlalchemy import URL, Engine, event, make_url

from memtree.dialects import dialect_for
from memtree.errors import ConfigurationError

__all__ = ["DEFAULT_DATABASE_URL", "SQLITE_BUSY_TIMEOUT_MS", "create_engine", "normalize_url"]

DEFAULT_DATABASE_URL = "sqlite:///memtree.db"
#: How long a SQLite writer waits for the write lock before giving up (the original's 15 s).
SQLITE_BUSY_TIMEOUT_MS = 15_000


def normalize_url(url: str | URL) -> URL:
    """``postgresql://`` means psycopg 3 here; every other URL is left as it is."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _configure_sqlite(engine: Engine, synchronous: str, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # memtree issues BEGIN itself (below); the driver's implicit BEGIN would be
        # DEFERRED and could fail with SQLITE_BUSY instead of waiting.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if engine.url.database not in (None, "", ":memory:"):
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sqlalchemy.Connection) -> None:
        # IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so
        # a transaction that reads before it writes cannot fail on the upgrade.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


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
    ``BEGIN IMMEDIATE`` transactions. ``postgresql://`` URLs use psycopg 3.
    """
    synchronous = sqlite_synchronous.upper()
    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigurationError(
            f"sqlite_synchronous must be OFF, NORMAL, FULL or EXTRA, not {sqlite_synchronous!r}"
        )
    parsed = normalize_url(url)
    dialect_for(parsed.get_backend_name())  # an unsupported database fails before its driver loads
    if parsed.get_backend_name() == "postgresql":
        # A connection the server dropped (restart, failover, pg_terminate_backend) is
        # replaced at checkout instead of failing the application's next statement.
        kwargs.setdefault("pool_pre_ping", True)
    engine = sqlalchemy.create_engine(parsed, **kwargs)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, synchronous, int(sqlite_busy_timeout_ms))
    return engine
