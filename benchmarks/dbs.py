"""Databases for the run: a fresh PostgreSQL or MariaDB database and SQLite files per
system, all dropped at the end (even on failure), and the raw-SQL fills the workloads
start from."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import URL, make_url

SQLITE_SYNCHRONOUS = "NORMAL"  # memtree.create_engine's default, and so the floor's too

#: The domain table transactional handlers write one row into.
EFFECTS_DDL_PG = (
    "CREATE TABLE IF NOT EXISTS bench_effects ("
    " id BIGSERIAL PRIMARY KEY, job_id TEXT NOT NULL, created_at_ms BIGINT NOT NULL)"
)
EFFECTS_DDL_SQLITE = (
    "CREATE TABLE IF NOT EXISTS bench_effects ("
    " id INTEGER PRIMARY KEY, job_id TEXT NOT NULL, created_at_ms INTEGER NOT NULL)"
)
EFFECTS_DDL_MARIADB = (
    "CREATE TABLE IF NOT EXISTS bench_effects ("
    " id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,"
    " job_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,"
    " created_at_ms BIGINT NOT NULL) ENGINE=InnoDB"
)

#: The isolation the MariaDB floor's transactions run at (memtree's on MariaDB too).
MARIADB_ISOLATION = "READ COMMITTED"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Target:
    """Where one system keeps its jobs: a PostgreSQL or MariaDB database, or a SQLite
    file."""

    backend: str  # "postgresql", "mariadb" or "sqlite"
    #: postgresql://… (libpq, asyncpg and memtree all take it), mariadb+pymysql://… or
    #: sqlite:///path
    url: str

    @property
    def is_pg(self) -> bool:
        return self.backend == "postgresql"

    @property
    def is_mariadb(self) -> bool:
        return self.backend == "mariadb"

    @property
    def is_server(self) -> bool:
        """A database on a server (created and dropped), not a SQLite file."""
        return self.is_pg or self.is_mariadb

    @property
    def path(self) -> str:
        """The SQLite file."""
        database = make_url(self.url).database
        assert database is not None
        return database


class Databases:
    """Hands out fresh databases and removes every one of them in :meth:`close`."""

    def __init__(
        self,
        admin_url: str,
        *,
        pg_available: bool,
        mariadb_url: str | None = None,
        mariadb_available: bool = False,
    ) -> None:
        self.admin_url = admin_url
        self.pg_available = pg_available
        self.mariadb_url = mariadb_url
        self.mariadb_available = mariadb_available and mariadb_url is not None
        self.tmp = Path(tempfile.mkdtemp(prefix="memtree-bench-"))
        self._pg_names: list[str] = []
        self._mariadb_names: list[str] = []
        self._tag = uuid.uuid4().hex[:8]

    def _admin(self) -> psycopg.Connection[Any]:
        url = make_url(self.admin_url)
        return psycopg.connect(_libpq(url.render_as_string(hide_password=False)), autocommit=True)

    def pg(self, system: str) -> Target:
        """A new, empty PostgreSQL database for ``system``."""
        if not self.pg_available:
            raise RuntimeError("PostgreSQL is not reachable")
        name = f"memtree_bench_{self._tag}_{system.replace('-', '_')}_{len(self._pg_names)}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self._pg_names.append(name)
        url = make_url(_libpq(self.admin_url)).set(database=name)
        return Target("postgresql", url.render_as_string(hide_password=False))

    def drop_pg(self, target: Target) -> None:
        name = make_url(target.url).database
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self._pg_names:
            self._pg_names.remove(name)

    def mariadb(self, system: str) -> Target:
        """A new, empty MariaDB database for ``system``."""
        if not self.mariadb_available or self.mariadb_url is None:
            raise RuntimeError("MariaDB is not reachable")
        name = f"memtree_bench_{self._tag}_{system.replace('-', '_')}_{len(self._mariadb_names)}"
        with mariadb_raw(self.mariadb_url, database=None) as conn:
            conn.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        self._mariadb_names.append(name)
        url = _mariadb_url(self.mariadb_url).set(database=name)
        return Target("mariadb", url.render_as_string(hide_password=False))

    def drop_mariadb(self, target: Target) -> None:
        assert self.mariadb_url is not None
        name = make_url(target.url).database
        with mariadb_raw(self.mariadb_url, database=None) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS `{name}`")
        if name in self._mariadb_names:
            self._mariadb_names.remove(name)

    def sqlite(self, system: str) -> Target:
        """A new SQLite file path (not created yet) in the run's temp directory."""
        directory = self.tmp / f"{system}-{uuid.uuid4().hex[:6]}"
        directory.mkdir()
        return Target("sqlite", f"sqlite:///{directory / 'jobs.db'}")

    def drop_sqlite(self, target: Target) -> None:
        shutil.rmtree(Path(target.path).parent, ignore_errors=True)

    def drop(self, target: Target) -> None:
        if target.is_pg:
            self.drop_pg(target)
        elif target.is_mariadb:
            self.drop_mariadb(target)
        else:
            self.drop_sqlite(target)

    def close(self) -> None:
        if self._pg_names and self.pg_available:
            with contextlib.suppress(Exception), self._admin() as conn:
                for name in self._pg_names:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._pg_names.clear()
        if self._mariadb_names and self.mariadb_available and self.mariadb_url is not None:
            with contextlib.suppress(Exception), mariadb_raw(self.mariadb_url, None) as conn:
                for name in self._mariadb_names:
                    conn.execute(f"DROP DATABASE IF EXISTS `{name}`")
        self._mariadb_names.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _libpq(url: str) -> str:
    """A libpq URI: SQLAlchemy driver suffixes (``+psycopg``) removed."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def pg_reachable(admin_url: str) -> str | None:
    """None when the server answers, else why not."""
    try:
        with psycopg.connect(_libpq(admin_url), autocommit=True, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip()}"
    return None


def _mariadb_url(url: str) -> URL:
    """``url`` as the PyMySQL URL memtree takes (``mariadb+pymysql://…``)."""
    return make_url(url).set(drivername="mariadb+pymysql")


def mariadb_reachable(admin_url: str) -> str | None:
    """None when the MariaDB server answers (and PyMySQL is installed), else why not."""
    try:
        with mariadb_raw(admin_url, database=None, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip()}"
    return None


# -- raw connections ---------------------------------------------------------------------


def mariadb_connect(
    url: str, *, autocommit: bool = False, database: str | None = "", connect_timeout: int = 10
) -> Any:
    """A PyMySQL connection to the MariaDB database of ``url`` (``database=None``: none,
    for the server's admin statements), its session at READ COMMITTED and utf8mb4."""
    import pymysql

    parsed = make_url(url)
    return pymysql.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 3306,
        user=parsed.username or "root",
        password=parsed.password or "",
        database=(parsed.database or None) if database == "" else database,
        charset="utf8mb4",
        autocommit=autocommit,
        connect_timeout=connect_timeout,
        init_command=f"SET SESSION TRANSACTION ISOLATION LEVEL {MARIADB_ISOLATION}",
    )


class _MariaRaw:
    """An autocommit PyMySQL connection with ``execute()`` returning its cursor, as
    psycopg's and sqlite3's connections have, for the fills and counts."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Any = None) -> Any:
        cursor = self.conn.cursor()
        cursor.execute(sql, params)
        return cursor


@contextlib.contextmanager
def mariadb_raw(
    url: str, database: str | None = "", *, connect_timeout: int = 10
) -> Iterator[_MariaRaw]:
    conn = mariadb_connect(url, autocommit=True, database=database, connect_timeout=connect_timeout)
    try:
        yield _MariaRaw(conn)
    finally:
        conn.close()


def sqlite_connect(path: str) -> sqlite3.Connection:
    """A sqlite3 connection set up like memtree's engine: WAL, NORMAL, busy timeout,
    transactions opened explicitly (``BEGIN IMMEDIATE``)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 15000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {SQLITE_SYNCHRONOUS}")
    return conn


@contextlib.contextmanager
def raw(target: Target) -> Iterator[Any]:
    """A raw autocommit connection to ``target`` for fills and resets."""
    if target.is_pg:
        with psycopg.connect(target.url, autocommit=True) as pg:
            yield pg
    elif target.is_mariadb:
        with mariadb_raw(target.url) as maria:
            yield maria
    else:
        lite = sqlite_connect(target.path)
        try:
            yield lite
        finally:
            lite.close()


# -- schema ------------------------------------------------------------------------------


def _effects_ddl(target: Target) -> str:
    if target.is_pg:
        return EFFECTS_DDL_PG
    return EFFECTS_DDL_MARIADB if target.is_mariadb else EFFECTS_DDL_SQLITE


def migrate_memtree(target: Target) -> None:
    """memtree's own schema (its Alembic head) plus the domain table."""
    import memtree

    engine = memtree.create_engine(target.url)
    try:
        memtree.Queue(engine).migrate()
    finally:
        engine.dispose()
    with raw(target) as conn:
        conn.execute(_effects_ddl(target))


def reset_memtree(target: Target) -> None:
    """Empty the job and domain tables (a fresh start between workloads)."""
    with raw(target) as conn:
        if target.is_pg:
            conn.execute("TRUNCATE mem_tree_jobs, bench_effects")
        elif target.is_mariadb:
            conn.execute("TRUNCATE TABLE mem_tree_jobs")
            conn.execute("TRUNCATE TABLE bench_effects")
        else:
            conn.execute("DELETE FROM mem_tree_jobs")
            conn.execute("DELETE FROM bench_effects")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def analyze(target: Target) -> None:
    """Statistics after a bulk fill, as autovacuum would have them."""
    with raw(target) as conn:
        if target.is_pg:
            conn.execute("VACUUM ANALYZE mem_tree_jobs")
        elif target.is_mariadb:
            conn.execute("ANALYZE TABLE mem_tree_jobs").fetchall()
        else:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


# -- fills: INSERT … SELECT over generate_series / seq_1_to_N / a recursive CTE -----------

_COLUMNS = (
    "id, kind, payload_json, status, attempts, max_attempts, available_at_ms,"
    " created_at_ms, started_at_ms, completed_at_ms"
)


def fill(
    target: Target,
    count: int,
    *,
    kind: str,
    status: str = "ready",
    start_ms: int | None = None,
    keys: int | None = None,
) -> None:
    """Insert ``count`` memtree rows of ``kind`` in ``status`` ('ready' or 'done'), due in
    insertion order, ending at ``start_ms`` (now by default): raw SQL, not the API. With
    ``keys``, each payload also has a ``"key"`` field cycling over that many values
    (``"k0"`` … in insertion order), for a partitioned limit."""
    if count <= 0:
        return
    base = (now_ms() if start_ms is None else start_ms) - count
    done = status == "done"
    if target.is_pg:
        sql = (
            f"INSERT INTO mem_tree_jobs ({_COLUMNS}) "  # noqa: S608 - constants only
            "SELECT 'job:' || gen_random_uuid()::text, %(kind)s, '{\"i\": ' || g"
            " || CASE WHEN %(keys)s > 0"
            " THEN ', \"key\": \"k' || (g %% %(keys)s) || '\"' ELSE '' END"
            " || '}',"
            " %(status)s, %(attempts)s, 5, %(base)s + g, %(base)s + g,"
            " CASE WHEN %(done)s THEN %(base)s + g END, CASE WHEN %(done)s THEN %(base)s + g END"
            " FROM generate_series(1, %(count)s) AS g"
        )
        params = {
            "kind": kind,
            "status": status,
            "attempts": 1 if done else 0,
            "base": base,
            "done": done,
            "count": count,
            "keys": keys or 0,
        }
        with raw(target) as conn:
            conn.execute(sql, params)
    elif target.is_mariadb:
        # seq_1_to_N: MariaDB's SEQUENCE engine (on by default), its generate_series.
        sql = (
            f"INSERT INTO mem_tree_jobs ({_COLUMNS}) "  # noqa: S608 - constants and an int
            "SELECT CONCAT('job:', UUID()), %(kind)s, CONCAT('{\"i\": ', seq,"
            " IF(%(keys)s > 0,"
            " CONCAT(', \"key\": \"k', MOD(seq, GREATEST(%(keys)s, 1)), '\"'), ''),"
            " '}'),"
            " %(status)s, %(attempts)s, 5, %(base)s + seq, %(base)s + seq,"
            " IF(%(done)s, %(base)s + seq, NULL), IF(%(done)s, %(base)s + seq, NULL)"
            f" FROM seq_1_to_{int(count)}"
        )
        params = {
            "kind": kind,
            "status": status,
            "attempts": 1 if done else 0,
            "base": base,
            "done": int(done),
            "keys": keys or 0,
        }
        with raw(target) as conn:
            conn.execute(sql, params)
    else:
        sql = (
            "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < :count) "  # noqa: S608
            f"INSERT INTO mem_tree_jobs ({_COLUMNS}) "
            "SELECT 'job:' || lower(hex(randomblob(16))), :kind, '{\"i\": ' || g"
            " || CASE WHEN :keys > 0"
            " THEN ', \"key\": \"k' || (g % :keys) || '\"' ELSE '' END"
            " || '}',"
            " :status, :attempts, 5, :base + g, :base + g,"
            " CASE WHEN :done THEN :base + g END, CASE WHEN :done THEN :base + g END FROM s"
        )
        params = {
            "kind": kind,
            "status": status,
            "attempts": 1 if done else 0,
            "base": base,
            "done": int(done),
            "count": count,
            "keys": keys or 0,
        }
        with raw(target) as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, params)
            conn.execute("COMMIT")


def count_status(target: Target, status: str) -> int:
    with raw(target) as conn:
        if target.is_server:  # psycopg and PyMySQL: %s
            row = conn.execute(
                "SELECT count(*) FROM mem_tree_jobs WHERE status = %s", (status,)
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT count(*) FROM mem_tree_jobs WHERE status = ?", (status,)
            ).fetchone()
    return int(row[0])


def count_effects(target: Target) -> int:
    with raw(target) as conn:
        row = conn.execute("SELECT count(*) FROM bench_effects").fetchone()
    return int(row[0])
