"""One suite, every database: the ``db_url`` fixture runs each test on SQLite, PostgreSQL
and MariaDB.

PostgreSQL comes from ``MEMTREE_TEST_PG_URL`` (default: the loopback server, user
root, trust auth). The suite creates its own database for the run and drops it at
the end; every test starts from an empty ``public`` schema. Without a server the
PostgreSQL tests skip with the reason, except under ``CI=true``, where a missing
server fails the run so that half of the suite can never silently vanish. MariaDB (or
MySQL) comes from ``MEMTREE_TEST_MYSQL_URL`` (default: the loopback server, user root, no
password), the same way: a database of the run's own, emptied for every test.
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
MYSQL_ADMIN_URL = os.environ.get(
    "MEMTREE_TEST_MYSQL_URL", "mariadb+pymysql://root@127.0.0.1:3306/mysql"
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


@pytest.fixture(scope="session")
def mysql_server_url() -> Iterator[str]:
    """A database of this run's own on the MariaDB (or MySQL) server, dropped at the end."""
    admin = sqlalchemy.create_engine(MYSQL_ADMIN_URL)
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # no server: skip, or fail under CI
        admin.dispose()
        message = f"MariaDB is not reachable at {MYSQL_ADMIN_URL}: {exc.__class__.__name__}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true requires the MariaDB third of the suite)")
        pytest.skip(message)
    name = f"memtree_test_{uuid.uuid4().hex[:10]}"
    url = (
        sqlalchemy.make_url(MYSQL_ADMIN_URL)
        .set(database=name)
        .render_as_string(hide_password=False)
    )
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()
        _MYSQL_ADMIN.clear()


_MYSQL_ADMIN: dict[str, Engine] = {}


def _reset_mysql(url: str) -> None:
    """An empty database of that name: dropped with whatever a test left, made again."""
    name = sqlalchemy.make_url(url).database
    admin = _MYSQL_ADMIN.get("admin")
    if admin is None:
        admin = _MYSQL_ADMIN["admin"] = sqlalchemy.create_engine(
            MYSQL_ADMIN_URL, poolclass=sqlalchemy.pool.NullPool
        )
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        # The server's default character set and collation (case-insensitive): memtree's
        # tables must bring their own.
        conn.execute(text(f"CREATE DATABASE `{name}`"))


@pytest.fixture(scope="session")
def mysql_template(mysql_server_url: str) -> Iterator[str]:
    """A database of the run's own migrated to head once, whose tables a migrated test
    database copies (MariaDB's DDL takes about a second for the whole history, which
    would be most of the MariaDB third of the suite's time)."""
    url = sqlalchemy.make_url(mysql_server_url)
    name = f"{url.database}_template"
    template = url.set(database=name).render_as_string(hide_password=False)
    _reset_mysql(template)
    engine = memtree.create_engine(template)
    try:
        Queue(engine).migrate()
    finally:
        engine.dispose()
    try:
        yield name
    finally:
        with _MYSQL_ADMIN["admin"].connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))


def _migrate(queue: Queue, request: pytest.FixtureRequest) -> None:
    """``queue.migrate()``; on MariaDB from a copy of the migrated template's tables (the
    migrations themselves are tested on MariaDB by tests/test_migrations.py)."""
    if queue.engine.dialect.name in ("mysql", "mariadb"):
        template: str = request.getfixturevalue("mysql_template")
        target = queue.engine.url.database
        tables_of = text(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = :db"
        )
        with _MYSQL_ADMIN["admin"].connect() as conn:
            if conn.execute(tables_of, {"db": target}).first() is not None:
                queue.migrate()  # another fixture's queue made the tables already
                return
            for table in list(conn.execute(tables_of, {"db": template}).scalars()):
                conn.execute(text(f"CREATE TABLE `{target}`.`{table}` LIKE `{template}`.`{table}`"))
                conn.execute(
                    text(f"INSERT INTO `{target}`.`{table}` SELECT * FROM `{template}`.`{table}`")
                )
            conn.commit()
    queue.migrate()


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
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database: a SQLite file, a clean PostgreSQL schema, or a new
    MariaDB database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'memtree.db'}"
    if request.param == "mariadb":
        marker = request.node.get_closest_marker("not_on_mysql")
        if marker is not None:
            pytest.skip(f"not on MySQL/MariaDB: {marker.args[0]}")
        mysql_url: str = request.getfixturevalue("mysql_server_url")
        _reset_mysql(mysql_url)
        return mysql_url
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
def queue(engine: Engine, clock: FakeClock, request: pytest.FixtureRequest) -> Queue:
    """A migrated queue on a fake clock."""
    q = Queue(engine, clock=clock)
    _migrate(q, request)
    return q


@pytest.fixture
def tree_queue(engine: Engine, clock: FakeClock, request: pytest.FixtureRequest) -> Queue:
    """A migrated memory-tree queue (its claim order and retired kinds) on a fake clock."""
    q = memtree.tree.queue(engine, clock=clock)
    _migrate(q, request)
    return q


@pytest.fixture
def tree_wall_queue(engine: Engine, request: pytest.FixtureRequest) -> Queue:
    """A migrated memory-tree queue on the wall clock."""
    q = memtree.tree.queue(engine)
    _migrate(q, request)
    return q


@pytest.fixture
def wall_queue(engine: Engine, request: pytest.FixtureRequest) -> Queue:
    """A migrated queue on the wall clock, for the original's tests that use real time."""
    q = Queue(engine)
    _migrate(q, request)
    return q


@pytest.fixture(params=EXECUTORS)
def executor(request: pytest.FixtureRequest) -> str:
    """Which executor runs the test's handlers: threads (``def``) or asyncio
    (``async def``); see tests/flavors.py."""
    return str(request.param)
