"""``memtree doctor``: checks of the database the queue lives in, each a :class:`Finding`
with what to do about it.

:func:`diagnose` runs every check that applies to the queue's database and returns one
finding per check, the checks that pass included (severity ``ok``), so a monitor reading
``memtree doctor --json`` sees that each one ran. A check that cannot run (a missing
privilege, a missing table) is a ``warning`` that says why.

- Every database: the schema's revision (through :mod:`memtree.migration`), memtree's
  indexes, and the plan of a claim (EXPLAIN of the claim's own pick, from
  :func:`memtree.store.claim_pick`: it must not sort the backlog).
- PostgreSQL: dead rows, bloat and autovacuum of memtree's tables, invalid indexes,
  transactions that hold back vacuum's horizon, transactions that hold locks on job rows.
- MySQL and MariaDB (InnoDB): long transactions, the history list length (undo that purge
  cannot remove), the isolation level of the queue's engine.
- SQLite: the journal mode, the WAL's size and checkpoint lag, the busy timeout, free pages.

This module reads the database's own catalogs and statistics (``pg_stat_user_tables``,
``pg_stat_activity``, ``pg_locks``, ``pg_index``, ``pg_stats``; ``innodb_trx``,
``innodb_metrics``; SQLite's pragmas) and nothing of memtree's tables but what
:mod:`memtree.store` reads for it (the ready backlog by kind) and the plans of
statements the store builds. It never writes a row, never takes a lock a worker waits
for and never runs a claim: EXPLAIN plans the pick without running it. On PostgreSQL its
transactions are READ ONLY; on SQLite it reads on a connection of its own, outside
memtree's ``BEGIN IMMEDIATE``, and the one thing it does beyond reading is a passive
checkpoint (``PRAGMA wal_checkpoint(PASSIVE)``, what SQLite's own commits run: it never
waits, blocks no one and changes no data), whose answer is the checkpoint lag.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import sqlalchemy
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Executable, Select

from memtree import dberrors, migration, store
from memtree.clock import clock_for
from memtree.errors import ConfigurationError, MemtreeError
from memtree.models import MYSQL_FAMILY, TABLE_NAME, Base
from memtree.queue import Queue
from memtree.redact import scrub
from memtree.types import DEFAULT_LOCK_DURATION_MS

__all__ = [
    "AUTOVACUUM_LAG_RATIO",
    "BLOAT_MIN_BYTES",
    "BLOAT_RATIO_WARN",
    "BUSY_TIMEOUT_WARN_MS",
    "CHECKPOINT_LAG_WARN_FRAMES",
    "CLAIM_INDEX",
    "CLAIM_SORT_ROWS_CRITICAL",
    "DEAD_TUPLES_MIN_ROWS",
    "DEAD_TUPLE_RATIO_CRITICAL",
    "DEAD_TUPLE_RATIO_WARN",
    "FREE_PAGES_MIN_BYTES",
    "FREE_PAGE_RATIO_WARN",
    "HISTORY_LIST_LENGTH_CRITICAL",
    "HISTORY_LIST_LENGTH_WARN",
    "JOB_LOCK_CRITICAL_S",
    "JOB_LOCK_WARN_S",
    "LONG_TRANSACTION_CRITICAL_S",
    "LONG_TRANSACTION_WARN_S",
    "WAL_SIZE_WARN_BYTES",
    "Check",
    "Finding",
    "Severity",
    "Thresholds",
    "diagnose",
    "worst",
]

_MiB = 1024 * 1024

#: Dead rows of a memtree table, as a share of its rows, that make a warning (PostgreSQL).
DEAD_TUPLE_RATIO_WARN = 0.2
#: ... and that make it critical: claims walk past more dead index entries than live ones.
DEAD_TUPLE_RATIO_CRITICAL = 0.5
#: Fewer dead rows than this are never a finding, whatever their share.
DEAD_TUPLES_MIN_ROWS = 10_000
#: The estimated share of a table or index that is empty space, for a warning.
BLOAT_RATIO_WARN = 0.5
#: A table or index smaller than this is never bloated enough to matter.
BLOAT_MIN_BYTES = 64 * _MiB
#: Dead rows past this many times the count at which autovacuum should start: it is behind.
AUTOVACUUM_LAG_RATIO = 2.0
#: A transaction open this long holds back vacuum (PostgreSQL) or purge (InnoDB).
LONG_TRANSACTION_WARN_S = 300.0
LONG_TRANSACTION_CRITICAL_S = 3600.0
#: A transaction holding locks on job rows this long stalls those jobs' settles.
JOB_LOCK_WARN_S = 30.0
#: ... and past a lease (the default 5 minutes) its job can be recovered and run again.
JOB_LOCK_CRITICAL_S = DEFAULT_LOCK_DURATION_MS / 1000
#: A claim that sorts this many ready rows of its kind (rather than walking the claim index
#: to the first few) is critical: it costs more the deeper the backlog, which it deepens.
CLAIM_SORT_ROWS_CRITICAL = 10_000
#: Undo records purge has not removed (InnoDB's history list length).
HISTORY_LIST_LENGTH_WARN = 100_000
HISTORY_LIST_LENGTH_CRITICAL = 1_000_000
#: A SQLite WAL file this large (it keeps its size after a checkpoint).
WAL_SIZE_WARN_BYTES = 64 * _MiB
#: WAL frames a checkpoint cannot copy back yet (ten times SQLite's auto-checkpoint).
CHECKPOINT_LAG_WARN_FRAMES = 10_000
#: A SQLite busy timeout shorter than this fails writers that meet each other (0 always).
BUSY_TIMEOUT_WARN_MS = 1_000
#: Free pages of a SQLite file, as a share of its pages and in bytes, for a warning.
FREE_PAGE_RATIO_WARN = 0.25
FREE_PAGES_MIN_BYTES = 64 * _MiB

#: The index a claim should walk: ready rows of one kind in due order.
CLAIM_INDEX = "ix_mem_tree_jobs_claim"
#: How many of the deepest kinds' claims are EXPLAINed.
_PLANNED_KINDS = 3
#: The batch a claim's plan is made for (a worker's claim asks for a few jobs).
_PLANNED_LIMIT = 10
#: memtree's tables, whose statistics and indexes the checks read.
_TABLES = tuple(Base.metadata.tables)
#: At most this many sessions or relations are named in a finding's detail.
_SHOWN = 5


class Severity(StrEnum):
    """How bad a finding is. ``critical`` makes ``memtree doctor`` exit 1."""

    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {Severity.OK: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


class Check(StrEnum):
    """The stable name of each check (``check`` in ``--json``)."""

    SCHEMA_REVISION = "schema_revision"
    MISSING_INDEXES = "missing_indexes"
    CLAIM_PLAN = "claim_plan"
    INVALID_INDEXES = "invalid_indexes"
    DEAD_TUPLES = "dead_tuples"
    BLOAT = "bloat"
    AUTOVACUUM = "autovacuum"
    VACUUM_HORIZON = "vacuum_horizon"
    JOB_ROW_LOCKS = "job_row_locks"
    LONG_TRANSACTIONS = "long_transactions"
    HISTORY_LIST_LENGTH = "history_list_length"
    ISOLATION_LEVEL = "isolation_level"
    JOURNAL_MODE = "journal_mode"
    WAL_SIZE = "wal_size"
    CHECKPOINT_LAG = "checkpoint_lag"
    BUSY_TIMEOUT = "busy_timeout"
    FREE_PAGES = "free_pages"


Metric = int | float | str | None


@dataclass(frozen=True, slots=True)
class Finding:
    """What one check found: a one-line ``summary``, the ``detail`` behind it (the sessions,
    tables or plans it is about), ``advice`` on what to do (empty when nothing is to be
    done) and the numbers it measured, for monitoring."""

    check: Check
    severity: Severity
    summary: str
    advice: str = ""
    detail: str = ""
    metrics: Mapping[str, Metric] = field(default_factory=dict, hash=False)

    def as_dict(self) -> dict[str, Any]:
        """The finding as JSON can hold it."""
        return {
            "check": self.check.value,
            "severity": self.severity.value,
            "summary": self.summary,
            "detail": self.detail,
            "advice": self.advice,
            "metrics": dict(self.metrics),
        }


def worst(findings: Sequence[Finding]) -> Severity:
    """The most severe of ``findings`` (``ok`` for none)."""
    return max((f.severity for f in findings), key=lambda s: s.rank, default=Severity.OK)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Where each check draws its lines; the defaults are the module's constants. Tests and
    monitors with their own service levels give their own (validated here, when built)."""

    dead_tuple_ratio_warn: float = DEAD_TUPLE_RATIO_WARN
    dead_tuple_ratio_critical: float = DEAD_TUPLE_RATIO_CRITICAL
    dead_tuples_min_rows: int = DEAD_TUPLES_MIN_ROWS
    bloat_ratio_warn: float = BLOAT_RATIO_WARN
    bloat_min_bytes: int = BLOAT_MIN_BYTES
    autovacuum_lag_ratio: float = AUTOVACUUM_LAG_RATIO
    long_transaction_warn_s: float = LONG_TRANSACTION_WARN_S
    long_transaction_critical_s: float = LONG_TRANSACTION_CRITICAL_S
    job_lock_warn_s: float = JOB_LOCK_WARN_S
    job_lock_critical_s: float = JOB_LOCK_CRITICAL_S
    claim_sort_rows_critical: int = CLAIM_SORT_ROWS_CRITICAL
    history_list_length_warn: int = HISTORY_LIST_LENGTH_WARN
    history_list_length_critical: int = HISTORY_LIST_LENGTH_CRITICAL
    wal_size_warn_bytes: int = WAL_SIZE_WARN_BYTES
    checkpoint_lag_warn_frames: int = CHECKPOINT_LAG_WARN_FRAMES
    busy_timeout_warn_ms: int = BUSY_TIMEOUT_WARN_MS
    free_page_ratio_warn: float = FREE_PAGE_RATIO_WARN
    free_pages_min_bytes: int = FREE_PAGES_MIN_BYTES

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigurationError(f"{item.name} must be a number >= 0, not {value!r}")
        for warn, critical in (
            ("dead_tuple_ratio_warn", "dead_tuple_ratio_critical"),
            ("long_transaction_warn_s", "long_transaction_critical_s"),
            ("job_lock_warn_s", "job_lock_critical_s"),
            ("history_list_length_warn", "history_list_length_critical"),
        ):
            if getattr(self, warn) > getattr(self, critical):
                raise ConfigurationError(f"{warn} must not exceed {critical}")


# -- running the checks ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Exam:
    """What every check is given: the doctor's own read connection, the queue's engine
    (whose settings some checks report), the claim's shape and the time."""

    conn: Connection
    engine: Engine
    thresholds: Thresholds
    claim_order: tuple[str, ...]
    retired_kinds: tuple[str, ...]
    now_ms: int


_CheckFn = Callable[[_Exam], Finding]


def diagnose(target: Queue | Engine, thresholds: Thresholds | None = None) -> list[Finding]:
    """Run every check that applies to the database behind ``target`` and return one
    finding per check, in a stable order. A :class:`~memtree.Queue` gives the claim its
    claim order and retired kinds (and its clock); an ``Engine`` claims in none.

    Raises :class:`~memtree.DatabaseError` only when the database cannot be reached at all;
    a check that fails on its own is a ``warning`` finding saying why.
    """
    limits = Thresholds() if thresholds is None else thresholds
    if isinstance(target, Queue):
        engine, claim_order, retired = target.engine, target.claim_order, target.retired_kinds
        now_ms = target.now_ms()
    elif isinstance(target, Engine):
        engine, claim_order, retired = target, (), ()
        now_ms = clock_for(target)()
    else:
        raise ConfigurationError(f"diagnose takes a Queue or an Engine, not {target!r}")
    family = "mysql" if engine.dialect.name in MYSQL_FAMILY else engine.dialect.name
    checks = _CHECKS.get(family)
    if checks is None:
        raise ConfigurationError(f"memtree doctor has no checks for {engine.dialect.name}")
    with store.translate_errors(), _reading(engine) as conn:
        exam = _Exam(conn, engine, limits, claim_order, retired, now_ms)
        with conn.begin():
            has_table = inspect(conn).has_table(TABLE_NAME)
        return [
            _run(check, run, exam, needs_table, has_table) for check, run, needs_table in checks
        ]


@contextmanager
def _reading(engine: Engine) -> Iterator[Connection]:
    """The doctor's connection. On SQLite a plain one to the same file, outside memtree's
    engine: its reads take no write lock, so a busy writer never stalls the doctor nor the
    doctor a writer; and a fresh one, since SQLite answers an EXPLAIN that a pooled
    connection prepared before from its statement cache, with the plan of the schema of
    then. On PostgreSQL a READ ONLY one."""
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        plain = sqlalchemy.create_engine(engine.url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with plain.connect() as conn:
                yield conn
        finally:
            plain.dispose()
        return
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn = conn.execution_options(postgresql_readonly=True)
        yield conn


def _run(check: Check, run: _CheckFn, exam: _Exam, needs_table: bool, has_table: bool) -> Finding:
    if needs_table and not has_table:
        return Finding(
            check,
            Severity.WARNING,
            f"not checked: there is no {TABLE_NAME} table",
            "Create memtree's schema with `memtree db upgrade`.",
        )
    try:
        with exam.conn.begin():
            return run(exam)
    except (sa_exc.SQLAlchemyError, MemtreeError, OSError) as exc:
        if isinstance(exc, sa_exc.DBAPIError):
            exc = dberrors.translate(exc)
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return Finding(
            check,
            Severity.WARNING,
            f"not checked: {scrub(line, max_bytes=200)}",
            "The check's own read failed, for the reason given. A missing privilege: run "
            "the doctor as a role that may read the server's statistics (PostgreSQL: "
            "pg_read_all_stats; MySQL: PROCESS).",
        )


def _rows(exam: _Exam, sql: str, **params: Any) -> list[sqlalchemy.Row[Any]]:
    return list(exam.conn.execute(text(sql), params))


def _finding(
    check: Check,
    severity: Severity,
    summary: str,
    advice: str = "",
    detail: Sequence[str] = (),
    /,
    **metrics: Metric,
) -> Finding:
    """A finding; an ``ok`` one has no advice (there is nothing to do)."""
    return Finding(
        check,
        severity,
        summary,
        advice if severity is not Severity.OK else "",
        "\n".join(detail),
        metrics,
    )


# -- every database ----------------------------------------------------------------------


def _schema_revision(exam: _Exam) -> Finding:
    conn, check = exam.conn, Check.SCHEMA_REVISION
    head = migration.head_revision()
    revision = migration.schema_revision(conn)
    bad = Severity.CRITICAL
    if revision == head:
        return _finding(check, Severity.OK, f"at {head}, the head revision", revision=revision)
    if revision is None:
        if migration.revision_lost(conn):
            return _finding(
                check,
                bad,
                f"{TABLE_NAME} is there but its revision is lost",
                "Run `memtree db stamp` to record the revision the table's layout matches.",
            )
        if inspect(conn).has_table(TABLE_NAME):
            return _finding(
                check,
                bad,
                f"{TABLE_NAME} has no revision: the original crate's table",
                "Run `memtree db upgrade`: it adopts the table and keeps its rows.",
            )
        return _finding(
            check,
            bad,
            "memtree's schema is missing",
            "Run `memtree db upgrade` (in the deploy step, before workers start).",
        )
    if revision in migration.known_revisions():
        return _finding(
            check,
            bad,
            f"at {revision}, behind the head revision {head}",
            "Run `memtree db upgrade`: workers and the queue refuse an outdated schema.",
            revision=revision,
        )
    return _finding(
        check,
        bad,
        f"at {revision}, a revision this memtree does not know (head is {head})",
        "A newer memtree migrated this database: upgrade memtree here, or downgrade the "
        "schema with the newer memtree.",
        revision=revision,
    )


def _missing_indexes(exam: _Exam) -> Finding:
    inspector = inspect(exam.conn)
    missing: list[tuple[str, str]] = []
    for table in _TABLES:
        if not inspector.has_table(table):
            continue  # a table the schema's revision does not have yet: that check's finding
        present = {index["name"] for index in inspector.get_indexes(table)}
        wanted = sorted(str(ix.name) for ix in Base.metadata.tables[table].indexes)
        missing += [(table, name) for name in wanted if name not in present]
    if not missing:
        return _finding(Check.MISSING_INDEXES, Severity.OK, "every index of memtree's is there")
    names = ", ".join(name for _, name in missing)
    ddl = [migration.index_ddl(exam.conn.dialect, table, name) + ";" for table, name in missing]
    return _finding(
        Check.MISSING_INDEXES,
        Severity.CRITICAL,
        f"missing: {names}",
        "Claims, dedupe and recovery lean on these indexes. Build each again as memtree's "
        "revisions make it (`memtree db check` shows every drift):\n" + "\n".join(ddl),
        [f"{name} on {table}" for table, name in missing],
        missing=names,
    )


# The claim's plan -----------------------------------------------------------------------


class _Explain(Executable, ClauseElement):
    """``EXPLAIN`` in front of a statement, run with the statement's own parameters."""

    inherit_cache = False

    def __init__(self, statement: Select[Any], prefix: str) -> None:
        self.statement = statement
        self.prefix = prefix


@compiles(_Explain)
def _compile_explain(element: _Explain, compiler: SQLCompiler, **kw: Any) -> str:
    return f"{element.prefix} {compiler.process(element.statement, **kw)}"


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a plan does with ``mem_tree_jobs``: the indexes it reads, whether it sorts, and
    whether it reads the whole table."""

    indexes: tuple[str, ...]
    sorts: bool
    full_scan: bool

    @property
    def shown(self) -> str:
        steps = [f"reads {', '.join(self.indexes)}"] if self.indexes else []
        if self.full_scan:
            steps.append(f"reads all of {TABLE_NAME}")
        if self.sorts:
            steps.append("sorts")
        return ", ".join(steps) or "reads nothing"


def _postgres_plan(exam: _Exam, pick: Select[Any], params: dict[str, Any]) -> _Plan:
    [document] = exam.conn.execute(_Explain(pick, "EXPLAIN (FORMAT JSON)"), params).scalars()

    def nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield node
        for child in node.get("Plans", ()):
            yield from nodes(child)

    every = list(nodes(document[0]["Plan"]))
    return _Plan(
        tuple(dict.fromkeys(n["Index Name"] for n in every if "Index Name" in n)),
        any(n["Node Type"] in ("Sort", "Incremental Sort") for n in every),
        any(n["Node Type"] == "Seq Scan" and n.get("Relation Name") == TABLE_NAME for n in every),
    )


def _mysql_plan(exam: _Exam, pick: Select[Any], params: dict[str, Any]) -> _Plan:
    rows = [
        row._mapping
        for row in exam.conn.execute(_Explain(pick, "EXPLAIN"), params)
        if row._mapping["table"] == TABLE_NAME
    ]
    return _Plan(
        tuple(str(row["key"]) for row in rows if row["key"]),
        any("filesort" in (row["Extra"] or "") for row in rows),
        any(row["type"] == "ALL" for row in rows),
    )


_SQLITE_INDEX = re.compile(r"\bUSING (?:COVERING )?INDEX (\S+)")


def _sqlite_plan(exam: _Exam, pick: Select[Any], params: dict[str, Any]) -> _Plan:
    details = [
        str(row[-1]) for row in exam.conn.execute(_Explain(pick, "EXPLAIN QUERY PLAN"), params)
    ]
    return _Plan(
        tuple(m.group(1) for d in details if (m := _SQLITE_INDEX.search(d))),
        any("TEMP B-TREE FOR ORDER BY" in d for d in details),
        any(d.startswith(f"SCAN {TABLE_NAME}") and "INDEX" not in d for d in details),
    )


_PLANNERS: dict[str, Callable[[_Exam, Select[Any], dict[str, Any]], _Plan]] = {
    "postgresql": _postgres_plan,
    "mysql": _mysql_plan,
    "sqlite": _sqlite_plan,
}


def _claim_index_usable(exam: _Exam) -> bool:
    present = {ix["name"] for ix in inspect(exam.conn).get_indexes(TABLE_NAME)}
    if CLAIM_INDEX not in present:
        return False
    if exam.conn.dialect.name != "postgresql":
        return True
    return bool(exam.conn.execute(text(_PG_INDEX_VALID), {"name": CLAIM_INDEX}).scalar())


def _claim_plan(exam: _Exam) -> Finding:
    check, limits = Check.CLAIM_PLAN, exam.thresholds
    backlog = store.ready_backlog(exam.conn, _PLANNED_KINDS)
    if not backlog:
        return _finding(check, Severity.OK, "no ready jobs: a claim has nothing to sort")
    dialect = exam.conn.dialect.name
    planner = _PLANNERS["mysql" if dialect in MYSQL_FAMILY else dialect]
    usable = _claim_index_usable(exam)
    params = {"now": exam.now_ms, "limit": _PLANNED_LIMIT}
    judged: list[tuple[Severity, str]] = []
    for kind, ready in backlog:
        pick = store.claim_pick(dialect, kind, exam.claim_order, exam.retired_kinds)
        plan = planner(exam, pick, params)
        what = f"a claim of {kind!r} ({ready} ready) {plan.shown}"
        if CLAIM_INDEX in plan.indexes:
            judged.append((Severity.OK, what))
        elif (plan.sorts or plan.full_scan) and ready >= limits.claim_sort_rows_critical:
            judged.append((Severity.CRITICAL, f"{what}: every claim sorts its ready rows"))
        elif not usable:
            judged.append((Severity.WARNING, f"{what}: the claim index is missing or invalid"))
        else:
            judged.append((Severity.OK, f"{what}: the planner's choice at this size"))
    severity = max((s for s, _ in judged), key=lambda s: s.rank)
    summary = next(line for s, line in judged if s is severity)
    advice = (
        f"Claims must walk {CLAIM_INDEX} to their kind's first due rows instead of sorting "
        "the backlog: build the index again if it is missing or invalid (see "
        f"{Check.MISSING_INDEXES.value} and {Check.INVALID_INDEXES.value}); if it is there "
        f"and valid, refresh the planner's statistics (PostgreSQL: ANALYZE {TABLE_NAME}; "
        f"MySQL: ANALYZE TABLE {TABLE_NAME}) and run the doctor again."
    )
    return _finding(
        check,
        severity,
        summary,
        advice,
        [line for _, line in judged],
        claim_index_usable=int(usable),
        deepest_backlog=backlog[0][1],
    )


# -- PostgreSQL --------------------------------------------------------------------------

# The catalog reads. ``:tables`` is memtree's table names: each is found as the
# connection's search path finds it (to_regclass), as memtree's own statements find it.

_PG_INVALID_INDEXES = """
SELECT i.relname, t.relname AS table_name
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
WHERE x.indrelid IN (SELECT to_regclass(u) FROM unnest(CAST(:tables AS text[])) AS u)
  AND NOT (x.indisvalid AND x.indisready)
ORDER BY i.relname
"""

_PG_DEAD_TUPLES = """
SELECT relname, n_live_tup, n_dead_tup FROM pg_stat_user_tables
WHERE relid IN (SELECT to_regclass(u) FROM unnest(CAST(:tables AS text[])) AS u)
ORDER BY relname
"""

_PG_AUTOVACUUM_SETTINGS = """
SELECT name, setting FROM pg_settings
WHERE name IN ('autovacuum', 'track_counts', 'autovacuum_vacuum_threshold',
               'autovacuum_vacuum_scale_factor')
"""

_PG_AUTOVACUUM = """
SELECT s.relname, s.n_dead_tup, greatest(c.reltuples, 0) AS reltuples, c.reloptions,
       EXTRACT(EPOCH FROM clock_timestamp() - greatest(s.last_autovacuum, s.last_vacuum))
         AS since_s
FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
WHERE s.relid IN (SELECT to_regclass(u) FROM unnest(CAST(:tables AS text[])) AS u)
ORDER BY s.relname
"""

# Widths are pg_stats' averages of non-null values, weighted by how often each is not null.
_PG_TABLE_SIZES = """
SELECT t.relname, pg_relation_size(t.oid) AS bytes, t.reltuples, t.reloptions,
       (SELECT sum(s.avg_width * (1 - s.null_frac)) FROM pg_stats s
        WHERE s.schemaname = n.nspname AND s.tablename = t.relname) AS width
FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE t.oid IN (SELECT to_regclass(u) FROM unnest(CAST(:tables AS text[])) AS u)
"""

_PG_INDEX_SIZES = """
SELECT i.relname, pg_relation_size(i.oid) AS bytes, i.reltuples, i.reloptions,
       (SELECT sum(s.avg_width * (1 - s.null_frac)) FROM pg_stats s
        WHERE s.schemaname = n.nspname AND s.tablename = t.relname
          AND s.attname IN (SELECT a.attname FROM pg_attribute a
                            WHERE a.attrelid = i.oid AND a.attnum > 0)) AS width
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
JOIN pg_am am ON am.oid = i.relam
WHERE x.indrelid IN (SELECT to_regclass(u) FROM unnest(CAST(:tables AS text[])) AS u)
  AND am.amname = 'btree'
"""

# Client sessions of this database (but the doctor's) whose transaction holds a snapshot
# or a transaction id: each holds vacuum's horizon back.
_PG_HORIZON = """
SELECT pid, usename, application_name, state,
       EXTRACT(EPOCH FROM clock_timestamp() - xact_start) AS open_s,
       greatest(age(backend_xmin), age(backend_xid)) AS xid_age, left(query, 400) AS query
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_type = 'client backend' AND xact_start IS NOT NULL
  AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
ORDER BY xact_start
"""

# A session that locked rows of the table (FOR UPDATE/SHARE) holds RowShareLock on it to
# the end of its transaction, one that wrote rows RowExclusiveLock: row locks themselves
# are not in pg_locks, but these are, for as long as the row locks can be held.
_PG_JOB_LOCKS = """
SELECT a.pid, a.usename, a.application_name, a.state,
       EXTRACT(EPOCH FROM clock_timestamp() - a.xact_start) AS open_s,
       left(a.query, 400) AS query, string_agg(l.mode, ', ') AS modes,
       (SELECT count(*) FROM pg_stat_activity w WHERE a.pid = ANY(pg_blocking_pids(w.pid)))
         AS blocking
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.relation = to_regclass(:table) AND l.granted
  AND l.mode IN ('RowShareLock', 'RowExclusiveLock') AND l.pid <> pg_backend_pid()
  AND a.xact_start IS NOT NULL
GROUP BY a.pid, a.usename, a.application_name, a.state, a.xact_start, a.query
ORDER BY a.xact_start
"""

_PG_INDEX_VALID = "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"


def _pg_invalid_indexes(exam: _Exam) -> Finding:
    rows = _rows(exam, _PG_INVALID_INDEXES, tables=list(_TABLES))
    if not rows:
        return _finding(
            Check.INVALID_INDEXES, Severity.OK, "no index of memtree's tables is invalid"
        )
    ours = {str(ix.name) for table in Base.metadata.tables.values() for ix in table.indexes}
    mine = [row.relname for row in rows if row.relname in ours]
    foreign = [row.relname for row in rows if row.relname not in ours]
    advice = []
    for name in mine:
        advice.append(f"REINDEX INDEX CONCURRENTLY {name};")
    for name in foreign:
        advice.append(f"DROP INDEX CONCURRENTLY {name};  -- not memtree's: it only slows writes")
    return _finding(
        Check.INVALID_INDEXES,
        Severity.CRITICAL if mine else Severity.WARNING,
        f"invalid (no query uses them, every write still updates them): "
        f"{', '.join(mine + foreign)}",
        "A CREATE INDEX CONCURRENTLY that failed leaves its index invalid (one still being "
        "built is invalid until it ends). Rebuild or drop it:\n" + "\n".join(advice),
        [f"{row.relname} on {row.table_name}" for row in rows],
        invalid=len(rows),
    )


def _pg_dead_tuples(exam: _Exam) -> Finding:
    limits = exam.thresholds
    rows = _rows(exam, _PG_DEAD_TUPLES, tables=list(_TABLES))
    judged: list[tuple[Severity, float, str]] = []
    metrics: dict[str, Metric] = {}
    for row in rows:
        live, dead = int(row.n_live_tup), int(row.n_dead_tup)
        ratio = dead / (live + dead) if live + dead else 0.0
        metrics[f"{row.relname}.dead_rows"] = dead
        metrics[f"{row.relname}.dead_ratio"] = round(ratio, 4)
        severity = Severity.OK
        if dead >= limits.dead_tuples_min_rows:
            if ratio >= limits.dead_tuple_ratio_critical:
                severity = Severity.CRITICAL
            elif ratio >= limits.dead_tuple_ratio_warn:
                severity = Severity.WARNING
        line = f"{row.relname}: {dead} dead rows beside {live} live ({ratio:.0%})"
        judged.append((severity, ratio, line))
    judged.sort(key=lambda j: (-j[0].rank, -j[1]))
    if not judged or judged[0][0] is Severity.OK:
        top = judged[0][2] if judged else "no statistics yet"
        return _finding(
            Check.DEAD_TUPLES,
            Severity.OK,
            f"under the thresholds (most: {top})",
            "",
            [line for _, _, line in judged],
            **metrics,
        )
    severity, _, line = judged[0]
    return _finding(
        Check.DEAD_TUPLES,
        severity,
        line,
        f"Dead rows are old versions of claimed and settled jobs: claims walk past their "
        f"index entries until vacuum removes them. Run VACUUM (ANALYZE) {TABLE_NAME} now; "
        f"see {Check.AUTOVACUUM.value} for why autovacuum has not, and "
        f"{Check.VACUUM_HORIZON.value} for a transaction that keeps vacuum from removing them.",
        [line for _, _, line in judged],
        **metrics,
    )


def _options(reloptions: Sequence[str] | None) -> dict[str, str]:
    return dict(option.split("=", 1) for option in reloptions or ())


def _off(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("off", "false", "no", "0", "f", "n")


def _pg_autovacuum(exam: _Exam) -> Finding:
    settings = {str(row.name): str(row.setting) for row in _rows(exam, _PG_AUTOVACUUM_SETTINGS)}
    rows = _rows(exam, _PG_AUTOVACUUM, tables=list(_TABLES))
    problems: list[str] = []
    detail: list[str] = []
    metrics: dict[str, Metric] = {}
    for name in ("autovacuum", "track_counts"):  # autovacuum needs both
        if _off(settings.get(name)):
            problems.append(f"the server runs with {name} = off")
    for row in rows:
        options = _options(row.reloptions)
        # The table's own settings win over the server's, as they do for autovacuum.
        threshold, scale = (
            float(options.get(name, settings.get(name, "0")))
            for name in ("autovacuum_vacuum_threshold", "autovacuum_vacuum_scale_factor")
        )
        trigger = threshold + scale * float(row.reltuples)
        dead = int(row.n_dead_tup)
        since = "never" if row.since_s is None else f"{_duration(float(row.since_s))} ago"
        detail.append(
            f"{row.relname}: {dead} dead rows, autovacuum starts at {trigger:.0f}; "
            f"last vacuumed {since}"
        )
        metrics[f"{row.relname}.dead_rows_over_trigger"] = (
            round(dead / trigger, 2) if trigger else None
        )
        if _off(options.get("autovacuum_enabled")):
            problems.append(f"autovacuum is disabled on {row.relname}")
        elif dead > exam.thresholds.autovacuum_lag_ratio * trigger:
            problems.append(
                f"autovacuum is behind on {row.relname}: {dead} dead rows, it starts at "
                f"{trigger:.0f}"
            )
    if not problems:
        return _finding(
            Check.AUTOVACUUM,
            Severity.OK,
            "autovacuum keeps up with memtree's tables",
            "",
            detail,
            **metrics,
        )
    return _finding(
        Check.AUTOVACUUM,
        Severity.WARNING,
        problems[0] + (f" (and {len(problems) - 1} more below)" if len(problems) > 1 else ""),
        "A queue table changes every row it holds, over and over: let autovacuum run on it "
        f"(ALTER TABLE {TABLE_NAME} RESET (autovacuum_enabled)), and start it sooner than "
        f"the default 20% of the table (ALTER TABLE {TABLE_NAME} SET "
        "(autovacuum_vacuum_scale_factor = 0.01)). If it is enabled and still behind, the "
        "server runs too few workers (autovacuum_max_workers) or throttles them "
        "(autovacuum_vacuum_cost_limit), or a transaction holds the horizon back.",
        problems + detail,
        **metrics,
    )


def _pg_bloat(exam: _Exam) -> Finding:
    """Empty space in memtree's tables and their B-tree indexes, estimated as PostgreSQL's
    own statistics allow (no extension needed): the size the rows and index entries the
    statistics count would take, packed at the fill factor, against the relation's size.
    Without statistics (never analyzed) a relation is not judged."""
    limits = exam.thresholds
    block = int(exam.conn.execute(text("SELECT current_setting('block_size')::int")).scalar_one())
    tables = _rows(exam, _PG_TABLE_SIZES, tables=list(_TABLES))
    indexes = _rows(exam, _PG_INDEX_SIZES, tables=list(_TABLES))
    judged: list[tuple[float, str, int]] = []
    for rows, is_index in ((tables, False), (indexes, True)):
        for row in rows:
            if row.reltuples < 0 or row.width is None or row.bytes < block:
                continue
            fill = float(_options(row.reloptions).get("fillfactor", 90 if is_index else 100))
            if is_index:  # an index tuple's header and line pointer; the page's B-tree tail
                per_row, usable, extra_pages = float(row.width) + 8 + 4, block - 24 - 16, 1
            else:  # a heap tuple's header (null bitmap included) and line pointer
                per_row, usable, extra_pages = float(row.width) + 32 + 4, block - 24, 0
            per_page = max(1, math.floor(usable * fill / 100 / per_row))
            expected = (math.ceil(float(row.reltuples) / per_page) + extra_pages) * block
            ratio = max(0.0, 1 - expected / row.bytes)
            judged.append((ratio, str(row.relname), int(row.bytes)))
    judged.sort(reverse=True)
    metrics: dict[str, Metric] = {f"{name}.bloat_ratio": round(r, 3) for r, name, _ in judged}
    bloated = [
        (r, name, size)
        for r, name, size in judged
        if r >= limits.bloat_ratio_warn and size >= limits.bloat_min_bytes
    ]
    detail = [f"{name}: {_bytes(size)}, ~{r:.0%} empty" for r, name, size in judged[: _SHOWN * 2]]
    if not bloated:
        return _finding(
            Check.BLOAT,
            Severity.OK,
            "no table or index of memtree's is bloated",
            "",
            detail,
            **metrics,
        )
    ratio, name, size = bloated[0]
    names = ", ".join(n for _, n, _ in bloated)
    return _finding(
        Check.BLOAT,
        Severity.WARNING,
        f"{name} is {_bytes(size)}, about {ratio:.0%} of it empty (bloated: {names})",
        "Vacuum reuses the space but does not give it back. To shrink an index: REINDEX "
        "INDEX CONCURRENTLY <index>; to shrink the table without stopping workers: "
        f"pg_repack; VACUUM FULL {TABLE_NAME} also does, but locks the table (every worker "
        "waits) for as long as it runs. Then keep dead rows from piling up again (see "
        f"{Check.DEAD_TUPLES.value} and {Check.AUTOVACUUM.value}).",
        detail,
        **metrics,
    )


def _pg_vacuum_horizon(exam: _Exam) -> Finding:
    limits = exam.thresholds
    rows = _rows(exam, _PG_HORIZON)
    held = [row for row in rows if float(row.open_s) >= limits.long_transaction_warn_s]
    oldest = float(rows[0].open_s) if rows else 0.0
    if not held:
        return _finding(
            Check.VACUUM_HORIZON,
            Severity.OK,
            "no transaction holds vacuum back"
            + (f" (the oldest is {_duration(oldest)})" if rows else ""),
            oldest_transaction_s=round(oldest, 3),
        )
    severity = (
        Severity.CRITICAL if oldest >= limits.long_transaction_critical_s else Severity.WARNING
    )
    return _finding(
        Check.VACUUM_HORIZON,
        severity,
        f"{len(held)} transaction(s) open for up to {_duration(oldest)} hold back vacuum "
        f"(pid {', '.join(str(row.pid) for row in held[:_SHOWN])})",
        "While a transaction holds a snapshot or a transaction id, vacuum can remove no "
        "row version that died after it began, in any table: dead jobs pile up and claims "
        "slow down. End it in the application (`idle in transaction` is usually a "
        "connection that was never given back); SELECT pg_terminate_backend(pid) ends it "
        "now. Set idle_in_transaction_session_timeout so it cannot last.",
        [_pg_session(row) + f", {row.xid_age} transactions behind" for row in held[:_SHOWN]],
        oldest_transaction_s=round(oldest, 3),
        transactions=len(held),
    )


def _pg_job_row_locks(exam: _Exam) -> Finding:
    limits = exam.thresholds
    rows = _rows(exam, _PG_JOB_LOCKS, table=TABLE_NAME)
    held = [row for row in rows if float(row.open_s) >= limits.job_lock_warn_s]
    if not held:
        return _finding(
            Check.JOB_ROW_LOCKS,
            Severity.OK,
            f"no transaction has held locks on {TABLE_NAME} rows for long",
        )
    oldest = float(held[0].open_s)
    severity = Severity.CRITICAL if oldest >= limits.job_lock_critical_s else Severity.WARNING
    return _finding(
        Check.JOB_ROW_LOCKS,
        severity,
        f"{len(held)} transaction(s) have held locks on {TABLE_NAME} for up to "
        f"{_duration(oldest)} (pid {', '.join(str(row.pid) for row in held[:_SHOWN])})",
        "They locked or wrote job rows and are still open: workers skip those rows (claims "
        "and settles pass over locked rows) until they end, and a lock held past the "
        "lease lets its job be recovered and run again. Commit or roll back in the "
        "application; SELECT pg_terminate_backend(pid) ends one now.",
        [
            _pg_session(row) + f", holds {row.modes}, blocks {row.blocking} session(s)"
            for row in held[:_SHOWN]
        ],
        oldest_lock_s=round(oldest, 3),
        transactions=len(held),
    )


def _pg_session(row: Any) -> str:
    who = f"pid {row.pid} ({row.usename or '?'}"
    if row.application_name:
        who += f", {row.application_name}"
    query = scrub(" ".join(str(row.query or "").split()), max_bytes=120)
    return f"{who}, {row.state}) open {_duration(float(row.open_s))}: {query}"


# -- MySQL and MariaDB -------------------------------------------------------------------

# InnoDB's open transactions of connections whose default database is this one (but the
# doctor's). trx_started has whole seconds.
_MYSQL_TRANSACTIONS = """
SELECT t.trx_mysql_thread_id AS id, p.USER AS user, p.HOST AS host, t.trx_state AS state,
       TIMESTAMPDIFF(SECOND, t.trx_started, NOW()) AS open_s,
       t.trx_rows_locked AS rows_locked, LEFT(t.trx_query, 400) AS query
FROM information_schema.INNODB_TRX t
JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id
WHERE t.trx_mysql_thread_id <> CONNECTION_ID() AND p.DB = DATABASE()
ORDER BY t.trx_started
"""

_MYSQL_HISTORY_LENGTH = """
SELECT `COUNT` FROM information_schema.INNODB_METRICS WHERE NAME = 'trx_rseg_history_len'
"""


def _mysql_long_transactions(exam: _Exam) -> Finding:
    limits = exam.thresholds
    rows = _rows(exam, _MYSQL_TRANSACTIONS)

    def too_long(row: Any) -> bool:
        if float(row.open_s) >= limits.long_transaction_warn_s:
            return True
        return int(row.rows_locked) > 0 and float(row.open_s) >= limits.job_lock_warn_s

    held = [row for row in rows if too_long(row)]
    if not held:
        return _finding(
            Check.LONG_TRANSACTIONS,
            Severity.OK,
            "no transaction on this database has been open for long",
        )
    oldest = float(held[0].open_s)
    critical = oldest >= limits.long_transaction_critical_s or any(
        int(row.rows_locked) > 0 and float(row.open_s) >= limits.job_lock_critical_s for row in held
    )
    return _finding(
        Check.LONG_TRANSACTIONS,
        Severity.CRITICAL if critical else Severity.WARNING,
        f"{len(held)} transaction(s) open for up to {_duration(oldest)} "
        f"(connection {', '.join(str(row.id) for row in held[:_SHOWN])})",
        "An open transaction keeps purge from removing undo (see "
        f"{Check.HISTORY_LIST_LENGTH.value}), and one holding row locks stalls the jobs it "
        "locked: workers skip them, and past the lease they can be recovered and run "
        "again. End it in the application; KILL <connection> ends it now. "
        "innodb_trx shows only connections whose default database is this one.",
        [
            f"connection {row.id} ({row.user}@{row.host}, {row.state}) open "
            f"{_duration(float(row.open_s))}, {row.rows_locked} row lock(s): "
            + scrub(" ".join(str(row.query or "-").split()), max_bytes=120)
            for row in held[:_SHOWN]
        ],
        oldest_transaction_s=oldest,
        transactions=len(held),
    )


def _mysql_history_list_length(exam: _Exam) -> Finding:
    limits = exam.thresholds
    length = exam.conn.execute(text(_MYSQL_HISTORY_LENGTH)).scalar()
    if length is None:
        return _finding(
            Check.HISTORY_LIST_LENGTH,
            Severity.WARNING,
            "not checked: the server has no trx_rseg_history_len metric",
        )
    length = int(length)
    severity = Severity.OK
    if length >= limits.history_list_length_critical:
        severity = Severity.CRITICAL
    elif length >= limits.history_list_length_warn:
        severity = Severity.WARNING
    return _finding(
        Check.HISTORY_LIST_LENGTH,
        severity,
        f"history list length {length} (undo of committed changes purge has not removed)",
        "Purge cannot remove undo newer than the oldest open read view, on the whole "
        "server: find and end the long transaction (long_transactions shows this "
        "database's; information_schema.INNODB_TRX, oldest trx_started first, shows every "
        "one). Until then every read of a changed job row walks its undo chain.",
        history_list_length=length,
    )


def _mysql_isolation_level(exam: _Exam) -> Finding:
    with exam.engine.connect() as conn:
        level = str(conn.get_isolation_level())
    if level == "READ COMMITTED":
        return _finding(
            Check.ISOLATION_LEVEL,
            Severity.OK,
            "the engine's transactions are READ COMMITTED",
            level=level,
        )
    if level == "REPEATABLE READ":
        return _finding(
            Check.ISOLATION_LEVEL,
            Severity.OK,
            "the engine's transactions are REPEATABLE READ; memtree's own set READ COMMITTED",
            "",
            [
                "Handlers' sessions and the application's own transactions keep "
                "REPEATABLE READ (see docs/mysql.md)."
            ],
            level=level,
        )
    return _finding(
        Check.ISOLATION_LEVEL,
        Severity.WARNING,
        f"the engine's transactions are {level}",
        "memtree's own transactions set READ COMMITTED each time, but handlers' sessions run "
        f"at the engine's level: at {level} "
        + (
            "every plain read is a locking read, which waits on claims and settles"
            if level == "SERIALIZABLE"
            else "a read can see a claim that is later rolled back"
        )
        + ". Build the engine with isolation_level='READ COMMITTED' (memtree.create_engine "
        "does by default).",
        level=level,
    )


# -- SQLite ------------------------------------------------------------------------------


#: The pragmas the doctor reads (a pragma takes no bound name, so only these are built).
_READ_PRAGMAS = frozenset({"journal_mode", "page_count", "freelist_count", "page_size"})


def _pragma(exam: _Exam, name: str) -> Any:
    if name not in _READ_PRAGMAS:
        raise ValueError(f"not a pragma the doctor reads: {name!r}")
    return exam.conn.exec_driver_sql(f"PRAGMA {name}").scalar()


def _sqlite_journal_mode(exam: _Exam) -> Finding:
    mode = str(_pragma(exam, "journal_mode")).lower()
    if mode == "wal":
        return _finding(
            Check.JOURNAL_MODE,
            Severity.OK,
            "WAL: readers never block the writer",
            journal_mode=mode,
        )
    if mode in ("memory", "off"):
        return _finding(
            Check.JOURNAL_MODE,
            Severity.CRITICAL,
            f"journal_mode={mode}: a crash in the middle of a write can corrupt the file",
            "Use WAL: memtree's engine sets it (sqlite_journal_mode='WAL', CLI "
            "--sqlite-journal-mode wal).",
            journal_mode=mode,
        )
    return _finding(
        Check.JOURNAL_MODE,
        Severity.WARNING,
        f"journal_mode={mode}: every reader blocks the writer and the writer every reader",
        "Switch the file to WAL, memtree's default (memtree.create_engine(url, "
        "sqlite_journal_mode='WAL'), CLI --sqlite-journal-mode wal), unless the TinyCortex "
        "crate shares the file: it keeps a rollback journal and cannot open a WAL file "
        "(docs/sharing.md).",
        journal_mode=mode,
    )


def _wal_file(exam: _Exam) -> str | None:
    """The WAL file of the main database, when it is in WAL mode and has a file."""
    if str(_pragma(exam, "journal_mode")).lower() != "wal":
        return None
    main = next(
        row for row in exam.conn.exec_driver_sql("PRAGMA database_list") if row[1] == "main"
    )
    return f"{main[2]}-wal" if main[2] else None


def _sqlite_wal_size(exam: _Exam) -> Finding:
    wal = _wal_file(exam)
    if wal is None:
        return _finding(Check.WAL_SIZE, Severity.OK, "not in WAL mode: no WAL file")
    size = os.path.getsize(wal) if os.path.exists(wal) else 0
    if size < exam.thresholds.wal_size_warn_bytes:
        return _finding(Check.WAL_SIZE, Severity.OK, f"the WAL is {_bytes(size)}", wal_bytes=size)
    return _finding(
        Check.WAL_SIZE,
        Severity.WARNING,
        f"the WAL is {_bytes(size)}",
        "A WAL grows while checkpoints cannot keep up and keeps its size afterwards. If "
        f"{Check.CHECKPOINT_LAG.value} shows a lag, end the long reader first. Then, with "
        "no reader active, PRAGMA wal_checkpoint(TRUNCATE) gives the space back; "
        "PRAGMA journal_size_limit caps what a WAL keeps after a checkpoint.",
        [wal],
        wal_bytes=size,
    )


def _sqlite_checkpoint_lag(exam: _Exam) -> Finding:
    wal = _wal_file(exam)
    if wal is None:
        return _finding(Check.CHECKPOINT_LAG, Severity.OK, "not in WAL mode: nothing to checkpoint")
    _busy, logged, copied = exam.conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
    lag = max(0, int(logged) - int(copied))
    if lag < exam.thresholds.checkpoint_lag_warn_frames:
        return _finding(
            Check.CHECKPOINT_LAG,
            Severity.OK,
            f"{lag} of {logged} WAL frames wait for a checkpoint",
            wal_frames=int(logged),
            lag_frames=lag,
        )
    return _finding(
        Check.CHECKPOINT_LAG,
        Severity.WARNING,
        f"{lag} of {logged} WAL frames cannot be checkpointed",
        "A checkpoint cannot copy back frames newer than the snapshot of the oldest open "
        "read transaction: some connection holds one (a reader that never finishes, a "
        "transaction left open). End it; the next commit's checkpoint then catches up. "
        "Until then the WAL grows and every read searches it.",
        [wal],
        wal_frames=int(logged),
        lag_frames=lag,
    )


def _sqlite_busy_timeout(exam: _Exam) -> Finding:
    # The queue's engine's own setting, read on one of its connections (its pragmas set).
    raw = exam.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("PRAGMA busy_timeout")
        (timeout,) = cursor.fetchone() or (0,)
        cursor.close()
    finally:
        raw.close()
    timeout_ms = int(timeout)
    limit = exam.thresholds.busy_timeout_warn_ms
    if timeout_ms >= limit and timeout_ms > 0:
        return _finding(
            Check.BUSY_TIMEOUT,
            Severity.OK,
            f"busy_timeout={timeout_ms} ms",
            busy_timeout_ms=timeout_ms,
        )
    return _finding(
        Check.BUSY_TIMEOUT,
        Severity.CRITICAL if timeout_ms == 0 else Severity.WARNING,
        f"busy_timeout={timeout_ms} ms: a writer that meets another "
        + ("fails at once" if timeout_ms == 0 else "gives up almost at once")
        + " with 'database is locked'",
        "Give the engine a busy timeout: memtree.create_engine sets 15 s "
        "(sqlite_busy_timeout_ms), and Queue(engine) raises an application's engine to it "
        "unless configure_engine was told otherwise.",
        busy_timeout_ms=timeout_ms,
    )


def _sqlite_free_pages(exam: _Exam) -> Finding:
    pages, free = int(_pragma(exam, "page_count")), int(_pragma(exam, "freelist_count"))
    page_size = int(_pragma(exam, "page_size"))
    ratio = free / pages if pages else 0.0
    free_bytes = free * page_size
    summary = f"{free} of {pages} pages free ({_bytes(free_bytes)}, {ratio:.0%})"
    limits = exam.thresholds
    metrics: dict[str, Metric] = {"free_pages": free, "pages": pages, "free_bytes": free_bytes}
    if ratio < limits.free_page_ratio_warn or free_bytes < limits.free_pages_min_bytes:
        return _finding(Check.FREE_PAGES, Severity.OK, summary, **metrics)
    return _finding(
        Check.FREE_PAGES,
        Severity.WARNING,
        summary,
        "Deleted rows leave their pages free for new ones; the file keeps its size. To give "
        "the space back, VACUUM the file with the workers stopped (it rewrites the whole "
        "file under the write lock and needs as much free disk again), or set PRAGMA "
        "auto_vacuum = INCREMENTAL once (then VACUUM) and run PRAGMA incremental_vacuum "
        "from time to time.",
        **metrics,
    )


# -- the register ------------------------------------------------------------------------

#: The checks of each database, in the order they are reported: (check, how, whether it
#: needs mem_tree_jobs to exist).
_CHECKS: dict[str, tuple[tuple[Check, _CheckFn, bool], ...]] = {
    "postgresql": (
        (Check.SCHEMA_REVISION, _schema_revision, False),
        (Check.MISSING_INDEXES, _missing_indexes, True),
        (Check.INVALID_INDEXES, _pg_invalid_indexes, True),
        (Check.CLAIM_PLAN, _claim_plan, True),
        (Check.DEAD_TUPLES, _pg_dead_tuples, True),
        (Check.BLOAT, _pg_bloat, True),
        (Check.AUTOVACUUM, _pg_autovacuum, True),
        (Check.VACUUM_HORIZON, _pg_vacuum_horizon, False),
        (Check.JOB_ROW_LOCKS, _pg_job_row_locks, True),
    ),
    "mysql": (
        (Check.SCHEMA_REVISION, _schema_revision, False),
        (Check.MISSING_INDEXES, _missing_indexes, True),
        (Check.CLAIM_PLAN, _claim_plan, True),
        (Check.LONG_TRANSACTIONS, _mysql_long_transactions, False),
        (Check.HISTORY_LIST_LENGTH, _mysql_history_list_length, False),
        (Check.ISOLATION_LEVEL, _mysql_isolation_level, False),
    ),
    "sqlite": (
        (Check.SCHEMA_REVISION, _schema_revision, False),
        (Check.MISSING_INDEXES, _missing_indexes, True),
        (Check.CLAIM_PLAN, _claim_plan, True),
        (Check.JOURNAL_MODE, _sqlite_journal_mode, False),
        (Check.WAL_SIZE, _sqlite_wal_size, False),
        (Check.CHECKPOINT_LAG, _sqlite_checkpoint_lag, False),
        (Check.BUSY_TIMEOUT, _sqlite_busy_timeout, False),
        (Check.FREE_PAGES, _sqlite_free_pages, False),
    ),
}


def _bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"
