"""One suite, every database: the ``db_url`` fixture runs each test on SQLite and PostgreSQL.

PostgreSQL comes from ``MEMTREE_TEST_PG_URL`` (default: the loopback server, user
root, trust auth). The suite creates its own database for the run and drops it at
the end; every test starts from an empty ``public`` schema. Without a server the
PostgreSQL tests skip with the reason, except under ``CI=true``, where a missing
server fails the run so that half of the suite can never silently vanish.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import Engine, text

import memtree
import memtree.tree
from memtree import Queue
from memtree.testing import FakeClock
from tests.flavors import EXECUTORS

PG_ADMIN_URL = os.environ.get(
    "MEMTREE_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
START_MS = 1_780_000_000_000  # 2026-05-28, a fixed "now" for the fake clock

__all__ = ["START_MS", "FakeClock"]


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A database of this run's own on the PostgreSQL server, dropped at the end."""
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # no server: skip, or fail under CI
        admin.dispose()
        message = f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc.__class__.__name__}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true requires the PostgreSQL half of the suite)")
        pytest.skip(message)
    name = f"memtree_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = sqlalchemy.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _reset_pg(url: str) -> None:
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgresql", marks=pytest.mark.postgresql),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database: a SQLite file, or a clean PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'memtree.db'}"
    url: str = request.getfixturevalue("pg_server_url")
    _reset_pg(url)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = memtree.create_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START_MS)


@pytest.fixture
def queue(engine: Engine, clock: FakeClock) -> Queue:
    """A migrated queue on a fake clock."""
    q = Queue(engine, clock=clock)
    q.migrate()
    return q


@pytest.fixture
def tree_queue(engine: Engine, clock: FakeClock) -> Queue:
    """A migrated memory-tree queue (its claim order and retired kinds) on a fake clock."""
    q = memtree.tree.queue(engine, clock=clock)
    q.migrate()
    return q


@pytest.fixture
def tree_wall_queue(engine: Engine) -> Queue:
    """A migrated memory-tree queue on the wall clock."""
    q = memtree.tree.queue(engine)
    q.migrate()
    return q


@pytest.fixture
def wall_queue(engine: Engine) -> Queue:
    """A migrated queue on the wall clock, for the original's tests that use real time."""
    q = Queue(engine)
    q.migrate()
    return q


@pytest.fixture(params=EXECUTORS)
def executor(request: pytest.FixtureRequest) -> str:
    """Which executor runs the test's handlers: threads (``def``) or asyncio
    (``async def``); see tests/flavors.py."""
    return str(request.param)
