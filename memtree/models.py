"""The declarative model of ``mem_tree_jobs``: the original crate's table, plus memtree's
own columns (lease token, cancel request, heal count).

The columns, types, defaults and index names are the original's, so a database made
by the Rust crate and one made by ``memtree db upgrade`` are the same table. Times
are epoch milliseconds in signed 64-bit columns (``INTEGER`` on SQLite, as the
original declares them; ``BIGINT`` on PostgreSQL and MySQL). On MySQL, text columns that
are indexed are ``VARCHAR`` and long ones ``LONGTEXT`` (see :func:`Key`, :data:`Body`).

This module only describes the table: Alembic revisions in ``migrations/`` create
it, and ``tests/test_migrations.py`` checks that the two never drift apart.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import BigInteger, Index, Integer, MetaData, String, Table, Text, text
from sqlalchemy.dialects.mysql import LONGTEXT
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "MYSQL_DEDUPE_COLUMN",
    "MYSQL_DEDUPE_EXPRESSION",
    "MYSQL_FAMILY",
    "MYSQL_STATUS_INDEXES",
    "MYSQL_TABLE_ARGS",
    "PERMITS_TABLE",
    "RATE_EVENTS_TABLE",
    "SCHEDULES_TABLE",
    "TABLE_NAME",
    "WORKERS_TABLE",
    "Base",
    "Body",
    "Key",
    "MemTreeJob",
    "MemTreePermit",
    "MemTreeRateEvent",
    "MemTreeSchedule",
    "MemTreeWorker",
    "jobs",
    "permits",
    "rate_events",
    "schedules",
    "workers",
]

TABLE_NAME = "mem_tree_jobs"
#: memtree's own: one row per permit of a global gate (see :class:`MemTreePermit`).
PERMITS_TABLE = "mem_tree_permits"
#: memtree's own: one row per start a rate limit counted (see :class:`MemTreeRateEvent`).
RATE_EVENTS_TABLE = "mem_tree_rate_events"
#: memtree's own: the last slot each periodic schedule enqueued.
SCHEDULES_TABLE = "mem_tree_schedules"
#: memtree's own (memtree_0007): the worker processes running now, and what they handle.
WORKERS_TABLE = "mem_tree_workers"

#: Stable names for anything the table does not name itself, on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# The original's SQLite DDL says INTEGER; 64-bit on PostgreSQL.
Millis = BigInteger().with_variant(Integer(), "sqlite")

#: The names of MySQL's family in SQLAlchemy (``mysql+pymysql://`` and ``mariadb+pymysql://``).
MYSQL_FAMILY = ("mysql", "mariadb")


def Key(length: int = 255) -> Text:
    """A text column that is indexed or compared: ``TEXT`` on SQLite and PostgreSQL, a
    ``VARCHAR`` on MySQL and MariaDB, which cannot index ``TEXT`` whole. The lengths
    honour memtree's own limits (a kind is at most 255 bytes, a job id is memtree's)."""
    return Text().with_variant(String(length), *MYSQL_FAMILY)


#: A text column of any length: ``LONGTEXT`` on MySQL, where ``TEXT`` stops at 64 KiB.
Body = Text().with_variant(LONGTEXT(), *MYSQL_FAMILY)

#: The table options every memtree table gets on MySQL: InnoDB (row locks, SKIP LOCKED),
#: UTF-8 in full, and a binary collation, so ``'Kind'`` and ``'kind'`` stay two kinds
#: and two keys as they are on the other databases. Spelt for both of SQLAlchemy's names
#: for the engine: each reads options of its own prefix only.
MYSQL_TABLE_ARGS = {
    f"{dialect}_{option}": value
    for dialect in MYSQL_FAMILY
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}

#: The partial index predicate that defines "active" for dedupe keys. Kept as literal
#: SQL so ON CONFLICT can infer the index even from a prepared statement.
ACTIVE_DEDUPE_PREDICATE = "dedupe_key IS NOT NULL AND status IN ('ready', 'running')"

#: MySQL has no partial indexes: there the dedupe index is a unique index over a generated
#: column, ``dedupe_active``, that holds the key's SHA-256 while the job is ready or
#: running and NULL otherwise (a unique index admits many NULLs). The hash keeps the
#: index under InnoDB's key size for keys of up to ``MAX_DEDUPE_KEY_BYTES``. The column
#: exists on MySQL and MariaDB only; the other databases never see it.
MYSQL_DEDUPE_COLUMN = "dedupe_active"
MYSQL_DEDUPE_EXPRESSION = "CASE WHEN status IN ('ready', 'running') THEN SHA2(dedupe_key, 256) END"
#: MySQL's equivalents of the partial claim and running indexes: the status first.
_PARTIAL_INDEXES = ("sqlite", "postgresql")
MYSQL_STATUS_INDEXES = {
    "ix_mem_tree_jobs_claim": ("status", "kind", "available_at_ms"),
    "ix_mem_tree_jobs_running": ("status", "kind", "locked_until_ms"),
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class MemTreeJob(Base):
    """One job. See ``docs/states.md`` for the status diagram and who moves a row."""

    __tablename__ = TABLE_NAME

    id: Mapped[str] = mapped_column(Key(), primary_key=True)
    kind: Mapped[str] = mapped_column(Key(), nullable=False)
    payload_json: Mapped[str] = mapped_column(Body, nullable=False)
    dedupe_key: Mapped[str | None] = mapped_column(Key(2000))
    status: Mapped[str] = mapped_column(Key(32), nullable=False, server_default=text("'ready'"))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("5"))
    available_at_ms: Mapped[int] = mapped_column(Millis, nullable=False)
    locked_until_ms: Mapped[int | None] = mapped_column(Millis)
    last_error: Mapped[str | None] = mapped_column(Body)
    created_at_ms: Mapped[int] = mapped_column(Millis, nullable=False)
    started_at_ms: Mapped[int | None] = mapped_column(Millis)
    completed_at_ms: Mapped[int | None] = mapped_column(Millis)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    failure_class: Mapped[str | None] = mapped_column(Text)
    # memtree's own: a fresh token per claim, so a settle can tell this claim from any
    # other claim of the same row. NULL on rows the original wrote or claimed.
    lease_token: Mapped[str | None] = mapped_column(Key(64))
    # memtree's own: when a running job was asked to stop (its worker polls for it).
    cancel_requested_at_ms: Mapped[int | None] = mapped_column(Millis)
    # memtree's own: how many times self-heal revived this job from ``failed`` (bounded
    # by the self-heal limit; an operator's requeue sets it back to 0).
    heal_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))

    __table_args__ = (
        Index("idx_mem_tree_jobs_ready", "status", "available_at_ms"),
        Index("idx_mem_tree_jobs_kind", "kind"),
        # Partial indexes, which MySQL lacks: there the migrations make the equivalents
        # (MYSQL_DEDUPE_COLUMN, MYSQL_STATUS_INDEXES), and these are never emitted.
        Index(
            "idx_mem_tree_jobs_dedupe_active",
            "dedupe_key",
            unique=True,
            sqlite_where=text(ACTIVE_DEDUPE_PREDICATE),
            postgresql_where=text(ACTIVE_DEDUPE_PREDICATE),
        ).ddl_if(dialect=_PARTIAL_INDEXES),  # type: ignore[arg-type]  # a tuple is documented
        # Claims walk ready rows of one kind in due order, so neither a large done
        # history nor a deep backlog of other kinds is read or sorted.
        Index(
            "ix_mem_tree_jobs_claim",
            "kind",
            "available_at_ms",
            sqlite_where=text("status = 'ready'"),
            postgresql_where=text("status = 'ready'"),
        ).ddl_if(dialect=_PARTIAL_INDEXES),  # type: ignore[arg-type]  # a tuple is documented
        # memtree's own (memtree_0006): a global gate counts its holders, and recovery
        # finds expired leases, among the running rows only.
        Index(
            "ix_mem_tree_jobs_running",
            "kind",
            "locked_until_ms",
            sqlite_where=text("status = 'running'"),
            postgresql_where=text("status = 'running'"),
        ).ddl_if(dialect=_PARTIAL_INDEXES),  # type: ignore[arg-type]  # a tuple is documented
        MYSQL_TABLE_ARGS,
    )


class MemTreePermit(Base):
    """One permit of a global gate: free, or held by the claim of ``job_id`` it names
    (with that claim's ``lease_token``). A permit is free again once that claim no longer
    holds its job running under a live lease, so a settle, a release and a recovery free
    it without touching this table, and a stale claim frees nothing. Claims take free
    permits with ``FOR UPDATE SKIP LOCKED``, so workers never wait on each other's."""

    __tablename__ = PERMITS_TABLE

    gate: Mapped[str] = mapped_column(Key(), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str | None] = mapped_column(Key())
    lease_token: Mapped[str | None] = mapped_column(Key(64))

    __table_args__ = (MYSQL_TABLE_ARGS,)


class MemTreeRateEvent(Base):
    """One start counted against a rate limit: a worker's claim, or an application's own
    call that consumed from the same budget. A limit allows at most its ``limit`` of
    weight per key in any window; rows older than the window are deleted as limits are
    consumed. The original crate never reads this table."""

    __tablename__ = RATE_EVENTS_TABLE

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    limit_name: Mapped[str] = mapped_column(Key(), nullable=False)
    # '' when the limit is not partitioned: one budget for the whole fleet. At most 2,000
    # characters on MySQL (as a dedupe key), whose window index holds the first 255.
    partition_key: Mapped[str] = mapped_column(Key(2000), nullable=False, server_default=text("''"))
    at_ms: Mapped[int] = mapped_column(Millis, nullable=False)
    weight: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("1"))
    # The job whose claim counted this start; NULL for an application's own call.
    job_id: Mapped[str | None] = mapped_column(Key())

    __table_args__ = (
        Index(
            "ix_mem_tree_rate_events_window",
            "limit_name",
            "partition_key",
            "at_ms",
            mysql_length={"partition_key": 255},  # InnoDB's key size: the first 255
            mariadb_length={"partition_key": 255},
        ),
        MYSQL_TABLE_ARGS,
    )


class MemTreeSchedule(Base):
    """A periodic schedule's progress: the last slot it enqueued (or skipped), so each
    slot is enqueued once across every worker process."""

    __tablename__ = SCHEDULES_TABLE

    name: Mapped[str] = mapped_column(Key(), primary_key=True)
    last_slot_ms: Mapped[int] = mapped_column(Millis, nullable=False)
    updated_at_ms: Mapped[int] = mapped_column(Millis, nullable=False)

    __table_args__ = (MYSQL_TABLE_ARGS,)


class MemTreeWorker(Base):
    """A worker process that runs now, or ran until ``seen_at_ms`` (on the database's
    clock): the kinds it has handlers for and how many jobs it runs at once. A worker
    writes its row when it starts, touches it every :data:`memtree.store.WORKER_BEAT_MS`,
    and deletes it when it stops; a row of a killed worker stays until it is old. The
    leases of a worker's claims start with its ``id`` and a dot, so a running job names
    the worker that runs it. The original crate neither writes nor reads this table."""

    __tablename__ = WORKERS_TABLE

    id: Mapped[str] = mapped_column(Key(64), primary_key=True)
    name: Mapped[str] = mapped_column(Key(), nullable=False)
    # A JSON list of kind names, sorted.
    kinds: Mapped[str] = mapped_column(Body, nullable=False)
    concurrency: Mapped[int] = mapped_column(Integer, nullable=False)
    version: Mapped[str] = mapped_column(Key(64), nullable=False)
    started_at_ms: Mapped[int] = mapped_column(Millis, nullable=False)
    seen_at_ms: Mapped[int] = mapped_column(Millis, nullable=False)

    __table_args__ = (MYSQL_TABLE_ARGS,)


#: The Core table the store and settle statements are built on.
jobs = cast(Table, MemTreeJob.__table__)
permits = cast(Table, MemTreePermit.__table__)
rate_events = cast(Table, MemTreeRateEvent.__table__)
schedules = cast(Table, MemTreeSchedule.__table__)
workers = cast(Table, MemTreeWorker.__table__)
