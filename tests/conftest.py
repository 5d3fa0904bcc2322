"""One suite, every database: the ``db_url`` fixture runs each test on SQLite, PostgreSQL
and MariaDB.

PostgreSQL comes from ``MEMTREE_TEST_PG_URL`` (default: the loopback server, user
root, trust auth). The suite creates its own database for the run and drops it at
the end; every test starts from an empty ``public`` schema (or, when it takes a migrated
queue, one as a migration leaves it: see "migrated databases, reused"). Without a server the
PostgreSQL tests skip with the reason, except under ``CI=true``, where a missing
server fails the run so that half of the suite can never silently vanish. MariaDB (or
MySQL) comes from ``MEMTREE_TEST_MYSQL_URL`` (default: the loopback server, user root, no
password), the same way: a database of the run's own, emptied for every test.
"""

from __future__ import annotations

import compileall
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import Engine, text

import memtree
import memtree.tree
from memtree import Queue
from memtree.migration import VERSION_TABLE
from memtree.models import Base
from memtree.testing import FakeClock
from tests.flavors import EXECUTORS

PG_ADMIN_URL = os.environ.get(
    "MEMTREE_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/postgres"
)
MYSQL_ADMIN_URL = os.environ.get(
    "MEMTREE_TEST_MYSQL_URL", "mariadb+pymysql://root@127.0.0.1:3306/mysql"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parent.parent
START_MS = 1_780_000_000_000  # 2026-05-28, a fixed "now" for the fake clock

__all__ = ["START_MS", "FakeClock"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile this checkout's modules to bytecode once, for the processes the suite starts.

    The suite starts hundreds of Python processes (the CLI, workers, benchmark children)
    that import memtree, its migrations and the tests' apps from this checkout. Where
    PYTHONDONTWRITEBYTECODE is set (as on CI's machines) none of them keeps the bytecode
    it compiles, so each compiles them all again: a sixth of a CLI command's CPU time.
    """
    for package in ("memtree", "migrations", "tests", "benchmarks", "examples"):
        compileall.compile_dir(ROOT / package, quiet=1)


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
        for engine in _MYSQL_ADMIN.values():
            engine.dispose()
        _MYSQL_ADMIN.clear()


_MYSQL_ADMIN: dict[str, Engine] = {}


def _mysql_admin() -> Engine:
    """The suite's engine on the server's ``mysql`` database (which no test kills the
    connections of), pooled: a new connection to MariaDB takes 20 ms."""
    admin = _MYSQL_ADMIN.get("admin")
    if admin is None:
        admin = _MYSQL_ADMIN["admin"] = sqlalchemy.create_engine(
            MYSQL_ADMIN_URL, pool_size=1, pool_pre_ping=True
        )
    return admin


def _reset_mysql(url: str) -> None:
    """An empty database of that name: dropped with whatever a test left, made again."""
    name = sqlalchemy.make_url(url).database
    with _mysql_admin().connect() as conn:
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
        with _mysql_admin().connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))


def _reset_pg(url: str) -> None:
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


# -- migrated databases, reused ---------------------------------------------------------------
#
# Most tests take a migrated queue (the fixtures below). Migrating for each of them is most
# of their setup: Alembic's whole history on PostgreSQL and SQLite, a copy of the template's
# tables on MariaDB. So a test that takes one gets a database in the state a migration
# leaves, with no rows, and the migration runs only when nothing cheaper gives that state:
# on SQLite a copy of a file migrated once; on PostgreSQL and MariaDB the database the
# previous test used, its memtree tables emptied and the tables of its own (an
# application's) dropped, when its schema (every table, column, index, constraint,
# trigger, function, ..., and the revision recorded) is then exactly the one the last
# migration made. Anything else a test left (a dropped index, an added column, a trigger,
# a downgrade) fails that comparison, and the database is made again and migrated.

#: The fixtures that hand a test a migrated queue. A test that uses one gets its database
#: migrated before any of its fixtures runs, so no fixture of such a test may expect
#: memtree's tables to be absent (those use ``db_url`` or ``engine`` alone).
MIGRATED_QUEUE_FIXTURES = frozenset({"queue", "tree_queue", "wall_queue", "tree_wall_queue"})

#: memtree's tables that hold rows (its version table keeps the revision).
DATA_TABLES = tuple(Base.metadata.tables)

#: The public schema's every object and its definition, one line each.
PG_SCHEMA = text(
    """
    SELECT concat_ws(' ', 'relation', c.relname, c.relkind, c.relpersistence,
                     c.relowner::regrole, c.relrowsecurity, c.relreplident, c.reloptions,
                     c.relacl)
      FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace
    UNION ALL
    SELECT concat_ws(' ', 'column', c.relname, a.attname, a.attnum,
                     format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity,
                     a.attgenerated, a.attcollation::regcollation,
                     pg_get_expr(d.adbin, d.adrelid))
      FROM pg_attribute a
      JOIN pg_class c ON c.oid = a.attrelid
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE c.relnamespace = 'public'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT concat_ws(' ', 'index', pg_get_indexdef(i.indexrelid))
      FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
     WHERE c.relnamespace = 'public'::regnamespace
    UNION ALL
    SELECT concat_ws(' ', 'constraint', conrelid::regclass, conname, pg_get_constraintdef(oid))
      FROM pg_constraint WHERE connamespace = 'public'::regnamespace
    UNION ALL
    SELECT concat_ws(' ', 'trigger', pg_get_triggerdef(t.oid), t.tgenabled)
      FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
     WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal
    UNION ALL
    SELECT concat_ws(' ', 'rule', r.rulename, r.ev_class::regclass)
      FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
     WHERE c.relnamespace = 'public'::regnamespace
    UNION ALL
    SELECT concat_ws(' ', 'policy', p.polname, p.polrelid::regclass)
      FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
     WHERE c.relnamespace = 'public'::regnamespace
    UNION ALL
    SELECT concat_ws(' ', 'sequence', s.seqrelid::regclass, s.seqtypid::regtype, s.seqstart,
                     s.seqincrement, s.seqmin, s.seqmax, s.seqcycle)
      FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
     WHERE c.relnamespace = 'public'::regnamespace
    UNION ALL
    SELECT concat_ws(' ', 'function', oid::regprocedure, md5(prosrc)) FROM pg_proc
     WHERE pronamespace = 'public'::regnamespace
    UNION ALL
    SELECT concat_ws(' ', 'type', typname) FROM pg_type
     WHERE typnamespace = 'public'::regnamespace
    UNION ALL
    SELECT concat_ws(' ', 'statistics', stxname) FROM pg_statistic_ext
     WHERE stxnamespace = 'public'::regnamespace
    UNION ALL
    SELECT concat_ws(' ', 'schema', nspowner::regrole, nspacl)
      FROM pg_namespace WHERE nspname = 'public'
    """
)


def _schema_of(url: str) -> tuple[str, ...]:
    """Every object of the database's schema and its definition, and the revision
    recorded in memtree's version table (if there is one)."""
    with _connect(url) as (conn, database):
        return _schema(conn, database)


@contextmanager
def _connect(url: str) -> Iterator[tuple[sqlalchemy.Connection, str]]:
    """A connection that reaches the database at ``url``, and the database's name: on
    PostgreSQL a connection of its own (closed after), on MariaDB the suite's admin
    connection."""
    database = sqlalchemy.make_url(url).database or ""
    if sqlalchemy.make_url(url).get_backend_name() != "postgresql":
        with _mysql_admin().connect() as conn:
            yield conn, database
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            yield conn, database
    finally:
        engine.dispose()


def _tables(conn: sqlalchemy.Connection, database: str) -> list[str]:
    if conn.dialect.name == "postgresql":
        return sqlalchemy.inspect(conn).get_table_names()
    tables = text(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = :db AND table_type = 'BASE TABLE'"
    )
    return list(conn.execute(tables, {"db": database}).scalars())


def _schema(conn: sqlalchemy.Connection, database: str) -> tuple[str, ...]:
    if conn.dialect.name == "postgresql":
        lines = list(conn.execute(PG_SCHEMA).scalars())
        version = f"SELECT version_num FROM {VERSION_TABLE}"
    else:
        lines = _mysql_schema(conn, database)
        version = f"SELECT version_num FROM `{database}`.{VERSION_TABLE}"
    if VERSION_TABLE in _tables(conn, database):
        lines += [f"revision {v}" for v in conn.execute(text(version)).scalars()]
    return tuple(sorted(lines))


def _mysql_schema(conn: sqlalchemy.Connection, database: str) -> list[str]:
    schema = [
        "SELECT CONCAT_WS(' ', 'database', default_character_set_name, default_collation_name)"
        " FROM information_schema.schemata WHERE schema_name = :db",
        "SELECT CONCAT_WS(' ', 'trigger', trigger_name, event_object_table, action_timing,"
        " event_manipulation, action_statement)"
        " FROM information_schema.triggers WHERE trigger_schema = :db",
        "SELECT CONCAT_WS(' ', 'routine', routine_type, routine_name, routine_definition)"
        " FROM information_schema.routines WHERE routine_schema = :db",
        "SELECT CONCAT_WS(' ', 'event', event_name) FROM information_schema.events"
        " WHERE event_schema = :db",
    ]
    lines = [
        str(line)
        for query in schema
        for line in conn.execute(text(query), {"db": database}).scalars()
    ]
    relations = "SELECT table_name FROM information_schema.tables WHERE table_schema = :db"
    for table in list(conn.execute(text(relations), {"db": database}).scalars()):
        definition = conn.execute(text(f"SHOW CREATE TABLE `{database}`.`{table}`")).one()[1]
        # The next AUTO_INCREMENT value is the rows', not the schema's (emptying resets it).
        lines.append(re.sub(r" AUTO_INCREMENT=\d+", "", definition))
    return lines


#: The schema each database had after its last migration (see _schema_of).
_MIGRATED_SCHEMA: dict[str, tuple[str, ...]] = {}


def _emptied_if_as_migrated(url: str, migrated: tuple[str, ...]) -> bool:
    """Drop every table that is not memtree's (an application's table a test made, with
    whatever depends on it); then, if the schema is exactly ``migrated``, empty memtree's
    tables and return True; False (and nothing emptied) otherwise."""
    with _connect(url) as (conn, database):
        postgresql = conn.dialect.name == "postgresql"
        others = [t for t in _tables(conn, database) if t not in (*DATA_TABLES, VERSION_TABLE)]
        if others and postgresql:
            conn.execute(text(f"DROP TABLE {', '.join(others)} CASCADE"))
            conn.commit()
        elif others:
            # Without the checks, a key of memtree's table that refers to a dropped table
            # is left behind, where the comparison below sees it.
            conn.execute(text("SET SESSION foreign_key_checks = 0"))
            try:
                conn.execute(text(f"DROP TABLE {', '.join(f'`{database}`.`{t}`' for t in others)}"))
            finally:
                conn.execute(text("SET SESSION foreign_key_checks = 1"))
        if _schema(conn, database) != migrated:
            return False
        if postgresql:
            conn.execute(text(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY"))
        else:
            for table in DATA_TABLES:  # also sets AUTO_INCREMENT back to 1
                conn.execute(text(f"TRUNCATE TABLE `{database}`.`{table}`"))
        conn.commit()
    return True


def _migrated_server_database(url: str, request: pytest.FixtureRequest) -> None:
    """Leave the database at ``url`` as memtree's migration makes it, with no rows."""
    migrated = _MIGRATED_SCHEMA.pop(url, None)
    if migrated is not None and _emptied_if_as_migrated(url, migrated):
        _MIGRATED_SCHEMA[url] = migrated
        return
    if sqlalchemy.make_url(url).get_backend_name() == "postgresql":
        _reset_pg(url)
        engine = memtree.create_engine(url)
        try:
            Queue(engine).migrate()
        finally:
            engine.dispose()
    else:
        _reset_mysql(url)
        _copy_mysql_template(url, request.getfixturevalue("mysql_template"))
    _MIGRATED_SCHEMA[url] = _schema_of(url)


def _copy_mysql_template(url: str, template: str) -> None:
    """The migrated template's tables and rows, copied into the (empty) database at
    ``url`` (the migrations themselves are tested on MariaDB by tests/test_migrations.py)."""
    target = sqlalchemy.make_url(url).database
    tables_of = text("SELECT table_name FROM information_schema.tables WHERE table_schema = :db")
    with _mysql_admin().connect() as conn:
        for table in list(conn.execute(tables_of, {"db": template}).scalars()):
            conn.execute(text(f"CREATE TABLE `{target}`.`{table}` LIKE `{template}`.`{table}`"))
            conn.execute(
                text(f"INSERT INTO `{target}`.`{table}` SELECT * FROM `{template}`.`{table}`")
            )
        conn.commit()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once, which a migrated test database copies."""
    path = tmp_path_factory.mktemp("sqlite-template") / "memtree.db"
    engine = memtree.create_engine(f"sqlite:///{path}")
    try:
        Queue(engine).migrate()
    finally:
        engine.dispose()
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert not leftovers, f"the template is more than one file: {leftovers}"
    return path


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database: a SQLite file, a clean PostgreSQL schema, or a new
    MariaDB database; for a test that takes a migrated queue (MIGRATED_QUEUE_FIXTURES), of
    a database migrated to head with no rows."""
    migrated = not MIGRATED_QUEUE_FIXTURES.isdisjoint(request.fixturenames)
    if request.param == "sqlite":
        path = tmp_path / "memtree.db"
        if migrated:
            shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    if request.param == "mariadb":
        marker = request.node.get_closest_marker("not_on_mysql")
        if marker is not None:
            pytest.skip(f"not on MySQL/MariaDB: {marker.args[0]}")
        url: str = request.getfixturevalue("mysql_server_url")
    else:
        url = request.getfixturevalue("pg_server_url")
    if migrated:
        _migrated_server_database(url, request)
    elif request.param == "mariadb":
        _reset_mysql(url)
    else:
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
