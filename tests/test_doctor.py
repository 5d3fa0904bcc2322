"""``memtree doctor``: every finding provoked for real on the database it is about, next to
the same check passing before the provocation (so each test can fail both ways).

Small thresholds (``Thresholds``) stand in for big data; nothing here sleeps longer than
MariaDB's whole-second transaction clock needs.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy
from click.testing import CliRunner
from sqlalchemy import Connection, Engine, text

import memtree
from memtree import NewJob, Queue, doctor
from memtree.cli import main
from memtree.doctor import CLAIM_INDEX, Check, Finding, Severity, Thresholds, diagnose
from memtree.errors import ConfigurationError


def _only(name: str) -> pytest.MarkDecorator:
    """Run the test on one of ``db_url``'s databases."""
    mark = getattr(pytest.mark, name)
    return pytest.mark.parametrize("db_url", [pytest.param(name, marks=mark)], indirect=True)


ON_SQLITE, ON_POSTGRESQL, ON_MARIADB = _only("sqlite"), _only("postgresql"), _only("mariadb")

EXPECTED_CHECKS = {
    "sqlite": [
        Check.SCHEMA_REVISION,
        Check.MISSING_INDEXES,
        Check.CLAIM_PLAN,
        Check.JOURNAL_MODE,
        Check.WAL_SIZE,
        Check.CHECKPOINT_LAG,
        Check.BUSY_TIMEOUT,
        Check.FREE_PAGES,
    ],
    "postgresql": [
        Check.SCHEMA_REVISION,
        Check.MISSING_INDEXES,
        Check.INVALID_INDEXES,
        Check.CLAIM_PLAN,
        Check.DEAD_TUPLES,
        Check.BLOAT,
        Check.AUTOVACUUM,
        Check.VACUUM_HORIZON,
        Check.JOB_ROW_LOCKS,
    ],
    "mariadb": [
        Check.SCHEMA_REVISION,
        Check.MISSING_INDEXES,
        Check.CLAIM_PLAN,
        Check.LONG_TRANSACTIONS,
        Check.HISTORY_LIST_LENGTH,
        Check.ISOLATION_LEVEL,
    ],
}


def found(target: Queue | Engine, check: Check, **thresholds: float) -> Finding:
    """The one finding of ``check`` among everything the doctor reports."""
    [finding] = [f for f in diagnose(target, Thresholds(**thresholds)) if f.check is check]
    return finding


def execute(engine: Engine, *statements: str) -> None:
    """Run each statement on its own: on PostgreSQL outside any transaction (CREATE INDEX
    CONCURRENTLY, VACUUM), elsewhere committed one by one."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for statement in statements:
            conn.execute(text(statement))
            conn.commit()


def drop_index(queue: Queue, name: str) -> None:
    on = " ON mem_tree_jobs" if queue.engine.dialect.name == "mariadb" else ""
    execute(queue.engine, f"DROP INDEX {name}{on}")


@contextmanager
def other_session(db_url: str, isolation_level: str | None = None) -> Iterator[Connection]:
    """A connection of another program's, its transaction open until the block ends."""
    engine = sqlalchemy.create_engine(memtree.engine.normalize_url(db_url))
    try:
        with engine.connect() as conn:
            if isolation_level is not None:
                conn = conn.execution_options(isolation_level=isolation_level)
            try:
                yield conn
            finally:
                conn.rollback()
    finally:
        engine.dispose()


def backlog(queue: Queue, count: int, kind: str = "k", pad: int = 0) -> None:
    queue.enqueue_many([NewJob(kind, {"i": i, "pad": "x" * pad}) for i in range(count)])


# -- every database ------------------------------------------------------------------


def test_a_healthy_queue_reports_each_of_its_databases_checks_once(
    db_url: str, queue: Queue
) -> None:
    backlog(queue, 50)
    findings = diagnose(queue)
    assert [f.check for f in findings] == EXPECTED_CHECKS[queue.engine.dialect.name]
    not_ok = {f.check: f for f in findings if f.severity is not Severity.OK}
    # This suite's PostgreSQL server may run with autovacuum off: that, and only that, is
    # then a finding of the server's.
    assert set(not_ok) <= {Check.AUTOVACUUM}, not_ok
    if not_ok:
        assert not_ok[Check.AUTOVACUUM].summary.startswith("the server runs with autovacuum = off")
    assert all(f.advice == "" for f in findings if f.severity is Severity.OK)


def test_a_schema_behind_head_a_lost_revision_and_no_schema_are_critical(
    db_url: str, queue: Queue
) -> None:
    assert found(queue, Check.SCHEMA_REVISION).severity is Severity.OK
    with queue.engine.begin() as conn:
        conn.execute(text("UPDATE memtree_alembic_version SET version_num = 'memtree_0005'"))
    behind = found(queue, Check.SCHEMA_REVISION)
    assert behind.severity is Severity.CRITICAL
    assert "memtree_0005" in behind.summary and "memtree db upgrade" in behind.advice
    with queue.engine.begin() as conn:
        conn.execute(text("UPDATE memtree_alembic_version SET version_num = 'memtree_0099'"))
    newer = found(queue, Check.SCHEMA_REVISION)
    assert newer.severity is Severity.CRITICAL and "does not know" in newer.summary
    with queue.engine.begin() as conn:
        conn.execute(text("DELETE FROM memtree_alembic_version"))
    lost = found(queue, Check.SCHEMA_REVISION)
    assert lost.severity is Severity.CRITICAL and "memtree db stamp" in lost.advice


def test_an_empty_database_is_critical_and_the_table_checks_say_they_did_not_run(
    db_url: str, engine: Engine
) -> None:
    findings = {f.check: f for f in diagnose(engine)}
    assert findings[Check.SCHEMA_REVISION].severity is Severity.CRITICAL
    assert findings[Check.SCHEMA_REVISION].summary == "memtree's schema is missing"
    for check in (Check.MISSING_INDEXES, Check.CLAIM_PLAN):
        assert findings[check].severity is Severity.WARNING
        assert findings[check].summary.startswith("not checked: there is no mem_tree_jobs")


def test_a_dropped_claim_index_is_missing_and_its_ddl_builds_it_again(
    db_url: str, queue: Queue
) -> None:
    backlog(queue, 300)
    assert found(queue, Check.MISSING_INDEXES).severity is Severity.OK
    plan = found(queue, Check.CLAIM_PLAN)
    assert plan.severity is Severity.OK and plan.metrics["claim_index_usable"] == 1
    drop_index(queue, CLAIM_INDEX)
    missing = found(queue, Check.MISSING_INDEXES)
    assert missing.severity is Severity.CRITICAL
    assert missing.summary == f"missing: {CLAIM_INDEX}"
    plan = found(queue, Check.CLAIM_PLAN)
    assert plan.severity is Severity.WARNING and "claim index is missing" in plan.summary
    assert CLAIM_INDEX not in plan.summary  # the plan reads another index now
    [ddl] = [line for line in missing.advice.splitlines() if line.startswith("CREATE")]
    execute(queue.engine, ddl)
    assert found(queue, Check.MISSING_INDEXES).severity is Severity.OK
    rebuilt = found(queue, Check.CLAIM_PLAN)  # (with one kind, a planner may walk either)
    assert rebuilt.severity is Severity.OK and rebuilt.metrics["claim_index_usable"] == 1


def test_a_claim_that_sorts_a_deep_backlog_is_critical(db_url: str, queue: Queue) -> None:
    backlog(queue, 300)
    assert found(queue, Check.CLAIM_PLAN, claim_sort_rows_critical=100).severity is Severity.OK
    drop_index(queue, CLAIM_INDEX)
    drop_index(queue, "idx_mem_tree_jobs_ready")  # nothing left to read ready rows in due order
    sorts = found(queue, Check.CLAIM_PLAN, claim_sort_rows_critical=100)
    assert sorts.severity is Severity.CRITICAL
    assert sorts.summary.startswith("a claim of 'k' (300 ready)")
    assert "sorts" in sorts.summary
    # Under the line (the default 10,000 rows) it is the missing index's warning only.
    assert found(queue, Check.CLAIM_PLAN).severity is Severity.WARNING


def test_a_check_that_fails_is_a_warning_and_the_others_still_run(
    db_url: str, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement the database refuses (on PostgreSQL it aborts the transaction) makes its
    own check a warning; every later check runs in a transaction of its own."""

    def refused(exam: doctor._Exam) -> Finding:
        exam.conn.execute(text("SELECT * FROM no_table_of_anyones"))
        raise AssertionError("the database took it")

    name = queue.engine.dialect.name
    family = "mysql" if name == "mariadb" else name
    healthy = diagnose(queue)
    (check, _, needs_table), *rest = doctor._CHECKS[family]
    monkeypatch.setitem(doctor._CHECKS, family, ((check, refused, needs_table), *rest))
    first, *others = diagnose(queue)
    assert first.check is check and first.severity is Severity.WARNING
    assert first.summary.startswith("not checked: ") and "no_table_of_anyones" in first.summary
    assert [(f.check, f.severity) for f in others] == [(f.check, f.severity) for f in healthy[1:]]


def test_thresholds_are_validated_when_built() -> None:
    with pytest.raises(ConfigurationError, match="dead_tuple_ratio_warn must be a number"):
        Thresholds(dead_tuple_ratio_warn=-1)
    with pytest.raises(ConfigurationError, match="must not exceed"):
        Thresholds(long_transaction_warn_s=10, long_transaction_critical_s=5)
    with pytest.raises(ConfigurationError, match="a number"):
        Thresholds(bloat_min_bytes=True)
    assert doctor.worst([]) is Severity.OK


# -- SQLite ----------------------------------------------------------------------------


@ON_SQLITE
def test_a_rollback_journal_is_a_warning(db_url: str) -> None:
    engine = memtree.create_engine(db_url, sqlite_journal_mode="DELETE")
    try:
        queue = Queue(engine)
        queue.migrate()
        journal = found(queue, Check.JOURNAL_MODE)
        assert journal.severity is Severity.WARNING
        assert journal.summary.startswith("journal_mode=delete")
        assert "docs/sharing.md" in journal.advice
        assert found(queue, Check.WAL_SIZE).summary == "not in WAL mode: no WAL file"
    finally:
        engine.dispose()
    # memtree's default keeps the rollback journal of a file that holds the queue (the
    # crate's); told to, it converts the file.
    with Queue(db_url) as auto:
        assert found(auto, Check.JOURNAL_MODE).severity is Severity.WARNING
    wal_engine = memtree.create_engine(db_url, sqlite_journal_mode="WAL")
    try:
        wal = Queue(wal_engine)
        wal.count_total()
        assert found(wal, Check.JOURNAL_MODE).severity is Severity.OK
    finally:
        wal_engine.dispose()


@ON_SQLITE
def test_a_reader_holding_a_snapshot_blocks_the_checkpoint_and_the_wal_grows(
    db_url: str, queue: Queue
) -> None:
    limits = {"wal_size_warn_bytes": 256 * 1024, "checkpoint_lag_warn_frames": 50}
    assert found(queue, Check.WAL_SIZE, **limits).severity is Severity.OK
    assert found(queue, Check.CHECKPOINT_LAG, **limits).severity is Severity.OK
    reader = sqlite3.connect(sqlalchemy.make_url(db_url).database or "", isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM mem_tree_jobs").fetchone()  # its snapshot
        for _ in range(4):
            backlog(queue, 250, pad=1000)
        lag = found(queue, Check.CHECKPOINT_LAG, **limits)
        assert lag.severity is Severity.WARNING, lag
        assert int(lag.metrics["lag_frames"] or 0) > 200
        grown = found(queue, Check.WAL_SIZE, **limits)
        assert grown.severity is Severity.WARNING
        assert int(grown.metrics["wal_bytes"] or 0) > 1024 * 1024
    finally:
        reader.close()
    # The reader gone, the doctor's own passive checkpoint copies every frame back; the WAL
    # file keeps its size.
    assert found(queue, Check.CHECKPOINT_LAG, **limits).metrics["lag_frames"] == 0
    assert found(queue, Check.WAL_SIZE, **limits).severity is Severity.WARNING


@ON_SQLITE
def test_a_short_or_zero_busy_timeout_is_found(db_url: str, queue: Queue) -> None:
    assert found(queue, Check.BUSY_TIMEOUT).metrics == {"busy_timeout_ms": 15_000}
    for timeout_ms, severity in ((500, Severity.WARNING), (0, Severity.CRITICAL)):
        engine = memtree.create_engine(db_url, sqlite_busy_timeout_ms=timeout_ms)
        try:
            finding = found(Queue(engine), Check.BUSY_TIMEOUT)
        finally:
            engine.dispose()
        assert finding.severity is severity
        assert finding.summary.startswith(f"busy_timeout={timeout_ms} ms")


@ON_SQLITE
def test_free_pages_after_deleting_many_rows_are_found(db_url: str, queue: Queue) -> None:
    limits = {"free_page_ratio_warn": 0.25, "free_pages_min_bytes": 64 * 1024}
    backlog(queue, 500, pad=2000)
    assert found(queue, Check.FREE_PAGES, **limits).severity is Severity.OK
    with queue.engine.begin() as conn:
        conn.execute(text("DELETE FROM mem_tree_jobs"))
    free = found(queue, Check.FREE_PAGES, **limits)
    assert free.severity is Severity.WARNING and "VACUUM" in free.advice
    assert int(free.metrics["free_bytes"] or 0) >= 500 * 2000


# -- PostgreSQL ------------------------------------------------------------------------


@ON_POSTGRESQL
def test_dead_rows_and_autovacuum_disabled_on_the_table_are_found(
    db_url: str, queue: Queue
) -> None:
    limits = {"dead_tuples_min_rows": 100}
    execute(queue.engine, "ALTER TABLE mem_tree_jobs SET (autovacuum_enabled = false)")
    backlog(queue, 300)
    assert found(queue, Check.DEAD_TUPLES, **limits).severity is Severity.OK
    with queue.engine.connect() as conn:
        for _ in range(2):  # 600 dead versions beside 300 live rows
            conn.execute(text("UPDATE mem_tree_jobs SET attempts = attempts"))
            conn.commit()
        conn.execute(text("SELECT pg_stat_force_next_flush()"))  # flushed as it goes idle
        conn.commit()
    dead = found(queue, Check.DEAD_TUPLES, **limits)
    assert dead.severity is Severity.CRITICAL, dead
    assert dead.summary == "mem_tree_jobs: 600 dead rows beside 300 live (67%)"
    assert dead.metrics["mem_tree_jobs.dead_rows"] == 600
    warned = found(
        queue, Check.DEAD_TUPLES, dead_tuples_min_rows=100, dead_tuple_ratio_critical=0.9
    )
    assert warned.severity is Severity.WARNING
    disabled = found(queue, Check.AUTOVACUUM)
    assert disabled.severity is Severity.WARNING
    assert "autovacuum is disabled on mem_tree_jobs" in disabled.detail
    execute(queue.engine, "ALTER TABLE mem_tree_jobs RESET (autovacuum_enabled)")
    behind = found(queue, Check.AUTOVACUUM)
    assert "autovacuum is behind on mem_tree_jobs: 600 dead rows" in behind.detail
    execute(queue.engine, "VACUUM mem_tree_jobs")
    assert found(queue, Check.DEAD_TUPLES, **limits).severity is Severity.OK
    assert "on mem_tree_jobs" not in found(queue, Check.AUTOVACUUM).detail.split("\n")[0]


@ON_POSTGRESQL
def test_a_table_and_index_left_mostly_empty_are_bloated(db_url: str, queue: Queue) -> None:
    limits = {"bloat_min_bytes": 200 * 1024}
    backlog(queue, 3000, pad=200)
    execute(queue.engine, "ANALYZE mem_tree_jobs")
    fresh = found(queue, Check.BLOAT, **limits)
    assert fresh.severity is Severity.OK, fresh.detail
    assert float(fresh.metrics["mem_tree_jobs.bloat_ratio"] or 0) < 0.2
    execute(
        queue.engine,
        "DELETE FROM mem_tree_jobs WHERE right(id, 1) <> '0'",  # 15 rows of every 16
        "VACUUM ANALYZE mem_tree_jobs",  # their space reusable, but not given back
    )
    bloated = found(queue, Check.BLOAT, **limits)
    assert bloated.severity is Severity.WARNING
    assert bloated.summary.startswith("mem_tree_jobs is ")
    assert "pk_mem_tree_jobs" in bloated.summary
    assert float(bloated.metrics["mem_tree_jobs.bloat_ratio"] or 0) > 0.8


@ON_POSTGRESQL
def test_invalid_indexes_left_by_a_failed_concurrent_build_are_found(
    db_url: str, queue: Queue
) -> None:
    backlog(queue, 3)
    assert found(queue, Check.INVALID_INDEXES).severity is Severity.OK
    with pytest.raises(sqlalchemy.exc.IntegrityError):  # three rows share the kind
        execute(
            queue.engine, "CREATE UNIQUE INDEX CONCURRENTLY scratch_kind ON mem_tree_jobs (kind)"
        )
    foreign = found(queue, Check.INVALID_INDEXES)
    assert foreign.severity is Severity.WARNING
    assert "DROP INDEX CONCURRENTLY scratch_kind" in foreign.advice
    drop_index(queue, CLAIM_INDEX)
    with pytest.raises(sqlalchemy.exc.IntegrityError):  # memtree's name, a failed build
        execute(
            queue.engine,
            f"CREATE UNIQUE INDEX CONCURRENTLY {CLAIM_INDEX} ON mem_tree_jobs (kind) "
            "WHERE status = 'ready'",
        )
    findings = {f.check: f for f in diagnose(queue)}
    assert findings[Check.INVALID_INDEXES].severity is Severity.CRITICAL
    assert f"REINDEX INDEX CONCURRENTLY {CLAIM_INDEX}" in findings[Check.INVALID_INDEXES].advice
    assert findings[Check.MISSING_INDEXES].severity is Severity.OK  # it is there, by name
    assert findings[Check.CLAIM_PLAN].metrics["claim_index_usable"] == 0


@ON_POSTGRESQL
def test_a_snapshot_held_open_holds_back_the_vacuum_horizon(db_url: str, queue: Queue) -> None:
    limits = {"long_transaction_warn_s": 0.2, "long_transaction_critical_s": 60}
    assert found(queue, Check.VACUUM_HORIZON, **limits).severity is Severity.OK
    with other_session(db_url, "REPEATABLE READ") as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()  # takes the snapshot
        time.sleep(0.3)
        held = found(queue, Check.VACUUM_HORIZON, **limits)
        assert held.severity is Severity.WARNING
        assert f"(pid {pid})" in held.summary and "idle in transaction" in held.detail
        critical = found(
            queue,
            Check.VACUUM_HORIZON,
            long_transaction_warn_s=0.2,
            long_transaction_critical_s=0.25,
        )
        assert critical.severity is Severity.CRITICAL
        # A snapshot locks no job row.
        assert found(queue, Check.JOB_ROW_LOCKS, job_lock_warn_s=0.2).severity is Severity.OK
    assert found(queue, Check.VACUUM_HORIZON, **limits).severity is Severity.OK


@ON_POSTGRESQL
def test_a_transaction_holding_a_job_row_lock_is_found(db_url: str, queue: Queue) -> None:
    backlog(queue, 2)
    limits = {"job_lock_warn_s": 0.2, "job_lock_critical_s": 60}
    assert found(queue, Check.JOB_ROW_LOCKS, **limits).severity is Severity.OK
    with other_session(db_url) as conn:
        conn.execute(text("SELECT id FROM mem_tree_jobs LIMIT 1 FOR UPDATE"))
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        time.sleep(0.3)
        locks = found(queue, Check.JOB_ROW_LOCKS, **limits)
        assert locks.severity is Severity.WARNING
        assert f"(pid {pid})" in locks.summary and "RowShareLock" in locks.detail
        past_lease = found(
            queue, Check.JOB_ROW_LOCKS, job_lock_warn_s=0.2, job_lock_critical_s=0.25
        )
        assert past_lease.severity is Severity.CRITICAL
    assert found(queue, Check.JOB_ROW_LOCKS, **limits).severity is Severity.OK


# -- MariaDB ---------------------------------------------------------------------------


@ON_MARIADB
def test_long_transactions_and_those_holding_row_locks_are_found(db_url: str, queue: Queue) -> None:
    backlog(queue, 2)
    assert found(queue, Check.LONG_TRANSACTIONS, long_transaction_warn_s=0.5).severity is (
        Severity.OK
    )
    with other_session(db_url) as locker, other_session(db_url) as reader:
        locker.execute(text("SELECT id FROM mem_tree_jobs LIMIT 1 FOR UPDATE"))
        locker_id = locker.execute(text("SELECT CONNECTION_ID()")).scalar_one()
        reader.execute(text("START TRANSACTION WITH CONSISTENT SNAPSHOT"))
        reader_id = reader.execute(text("SELECT CONNECTION_ID()")).scalar_one()
        time.sleep(1.2)  # trx_started has whole seconds
        both = found(queue, Check.LONG_TRANSACTIONS, long_transaction_warn_s=0.5)
        assert both.severity is Severity.WARNING
        assert f"connection {locker_id}" in both.detail and f"connection {reader_id}" in both.detail
        # Held for less than a long transaction's limit, only the row locks are a finding.
        locks = found(queue, Check.LONG_TRANSACTIONS, job_lock_warn_s=0.5)
        assert locks.severity is Severity.WARNING
        assert f"connection {locker_id}" in locks.detail
        assert f"connection {reader_id}" not in locks.detail
        critical = found(
            queue, Check.LONG_TRANSACTIONS, job_lock_warn_s=0.5, job_lock_critical_s=0.5
        )
        assert critical.severity is Severity.CRITICAL
    assert found(queue, Check.LONG_TRANSACTIONS, long_transaction_warn_s=0.5).severity is (
        Severity.OK
    )


@ON_MARIADB
def test_an_old_snapshot_lets_the_history_list_grow(db_url: str, queue: Queue) -> None:
    backlog(queue, 20)
    limits = {"history_list_length_warn": 10, "history_list_length_critical": 10**9}
    assert found(
        queue,
        Check.HISTORY_LIST_LENGTH,
        history_list_length_warn=10**8,
        history_list_length_critical=10**9,
    ).severity is (Severity.OK)
    with other_session(db_url) as reader:
        reader.execute(text("START TRANSACTION WITH CONSISTENT SNAPSHOT"))
        for _ in range(20):  # twenty committed changes purge must keep for that snapshot
            assert queue.claim_next() is not None
        grown = found(queue, Check.HISTORY_LIST_LENGTH, **limits)
        assert grown.severity is Severity.WARNING
        assert int(grown.metrics["history_list_length"] or 0) >= 20


@ON_MARIADB
def test_the_isolation_level_of_the_queues_engine_is_reported(db_url: str, queue: Queue) -> None:
    assert found(queue, Check.ISOLATION_LEVEL).metrics == {"level": "READ COMMITTED"}
    for level, severity in (("REPEATABLE READ", Severity.OK), ("SERIALIZABLE", Severity.WARNING)):
        engine = memtree.create_engine(db_url, isolation_level=level)
        try:
            finding = found(Queue(engine), Check.ISOLATION_LEVEL)
        finally:
            engine.dispose()
        assert finding.severity is severity and finding.metrics == {"level": level}


# -- the command -----------------------------------------------------------------------


def test_the_command_prints_every_check_and_exits_0_unless_one_is_critical(
    db_url: str, queue: Queue
) -> None:
    backlog(queue, 5)
    runner = CliRunner()
    table = runner.invoke(main, ["--database-url", db_url, "doctor"], terminal_width=200)
    assert table.exit_code == 0, table.output
    for check in EXPECTED_CHECKS[queue.engine.dialect.name]:
        assert check.value in table.output
    assert f"{len(EXPECTED_CHECKS[queue.engine.dialect.name])} checks:" in table.output
    report = json.loads(runner.invoke(main, ["--database-url", db_url, "doctor", "--json"]).output)
    assert report["dialect"] == queue.engine.dialect.name
    assert report["worst"] in ("ok", "warning")
    assert [f["check"] for f in report["findings"]] == EXPECTED_CHECKS[report["dialect"]]
    assert set(report["findings"][0]) == {
        "check",
        "severity",
        "summary",
        "detail",
        "advice",
        "metrics",
    }
    drop_index(queue, CLAIM_INDEX)
    critical = runner.invoke(main, ["--database-url", db_url, "doctor", "--json"])
    assert critical.exit_code == 1
    report = json.loads(critical.output)
    assert report["worst"] == "critical"
    [missing] = [f for f in report["findings"] if f["check"] == "missing_indexes"]
    assert missing["severity"] == "critical" and CLAIM_INDEX in missing["summary"]
    text_run = runner.invoke(main, ["--database-url", db_url, "doctor"], terminal_width=200)
    assert text_run.exit_code == 1 and "critical" in text_run.output


def test_the_command_on_a_missing_sqlite_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["--database-url", f"sqlite:///{tmp_path / 'none.db'}", "doctor"]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: the SQLite file {tmp_path / 'none.db'} does not exist "
        "(create it with `memtree db upgrade`)"
    ]
