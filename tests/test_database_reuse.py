"""The suite's reuse of a server database between tests (tests/conftest.py): a database is
handed on as freshly migrated only when rows and tables of its own are all a test left in
it, and then without them; any other change to its schema makes it built and migrated
again."""

from __future__ import annotations

import pytest
import sqlalchemy
from sqlalchemy import text

import tests.conftest as suite
from memtree import NewJob, Queue

SERVERS = [
    pytest.param("postgresql", marks=pytest.mark.postgresql),
    pytest.param("mariadb", marks=pytest.mark.mariadb),
]


@pytest.fixture(params=SERVERS)
def server_url(request: pytest.FixtureRequest) -> str:
    """The run's database on that server, migrated as a test that takes a queue gets it."""
    url: str = request.getfixturevalue(
        "pg_server_url" if request.param == "postgresql" else "mysql_server_url"
    )
    suite._migrated_server_database(url, request)
    return url


def run(url: str, *statements: str) -> None:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def rows(url: str, query: str) -> list[tuple[object, ...]]:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(query))]
    finally:
        engine.dispose()


INSERT_RATE_EVENT = (
    "INSERT INTO mem_tree_rate_events (limit_name, partition_key, at_ms, weight) "
    "VALUES ('calls', '', 1, 1)"
)


def test_a_database_with_rows_and_tables_of_its_own_is_reused_empty(
    server_url: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = Queue(server_url)
    try:
        queue.enqueue_many([NewJob("a"), NewJob("b", dedupe_key="k")])
        run(
            server_url,
            INSERT_RATE_EVENT,
            INSERT_RATE_EVENT,
            "INSERT INTO mem_tree_permits (gate, slot) VALUES ('g', 0)",
            "INSERT INTO mem_tree_schedules (name, last_slot_ms, updated_at_ms) VALUES ('s', 1, 1)",
            "CREATE TABLE app_orders (id INTEGER PRIMARY KEY)",
            "CREATE TABLE app_lines (order_id INTEGER REFERENCES app_orders (id))",
            "INSERT INTO app_orders (id) VALUES (1)",
        )
    finally:
        queue.close()
    assert suite._schema_of(server_url) != suite._MIGRATED_SCHEMA[server_url]

    def rebuilt(url: str) -> None:
        raise AssertionError("a database with rows and tables of its own was built again")

    monkeypatch.setattr(suite, "_reset_pg", rebuilt)
    monkeypatch.setattr(suite, "_reset_mysql", rebuilt)
    suite._migrated_server_database(server_url, request)
    for table in suite.DATA_TABLES:
        assert rows(server_url, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert suite._schema_of(server_url) == suite._MIGRATED_SCHEMA[server_url], "no app_ tables"
    # Numbering starts again, as in a database just migrated.
    run(server_url, INSERT_RATE_EVENT)
    assert rows(server_url, "SELECT id FROM mem_tree_rate_events") == [(1,)]
    [revision] = [
        line for line in suite._MIGRATED_SCHEMA[server_url] if line.startswith("revision ")
    ]
    assert rows(server_url, "SELECT version_num FROM memtree_alembic_version") == [
        (revision.removeprefix("revision "),)
    ]


#: Changes a test may make to the schema: (PostgreSQL's statements, MariaDB's).
CHANGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "a dropped index": (
        ("DROP INDEX ix_mem_tree_jobs_claim",),
        ("DROP INDEX ix_mem_tree_jobs_claim ON mem_tree_jobs",),
    ),
    "an added index": (("CREATE INDEX ix_extra ON mem_tree_jobs (created_at_ms)",),) * 2,
    "an added column": (("ALTER TABLE mem_tree_jobs ADD COLUMN extra INTEGER",),) * 2,
    "a changed default": (("ALTER TABLE mem_tree_jobs ALTER COLUMN attempts SET DEFAULT 1",),) * 2,
    "a dropped table": (("DROP TABLE mem_tree_schedules",),) * 2,
    "another revision": (("UPDATE memtree_alembic_version SET version_num = 'memtree_0005'",),) * 2,
    "a trigger": (
        (
            "CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RETURN NEW; END $$",
            "CREATE TRIGGER noop BEFORE INSERT ON mem_tree_jobs FOR EACH ROW"
            " EXECUTE FUNCTION noop()",
        ),
        ("CREATE TRIGGER noop BEFORE INSERT ON mem_tree_jobs FOR EACH ROW SET NEW.attempts = 0",),
    ),
    "a view": (("CREATE VIEW ready AS SELECT id FROM mem_tree_jobs",),) * 2,
    "a table option": (
        ("ALTER TABLE mem_tree_jobs SET UNLOGGED",),
        ("ALTER TABLE mem_tree_schedules ENGINE=Aria",),
    ),
    "a collation": (
        ('ALTER TABLE mem_tree_jobs ALTER COLUMN kind TYPE text COLLATE "C"',),
        ("ALTER DATABASE COLLATE utf8mb4_bin",),
    ),
    "a foreign key to a table of a test's own": (
        (
            "CREATE TABLE app_kinds (kind TEXT PRIMARY KEY)",
            "ALTER TABLE mem_tree_jobs ADD FOREIGN KEY (kind) REFERENCES app_kinds (kind)",
        ),
        (
            "CREATE TABLE app_kinds (kind VARCHAR(255) COLLATE utf8mb4_bin PRIMARY KEY)",
            "ALTER TABLE mem_tree_jobs ADD FOREIGN KEY (kind) REFERENCES app_kinds (kind)",
        ),
    ),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_database_whose_schema_changed_is_built_again(
    server_url: str, request: pytest.FixtureRequest, change: str
) -> None:
    migrated = suite._MIGRATED_SCHEMA[server_url]
    postgresql, mariadb = CHANGES[change]
    is_pg = sqlalchemy.make_url(server_url).get_backend_name() == "postgresql"
    run(server_url, *(postgresql if is_pg else mariadb))
    assert suite._schema_of(server_url) != migrated, f"{change} went unnoticed"
    suite._migrated_server_database(server_url, request)
    assert suite._schema_of(server_url) == migrated
