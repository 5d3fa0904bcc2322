"""Databases for the run: a fresh PostgreSQL database and SQLite files per system, all
dropped at the end (even on failure), and the raw-SQL fills the workloads start from."""

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
from sqlalchemy import make_url

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


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Target:
    """Where one system keeps its jobs: a PostgreSQL database or a SQLite file."""

    backend: str  # "postgresql" or "sqlite"
    url: str  # postgresql://… (libpq, asyncpg and memtree all take it) or sqlite:///path

    @property
    def is_pg(self) -> bool:
        return self.backend == "postgresql"

    @property
    def path(self) -> str:
        """The SQLite file."""
        database = make_url(self.url).database
        assert database is not None
        return database


class Databases:
    """Hands out fresh databases and removes every one of them in :meth:`close`."""

    def __init__(self, admin_url: str, *, pg_available: bool) -> None:
        self.admin_url = admin_url
        self.pg_available = pg_available
        self.tmp = Path(tempfile.mkdtemp(prefix="memtree-bench-"))
        self._pg_names: list[str] = []
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
        else:
            self.drop_sqlite(target)

    def close(self) -> None:
        if self._pg_names and self.pg_available:
            with contextlib.suppress(Exception), self._admin() as conn:
                for name in self._pg_names:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._pg_names.clear()
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


# -- raw connections ---------------------------------------------------------------------


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
    else:
        lite = sqlite_connect(target.path)
        try:
            yield lite
        finally:
            lite.close()


# -- schema ------------------------------------------------------------------------------


def migrate_memtree(target: Target) -> None:
    """memtree's own schema (its Alembic head) plus the domain table."""
    import memtree

    engine = memtree.create_engine(target.url)
    try:
        memtree.Queue(engine).migrate()
    finally:
        engine.dispose()
    with raw(target) as conn:
        conn.execute(EFFECTS_DDL_PG if target.is_pg else EFFECTS_DDL_SQLITE)


def reset_memtree(target: Target) -> None:
    """Empty the job and domain tables (a fresh start between workloads)."""
    with raw(target) as conn:
        if target.is_pg:
            conn.execute("TRUNCATE mem_tree_jobs, bench_effects")
        else:
            conn.execute("DELETE FROM mem_tree_jobs")
            conn.execute("DELETE FROM bench_effects")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def analyze(target: Target) -> None:
    """Statistics after a bulk fill, as autovacuum would have them."""
    with raw(target) as conn:
        if target.is_pg:
            conn.execute("VACUUM ANALYZE mem_tree_jobs")
        else:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


# -- fills: INSERT … SELECT over generate_series / a recursive CTE -------------------------

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
        if target.is_pg:
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
