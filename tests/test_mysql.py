"""What only MySQL and MariaDB need: the schema's equivalents of partial indexes, a binary
collation, READ COMMITTED on an application's engine, and deadlock victims run again.
Everything else runs on MariaDB through the ``db_url`` fixture like any other test."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy
from sqlalchemy import Engine, text

import memtree
import memtree.retries
from memtree import NewJob, Queue
from memtree.errors import DatabaseError

pytestmark = pytest.mark.mariadb


@pytest.fixture
def mysql_url(request: pytest.FixtureRequest) -> str:
    from tests.conftest import _reset_mysql

    url: str = request.getfixturevalue("mysql_server_url")
    _reset_mysql(url)
    return url


@pytest.fixture
def app_engine(mysql_url: str) -> Iterator[Engine]:
    """An engine the application built its own way: the driver's defaults, REPEATABLE READ."""
    engine = sqlalchemy.create_engine(mysql_url.replace("mariadb+pymysql", "mysql+pymysql"))
    try:
        yield engine
    finally:
        engine.dispose()


def test_the_active_key_is_a_generated_column_under_a_unique_index(app_engine: Engine) -> None:
    queue = Queue(app_engine)
    queue.migrate()
    first = queue.enqueue(NewJob("k", {}, dedupe_key="key"))
    assert first is not None
    assert queue.enqueue(NewJob("k", {}, dedupe_key="key")) is None
    with app_engine.connect() as conn:
        active = conn.execute(text("SELECT dedupe_active FROM mem_tree_jobs")).scalar_one()
    assert active is not None and len(active) == 64
    [job] = queue.claim_batch(limit=1)
    assert queue.mark_done(job)
    with app_engine.connect() as conn:
        assert conn.execute(text("SELECT dedupe_active FROM mem_tree_jobs")).scalar_one() is None
    assert queue.enqueue(NewJob("k", {}, dedupe_key="key")) is not None  # free again


def test_keys_and_kinds_keep_their_case(app_engine: Engine) -> None:
    # The server's default collation is case-insensitive; memtree's tables are binary.
    queue = Queue(app_engine)
    queue.migrate()
    assert queue.enqueue(NewJob("Mail", {}, dedupe_key="Key")) is not None
    assert queue.enqueue(NewJob("mail", {}, dedupe_key="key")) is not None
    assert [job.kind for job in queue.claim_batch(limit=5, kinds=["mail"])] == ["mail"]


def test_a_key_of_the_longest_length_is_deduped(app_engine: Engine) -> None:
    queue = Queue(app_engine)
    queue.migrate()
    key = "é" * 1000  # 2000 bytes, memtree's limit
    assert queue.enqueue(NewJob("k", {}, dedupe_key=key)) is not None
    assert queue.enqueue(NewJob("k", {}, dedupe_key=key)) is None
    assert queue.enqueue(NewJob("k", {}, dedupe_key=key[:-1] + "e")) is not None


def test_memtrees_transactions_on_an_applications_engine_read_committed(
    app_engine: Engine,
) -> None:
    with app_engine.connect() as conn:
        assert conn.execute(text("SELECT @@tx_isolation")).scalar_one() == "REPEATABLE-READ"
    queue = Queue(app_engine)
    queue.migrate()
    with queue.transaction() as conn:
        # A transaction shows in innodb_trx once it has read, with its own level.
        conn.execute(text("SELECT COUNT(*) FROM mem_tree_jobs")).scalar_one()
        level = conn.execute(
            text(
                "SELECT trx_isolation_level FROM information_schema.innodb_trx"
                " WHERE trx_mysql_thread_id = CONNECTION_ID()"
            )
        ).scalar()
        assert level == "READ COMMITTED"
    with app_engine.connect() as conn:  # the application's own sessions are untouched
        assert conn.execute(text("SELECT @@tx_isolation")).scalar_one() == "REPEATABLE-READ"


def _deadlock(queue: Queue, app_engine: Engine) -> list[str | None] | BaseException:
    """Make memtree's enqueue of keys k1, k2 the victim of a deadlock with an application
    transaction that holds k2 and then wants k1 (made heavier, so InnoDB picks memtree's)."""
    result: list[list[str | None] | BaseException] = []

    def enqueue() -> None:
        try:
            result.append(
                queue.enqueue_many(
                    [NewJob("k", {}, dedupe_key="k1"), NewJob("k", {}, dedupe_key="k2")]
                )
            )
        except BaseException as exc:
            result.append(exc)

    insert = text(
        "INSERT INTO mem_tree_jobs (id, kind, payload_json, dedupe_key, status, attempts,"
        " max_attempts, available_at_ms, created_at_ms)"
        " VALUES (:id, 'app', '{}', :key, 'ready', 0, 5, 0, 0)"
    )
    with app_engine.connect() as conn:
        conn.execute(text("SET SESSION innodb_lock_wait_timeout = 20"))
        conn.commit()
        with conn.begin():
            for n in range(50):  # weight: InnoDB rolls the lighter transaction back
                conn.execute(insert, {"id": f"filler-{n}", "key": None})
            conn.execute(insert, {"id": "app-k2", "key": "k2"})
            thread = threading.Thread(target=enqueue)
            thread.start()
            time.sleep(1.0)  # memtree's insert of k2 is now waiting for this transaction
            conn.execute(insert, {"id": "app-k1", "key": "k1"})
        thread.join(30)
    assert not thread.is_alive()
    return result[0]


def test_a_deadlock_victim_of_memtrees_own_is_run_again(app_engine: Engine) -> None:
    queue = Queue(app_engine)
    queue.migrate()
    assert _deadlock(queue, app_engine) == [None, None]  # run again: both keys were taken


def test_without_retries_the_same_deadlock_reaches_the_caller(
    app_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memtree.retries, "DEADLOCK_TRIES", 1)
    queue = Queue(app_engine)
    queue.migrate()
    outcome = _deadlock(queue, app_engine)
    assert isinstance(outcome, DatabaseError)
    assert outcome.fault is not None and outcome.fault.kind.value == "deadlock"


def test_db_check_reports_a_missing_equivalent_index(mysql_url: str) -> None:
    from alembic.util import CommandError

    engine = memtree.create_engine(mysql_url)
    try:
        Queue(engine).migrate()
        memtree.migration.check(engine)  # no drift
        with engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_mem_tree_jobs_claim ON mem_tree_jobs"))
        with pytest.raises(CommandError, match="ix_mem_tree_jobs_claim is missing"):
            memtree.migration.check(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "sync", "async_"),
    [
        ("mysql://u@db/app", "mysql+pymysql", "mysql+aiomysql"),
        ("mariadb://u@db/app", "mariadb+pymysql", "mariadb+aiomysql"),
        ("mariadb+aiomysql://u@db/app", "mariadb+pymysql", "mariadb+aiomysql"),
    ],
)
def test_mysql_urls_mean_pymysql_and_aiomysql(url: str, sync: str, async_: str) -> None:
    assert memtree.engine.sync_url(memtree.engine.normalize_url(url)).drivername == sync
    assert memtree.async_url(url).drivername == async_
    assert memtree.engine.normalize_url("mysql+mysqldb://u@db/app").drivername == (
        "mysql+mysqldb"  # a driver the application chose is kept
    )


def test_memtrees_own_engine_is_read_committed(mysql_url: str) -> None:
    engine = memtree.create_engine(mysql_url.replace("mariadb+pymysql", "mariadb"))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT @@tx_isolation")).scalar_one() == "READ-COMMITTED"
    finally:
        engine.dispose()
