"""Engines set up for a job queue, the application's own engines included.

:func:`create_engine` builds memtree's engine: SQLite in WAL (or the journal mode you
choose) with a busy timeout and ``BEGIN IMMEDIATE`` transactions, PostgreSQL on psycopg 3.
:func:`configure_engine` brings an engine the application built itself up to what memtree
needs, without changing how the application's own transactions begin; ``Queue(engine)``
calls it on any SQLite engine it is given. :func:`handler_connection` is the connection
behind a handler's ``ctx.session``: on SQLite its transaction begins at its first write,
so a handler that reads and then waits holds no lock while it waits.

What memtree needs from a SQLite file, and why:

- A **busy timeout**, so a writer waits for the write lock instead of failing at once
  with "database is locked" (15 s, the original's).
- **Write transactions that take the lock up front** (``BEGIN IMMEDIATE``) for memtree's
  own transactions: a transaction that reads before it writes would otherwise fail on
  the upgrade, without waiting, when another writer got there first.
- **WAL**, so readers never block writers, on a file that holds no queue yet. A file
  that already holds ``mem_tree_jobs`` in a rollback journal keeps its mode (``"AUTO"``,
  the default): that is how the original Rust crate keeps its file (it sets
  ``journal_mode=TRUNCATE`` on every connection it opens), and a file in WAL cannot be
  shared with it. ``"WAL"`` converts such a file anyway, ``None`` never sets a mode.
"""

from __future__ import annotations

import functools
import os
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import sqlalchemy
from sqlalchemy import URL, Connection, Engine, RootTransaction, event, make_url
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine.interfaces import Dialect as SADialect

from memtree.dialects import dialect_for

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from memtree.errors import ConfigurationError

__all__ = [
    "DEFAULT_DATABASE_URL",
    "PING_AFTER_IDLE_S",
    "SQLITE_BUSY_TIMEOUT_MS",
    "SQLITE_JOURNAL_AUTO",
    "SQLITE_JOURNAL_MODES",
    "async_engine_for",
    "async_handler_session",
    "async_url",
    "begin_write",
    "configure_engine",
    "create_engine",
    "handler_connection",
    "normalize_url",
    "sqlite_file",
    "sync_url",
]

DEFAULT_DATABASE_URL = "sqlite:///memtree.db"
#: How long a SQLite writer waits for the write lock before giving up (the original's 15 s).
SQLITE_BUSY_TIMEOUT_MS = 15_000
#: A pooled PostgreSQL connection idle for this long is checked before it is used.
PING_AFTER_IDLE_S = 1.0
#: The journal modes memtree can be told to set (``None`` keeps whatever the file has).
SQLITE_JOURNAL_MODES = ("WAL", "DELETE", "TRUNCATE", "PERSIST")
#: The default: WAL, unless the file already holds a queue in a rollback journal (the
#: original crate's file), which keeps its mode.
SQLITE_JOURNAL_AUTO = "AUTO"
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

#: A pool record's ``info`` key: this DBAPI connection has memtree's pragmas.
_PREPARED = "memtree.prepared"
#: A pool record's ``info`` key: begin this connection's transaction at its first write.
_LAZY = "memtree.lazy_begin"


@dataclass(frozen=True, slots=True)
class _SQLiteSetup:
    """How memtree set up a SQLite engine (one per SQLAlchemy dialect instance)."""

    #: One of SQLITE_JOURNAL_MODES, SQLITE_JOURNAL_AUTO, or None (set none).
    journal_mode: str | None
    #: The ``synchronous`` pragma; None is NORMAL in WAL and FULL in a rollback journal
    #: on memtree's engine, and the application's own setting on its engine.
    synchronous: str | None
    busy_timeout_ms: int
    #: Built by :func:`create_engine`: every transaction begins IMMEDIATE through the
    #: dialect. Otherwise memtree begins its own transactions itself (:func:`begin_write`).
    owns_begin: bool
    #: Built by :func:`async_engine_for` for async handlers' sessions: every connection
    #: begins its transaction at its first write, as a :func:`handler_connection` does.
    lazy: bool = False


_SETUPS: weakref.WeakKeyDictionary[SADialect, _SQLiteSetup] = weakref.WeakKeyDictionary()
#: MySQL engines whose every transaction is READ COMMITTED already (memtree built them).
_READ_COMMITTED: weakref.WeakSet[SADialect] = weakref.WeakSet()


def normalize_url(url: str | URL) -> URL:
    """``postgresql://`` means psycopg 3 here, ``mysql://`` and ``mariadb://`` PyMySQL;
    every other URL is left as it is."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.drivername in _MYSQL_FAMILY:
        parsed = parsed.set(drivername=f"{parsed.drivername}+pymysql")
    return parsed


#: MySQL's family, as SQLAlchemy names its backends (MariaDB's URLs say ``mariadb``).
_MYSQL_FAMILY = ("mysql", "mariadb")


#: SQLite's text values as ``str``, with replacement characters for bytes that are not
#: UTF-8. A ``partial`` of ``str`` runs in C: a Python function here would run for every
#: text value of every row read.
_decode_text = functools.partial(str, encoding="utf-8", errors="replace")


def async_url(url: str | URL) -> URL:
    """The same database's URL with an async driver: aiosqlite for SQLite, psycopg 3's
    async connection for PostgreSQL, aiomysql for MySQL and MariaDB
    (``create_async_engine(memtree.async_url(url))``)."""
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")
    if backend in _MYSQL_FAMILY:
        return parsed.set(drivername=f"{backend}+aiomysql")
    raise ConfigurationError(f"memtree knows no async driver for {backend}")


def sync_url(url: str | URL) -> URL:
    """The same database's URL with the synchronous driver memtree uses: pysqlite for
    SQLite, psycopg 3 for PostgreSQL, PyMySQL for MySQL (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``
    in, ``sqlite://`` or ``postgresql+psycopg://`` out)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite")
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")
    if backend in _MYSQL_FAMILY:
        return parsed.set(drivername=f"{backend}+pymysql")
    return parsed


def sqlite_file(url: str | URL) -> str | None:
    """The file a SQLite URL names, as an absolute path; None for other databases, for an
    in-memory database and for a ``file:`` URI, whose path SQLite resolves itself."""
    parsed = normalize_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") or "uri" in parsed.query or "mode" in parsed.query:
        return None
    return os.path.abspath(database)


def _journal_mode(value: str | None) -> str | None:
    if value is None:
        return None
    mode = str(value).upper()
    if mode not in (SQLITE_JOURNAL_AUTO, *SQLITE_JOURNAL_MODES):
        raise ConfigurationError(
            f"sqlite_journal_mode must be AUTO, one of {', '.join(SQLITE_JOURNAL_MODES)} or "
            f"None (keep the file's), not {value!r}"
        )
    return mode


def _synchronous(value: str | None) -> str | None:
    if value is None:
        return None
    mode = str(value).upper()
    if mode not in _SYNCHRONOUS:
        raise ConfigurationError(
            f"sqlite_synchronous must be OFF, NORMAL, FULL or EXTRA, not {value!r}"
        )
    return mode


def _busy_timeout(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"sqlite_busy_timeout_ms must be an int >= 0, not {value!r}")
    return value


_PRAGMA_VALUES: dict[str, tuple[str, ...]] = {
    "journal_mode": SQLITE_JOURNAL_MODES,
    "synchronous": _SYNCHRONOUS,
}


def _set_pragma(cursor: Any, name: str, value: int | str) -> Any:
    """``PRAGMA name = value``, returning its row. PRAGMA takes no bound parameters, so
    the value must be an int or one of the keywords the pragma accepts."""
    if not (
        (name == "busy_timeout" and type(value) is int) or value in _PRAGMA_VALUES.get(name, ())
    ):
        raise ConfigurationError(f"the {name} pragma cannot be set to {value!r}")
    cursor.execute(f"PRAGMA {name} = {value}")
    return cursor.fetchone()


def _read_pragma(cursor: Any, name: str) -> Any:
    """A pragma's value. (Execute, then fetch: aiosqlite's adapted cursor returns no
    cursor from ``execute``.)"""
    cursor.execute(_PRAGMA_READS[name])
    return cursor.fetchone()[0]


_PRAGMA_READS = {"busy_timeout": "PRAGMA busy_timeout", "journal_mode": "PRAGMA journal_mode"}


def _prepare(dbapi_connection: Any, setup: _SQLiteSetup, database: str | None) -> None:
    """memtree's pragmas on one SQLite connection."""
    cursor = dbapi_connection.cursor()
    try:
        # On the application's engine, keep a longer timeout it chose for itself.
        current = 0 if setup.owns_begin else _read_pragma(cursor, "busy_timeout")
        if setup.owns_begin or int(current) < setup.busy_timeout_ms:
            _set_pragma(cursor, "busy_timeout", setup.busy_timeout_ms)
        journal = _choose_journal_mode(cursor, setup.journal_mode, database)
        if journal is not None:
            try:
                mode = _set_pragma(cursor, "journal_mode", journal)
            except Exception as exc:
                raise ConfigurationError(
                    f"cannot set SQLite journal_mode={journal} on {database} ({exc}): "
                    "another process holds the file in another journal mode (the TinyCortex "
                    "crate keeps TRUNCATE); to share the file, run memtree with "
                    "sqlite_journal_mode=None (CLI: --sqlite-journal-mode keep)"
                ) from exc
            if mode is not None and str(mode[0]).upper() != journal:
                raise ConfigurationError(
                    f"SQLite kept journal_mode={mode[0]} on {database} instead of "
                    f"{journal}: another connection holds it; to share the file "
                    "in its own mode, run memtree with sqlite_journal_mode=None"
                )
        synchronous = setup.synchronous
        if synchronous is None and setup.owns_begin:
            # NORMAL is safe against power loss only in WAL; a rollback journal needs FULL.
            current = str(_read_pragma(cursor, "journal_mode")).upper()
            synchronous = "NORMAL" if current == "WAL" else "FULL"
        if synchronous is not None:
            _set_pragma(cursor, "synchronous", synchronous)
    finally:
        cursor.close()


def _choose_journal_mode(cursor: Any, wanted: str | None, database: str | None) -> str | None:
    """The journal mode to set on this connection, or None to set none."""
    if wanted is None or database in (None, "", ":memory:"):
        return None
    if wanted != SQLITE_JOURNAL_AUTO:
        return wanted
    current = str(_read_pragma(cursor, "journal_mode")).upper()
    if current == "WAL":
        return None
    cursor.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'mem_tree_jobs'")
    holds_queue = cursor.fetchone()
    # A queue in a rollback journal is the crate's file, or one set up so on purpose.
    return None if holds_queue else "WAL"


def _install(engine: Engine, setup: _SQLiteSetup) -> None:
    database = engine.url.database

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        if setup.lazy:
            # Python's sqlite3 begins (IMMEDIATE) before the first INSERT, UPDATE or
            # DELETE text; the execute hooks begin it for what sqlite3 cannot see.
            dbapi_connection.isolation_level = "IMMEDIATE"
            _sqlite3_of(dbapi_connection).text_factory = _decode_text
            record.info[_LAZY] = True
        elif setup.owns_begin:
            # memtree issues BEGIN itself (below); the driver's implicit BEGIN would be
            # DEFERRED and could fail with SQLITE_BUSY instead of waiting.
            dbapi_connection.isolation_level = None
            # Another program may have written bytes that are not UTF-8: read them with
            # replacement characters rather than fail every claim that picks the row.
            dbapi_connection.text_factory = _decode_text
        _prepare(dbapi_connection, setup, database)
        record.info[_PREPARED] = True

    _SETUPS[engine.dialect] = setup
    # A handler connection (see handler_connection) begins its transaction before the
    # first statement that writes or locks; every other statement runs as it would.
    engine.dialect.do_execute = _execute  # type: ignore[method-assign]
    engine.dialect.do_execute_no_params = _execute_no_params  # type: ignore[method-assign]
    engine.dialect.do_executemany = _executemany  # type: ignore[method-assign]
    if setup.owns_begin or setup.lazy:
        # SQLAlchemy runs the dialect's BEGIN where it would run its own, and wraps its
        # errors like any statement's. (A "begin" event would work too, but any
        # engine-level connection event makes SQLAlchemy join an event dispatcher onto
        # every connection it opens, which costs a tenth of a one-job transaction.)
        engine.dialect.do_begin = _begin_immediate  # type: ignore[method-assign]


def _begins_the_write(cursor: Any, context: Any) -> bool:
    """Whether this statement, about to run outside a transaction, must first begin a
    handler connection's write transaction: it writes (an INSERT, UPDATE or DELETE
    construct, a ``WITH`` in front included, which Python's sqlite3 would not see) or it
    locks (``SELECT ... FOR UPDATE``, which SQLite's compiler drops from the SQL)."""
    if context is None:
        return False
    fairy = context.root_connection.connection
    if not fairy.info.get(_LAZY) or _sqlite3_of(fairy.dbapi_connection).in_transaction:
        return False
    if context.isinsert or context.isupdate or context.isdelete:
        return True
    compiled = context.compiled
    statement = getattr(compiled, "statement", None)
    return getattr(statement, "_for_update_arg", None) is not None


def _sqlite3_of(dbapi_connection: Any) -> Any:
    """The ``sqlite3.Connection`` behind a DBAPI connection: itself for pysqlite, the one
    inside aiosqlite's connection for SQLAlchemy's aiosqlite adapter."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    return getattr(driver, "_conn", driver)


def _begin_write_now(cursor: Any) -> None:
    cursor.execute("BEGIN IMMEDIATE")


def _execute(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
    if _begins_the_write(cursor, context):
        _begin_write_now(cursor)
    cursor.execute(statement, parameters)


def _execute_no_params(cursor: Any, statement: str, context: Any = None) -> None:
    if _begins_the_write(cursor, context):
        _begin_write_now(cursor)
    cursor.execute(statement)


def _executemany(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
    if _begins_the_write(cursor, context):
        _begin_write_now(cursor)
    cursor.executemany(statement, parameters)


def _begin_immediate(dbapi_connection: Any) -> None:
    # IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so a
    # transaction that reads before it writes cannot fail on the upgrade. A handler's
    # connection (see handler_connection) begins at its first write instead.
    if dbapi_connection.info.get(_LAZY):
        return
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("BEGIN IMMEDIATE")
    finally:
        cursor.close()


def create_engine(
    url: str | URL = DEFAULT_DATABASE_URL,
    *,
    sqlite_journal_mode: str | None = SQLITE_JOURNAL_AUTO,
    sqlite_synchronous: str | None = None,
    sqlite_busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS,
    **kwargs: Any,
) -> Engine:
    """A SQLAlchemy engine set up for memtree (and safe for the application's own use).

    SQLite gets a journal mode (by default ``"AUTO"``: WAL, except that a file already
    holding ``mem_tree_jobs`` in a rollback journal, as the original crate keeps it,
    keeps its mode; ``"WAL"``, ``"DELETE"``, ``"TRUNCATE"`` or ``"PERSIST"`` to set one;
    ``None`` to set none), a busy timeout (15 s by default), ``synchronous`` as given (by
    default ``NORMAL`` in WAL, which keeps every commit across a process crash, and
    ``FULL`` in a rollback journal) and ``BEGIN IMMEDIATE`` transactions.
    ``postgresql://`` URLs use psycopg 3, and a pooled connection idle for a second is
    checked before use (unless ``pool_pre_ping`` is given). ``mysql://`` and
    ``mariadb://`` URLs use PyMySQL, with transactions at READ COMMITTED (unless
    ``isolation_level`` is given) and the same check of idle connections.
    """
    journal_mode = _journal_mode(sqlite_journal_mode)
    synchronous = _synchronous(sqlite_synchronous)
    busy_timeout_ms = _busy_timeout(sqlite_busy_timeout_ms)
    parsed = normalize_url(url)
    dialect_for(parsed.get_backend_name())  # an unsupported database fails before its driver loads
    reset_when_in_transaction = False
    if parsed.get_backend_name() in _MYSQL_FAMILY:
        kwargs.setdefault("isolation_level", "READ COMMITTED")
        if "pool_reset_on_return" not in kwargs and kwargs["isolation_level"] == "READ COMMITTED":
            kwargs["pool_reset_on_return"] = None
            reset_when_in_transaction = True
    engine = sqlalchemy.create_engine(parsed, **kwargs)
    if engine.dialect.name in _MYSQL_FAMILY and kwargs["isolation_level"] == "READ COMMITTED":
        _READ_COMMITTED.add(engine.dialect)
    if reset_when_in_transaction:
        _reset_only_open_transactions(engine)
    if engine.dialect.name == "sqlite":
        _install(engine, _SQLiteSetup(journal_mode, synchronous, busy_timeout_ms, True))
    elif "pool_pre_ping" not in kwargs:
        _ping_after_idle(engine)
    return engine


@overload
def configure_engine(
    engine: Engine,
    *,
    sqlite_journal_mode: str | None = ...,
    sqlite_busy_timeout_ms: int = ...,
) -> Engine: ...


@overload
def configure_engine(
    engine: AsyncEngine,
    *,
    sqlite_journal_mode: str | None = ...,
    sqlite_busy_timeout_ms: int = ...,
) -> AsyncEngine: ...


def configure_engine(
    engine: Engine | AsyncEngine,
    *,
    sqlite_journal_mode: str | None = SQLITE_JOURNAL_AUTO,
    sqlite_busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS,
) -> Engine | AsyncEngine:
    """Set up an engine the application built itself for memtree; returns it.

    ``Queue(engine)`` calls this with the defaults on a SQLite engine that neither
    :func:`create_engine` built nor this function has set up, so call it first only to
    choose otherwise. On SQLite every connection of the engine gets a busy timeout of at
    least ``sqlite_busy_timeout_ms`` and the journal mode given (as for
    :func:`create_engine`: ``"AUTO"`` by default, ``None`` keeps the file's), while its
    transactions still begin the way the application set them up: memtree begins its
    own with ``BEGIN IMMEDIATE`` itself. Nothing is changed
    on other databases. A second call, or a call on memtree's own engine, does nothing.
    An ``AsyncEngine`` (aiosqlite) is set up the same way, through its ``sync_engine``:
    call it on the async engine whose sessions enqueue on a SQLite file.
    """
    sync_engine = getattr(engine, "sync_engine", engine)
    if not isinstance(sync_engine, Engine):
        raise ConfigurationError(f"configure_engine needs a SQLAlchemy Engine, not {engine!r}")
    if sync_engine.dialect.name != "sqlite" or sync_engine.dialect in _SETUPS:
        return engine
    journal_mode = _journal_mode(sqlite_journal_mode)
    busy_timeout_ms = _busy_timeout(sqlite_busy_timeout_ms)
    _install(sync_engine, _SQLiteSetup(journal_mode, None, busy_timeout_ms, False))
    return engine


def _setup_of(engine: Engine) -> _SQLiteSetup | None:
    return _SETUPS.get(engine.dialect)


def begin_write(conn: Connection) -> RootTransaction:
    """Begin memtree's own write transaction on ``conn`` (fresh from ``engine.connect()``).

    On memtree's SQLite engine the dialect's BEGIN is already IMMEDIATE, and PostgreSQL
    needs nothing more than a BEGIN. On MySQL an application's engine gets READ COMMITTED
    for this transaction (memtree's own engine has it already): at REPEATABLE READ a
    claim's locking read would take gap locks that stall every concurrent enqueue. On an
    application's SQLite engine (see
    :func:`configure_engine`) this prepares a connection opened before memtree set the
    engine up, and begins with ``BEGIN IMMEDIATE`` itself unless the application's own
    set-up already began a transaction.
    """
    transaction = conn.begin()
    if conn.dialect.name != "sqlite":
        statement = dialect_for(conn.dialect.name).begin_statement()
        if statement is not None and conn.dialect not in _READ_COMMITTED:
            # Nothing has run in this transaction yet, so this sets its own level only.
            conn.exec_driver_sql(statement)
        return transaction
    setup = _setup_of(conn.engine)
    if setup is not None and setup.owns_begin:
        return transaction
    fairy = conn.connection
    dbapi_connection: Any = fairy.dbapi_connection
    if setup is not None and not fairy.info.get(_PREPARED):
        _prepare(dbapi_connection, setup, conn.engine.url.database)
        fairy.info[_PREPARED] = True
    if not dbapi_connection.in_transaction:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    return transaction


@contextmanager
def handler_connection(engine: Engine) -> Iterator[Connection]:
    """A connection for a handler's session: on SQLite its transaction begins at the
    first statement that writes or locks (``BEGIN IMMEDIATE`` then) instead of at the
    first statement.

    Reads before that run outside any transaction, each seeing the latest commit (as in
    PostgreSQL's default ``READ COMMITTED``), so a handler that reads and then waits on
    an external call holds no lock meanwhile. A ``SELECT ... FOR UPDATE`` (which locks
    rows on PostgreSQL) or the first write begins the transaction, and from then to its
    commit the handler holds SQLite's write lock. Elsewhere it is a plain connection.
    """
    conn = engine.connect()
    try:
        if conn.dialect.name != "sqlite":
            yield conn
            return
        fairy = conn.connection
        dbapi_connection: Any = fairy.dbapi_connection
        previous = dbapi_connection.isolation_level
        fairy.info[_LAZY] = True
        # Python's sqlite3 begins a transaction before the first INSERT, UPDATE, DELETE
        # or REPLACE text, with this as the BEGIN's mode, and runs reads in autocommit
        # before it; memtree's execute hooks (see _begins_the_write) begin it for the
        # statements sqlite3 cannot recognise.
        dbapi_connection.isolation_level = "IMMEDIATE"
        try:
            yield conn
        finally:
            fairy.info.pop(_LAZY, None)
            if dbapi_connection.in_transaction:
                dbapi_connection.rollback()
            # Restoring None would commit an open transaction: it was rolled back above.
            dbapi_connection.isolation_level = previous
    finally:
        conn.close()


def async_engine_for(engine: Engine) -> AsyncEngine:
    """An async engine on ``engine``'s database, for the sessions of async handlers.

    SQLite gets aiosqlite, the busy timeout and journal mode ``engine`` has, and
    connections whose transactions begin at their first write or ``SELECT ... FOR
    UPDATE`` (as :func:`handler_connection`'s do). PostgreSQL gets psycopg 3's async
    connection. The caller disposes of it.
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    url = engine.url
    if engine.dialect.name == "sqlite":
        setup = _setup_of(engine) or _SQLiteSetup(
            SQLITE_JOURNAL_AUTO, None, SQLITE_BUSY_TIMEOUT_MS, False
        )
        async_engine = create_async_engine(async_url(url))
        handler_setup = _SQLiteSetup(
            setup.journal_mode, setup.synchronous, setup.busy_timeout_ms, False, lazy=True
        )
        _install(async_engine.sync_engine, handler_setup)
        return async_engine
    async_engine = create_async_engine(async_url(url))
    _ping_after_idle(async_engine.sync_engine)
    return async_engine


def async_handler_session(engine: AsyncEngine) -> AsyncSession:
    """The ``AsyncSession`` of one async handler's run, on :func:`async_engine_for`'s engine."""
    from sqlalchemy.ext.asyncio import AsyncSession

    return AsyncSession(bind=engine)


def _reset_only_open_transactions(engine: Engine) -> None:
    """Roll a returned MySQL connection back only when it is inside a transaction.

    The pool's own reset sends a ROLLBACK for every connection it gets back, and PyMySQL
    sends it to the server even after a COMMIT: a round trip in every three of a single
    enqueue. The server reports in every reply whether a transaction is open, and PyMySQL
    keeps that flag, so a connection that committed or rolled back is returned as it is,
    and one returned mid-transaction (a raw connection's) is still rolled back. Only at
    READ COMMITTED: there a transaction that only read holds nothing (the server does not
    flag it), where at REPEATABLE READ its snapshot would pass to the next checkout."""

    @event.listens_for(engine, "reset")
    def _on_reset(dbapi_connection: Any, _record: Any, state: Any) -> None:
        status = getattr(dbapi_connection, "server_status", None)
        if state.terminate_only:
            return
        if not isinstance(status, int) or status & _SERVER_STATUS_IN_TRANS:
            dbapi_connection.rollback()


#: The server-status bit of MySQL's protocol that says a transaction is open.
_SERVER_STATUS_IN_TRANS = 1


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
