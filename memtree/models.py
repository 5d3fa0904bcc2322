"""The declarative model of ``mem_tree_jobs``: the original crate's table, plus memtree's
own columns (lease token, cancel request, heal count).

The columns, types, defaults and index names are the original's, so a database made
by the Rust crate and one made by ``memtree db upgrade`` are the same table. Times
are epoch milliseconds in signed 64-bit columns (``INTEGER`` on SQLite, as the
original declares them; ``BIGINT`` on PostgreSQL).

This module only describes the table: Alembic revisions in ``migrations/`` create
it, and ``tests/test_migrations.py`` checks that the two never drift apart.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import BigInteger, Index, Integer, MetaData, Table, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "PERMITS_TABLE",
    "RATE_EVENTS_TABLE",
    "SCHEDULES_TABLE",
    "TABLE_NAME",
    "Base",
    "MemTreeJob",
    "MemTreePermit",
    "MemTreeRateEvent",
    "MemTreeSchedule",
    "jobs",
    "permits",
    "rate_events",
    "schedules",
]

TABLE_NAME = "mem_tree_jobs"
#: memtree's own: one row per permit of a global gate (see :class:`MemTreePermit`).
PERMITS_TABLE = "mem_tree_permits"
#: memtree's own: one row per start a rate limit counted (see :class:`MemTreeRateEvent`).
RATE_EVENTS_TABLE = "mem_tree_rate_events"
#: memtree's own: the last slot each periodic schedule enqueued.
SCHEDULES_TABLE = "mem_tree_schedules"

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

#: The partial index predicate that defines "active" for dedupe keys. Kept as literal
#: SQL so ON CONFLICT can infer the index even from a prepared statement.
ACTIVE_DEDUPE_PREDICATE = "dedupe_key IS NOT NULL AND status IN ('ready', 'running')"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class MemTreeJob(Base):
    """One job. See ``docs/states.md`` for the status diagram and who moves a row."""

    __tablename__ = TABLE_NAME

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    payload_json: Mapped[str] = mapped_column(Text, nullable=False)
    dedupe_key: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'ready'"))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("5"))
    available_at_ms: Mapped[int] = mapped_column(Millis, nullable=False)
    locked_until_ms: Mapped[int | None] = mapped_column(Millis)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at_ms: Mapped[int] = mapped_column(Millis, nullable=False)
    started_at_ms: Mapped[int | None] = mapped_column(Millis)
    completed_at_ms: Mapped[int | None] = mapped_column(Millis)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    failure_class: Mapped[str | None] = mapped_column(Text)
    # memtree's own: a fresh token per claim, so a settle can tell this claim from any
    # other claim of the same row. NULL on rows the original wrote or claimed.
    lease_token: Mapped[str | None] = mapped_column(Text)
    # memtree's own: when a running job was asked to stop (its worker polls for it).
    cancel_requested_at_ms: Mapped[int | None] = mapped_column(Millis)
    # memtree's own: how many times self-heal revived this job from ``failed`` (bounded
    # by the self-heal limit; an operator's requeue sets it back to 0).
    heal_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))

    __table_args__ = (
        Index("idx_mem_tree_jobs_ready", "status", "available_at_ms"),
        Index("idx_mem_tree_jobs_kind", "kind"),
        Index(
            "idx_mem_tree_jobs_dedupe_active",
            "dedupe_key",
            unique=True,
            sqlite_where=text(ACTIVE_DEDUPE_PREDICATE),
            postgresql_where=text(ACTIVE_DEDUPE_PREDICATE),
        ),
        # Claims walk ready rows of one kind in due order, so neither a large done
        # history nor a deep backlog of other kinds is read or sorted.
        Index(
            "ix_mem_tree_jobs_claim",
            "kind",
            "available_at_ms",
            sqlite_where=text("status = 'ready'"),
            postgresql_where=text("status = 'ready'"),
        ),
        # memtree's own (memtree_0006): a global gate counts its holders, and recovery
        # finds expired leases, among the running rows only.
        Index(
            "ix_mem_tree_jobs_running",
            "kind",
            "locked_until_ms",
            sqlite_where=text("status = 'running'"),
            postgresql_where=text("status = 'running'"),
        ),
    )


class MemTreePermit(Base):
    """One permit of a global gate: free, or held by the claim of ``job_id`` it names
    (with that claim's ``lease_token``). A permit is free again once that claim no longer
    holds its job running under a live lease, so a settle, a release and a recovery free
    it without touching this table, and a stale claim frees nothing. Claims take free
    permits with ``FOR UPDATE SKIP LOCKED``, so workers never wait on each other's."""

    __tablename__ = PERMITS_TABLE

    gate: Mapped[str] = mapped_column(Text, primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str | None] = mapped_column(Text)
    lease_token: Mapped[str | None] = mapped_column(Text)


class MemTreeRateEvent(Base):
    """One start counted against a rate limit: a worker's claim, or an application's own
    call that consumed from the same budget. A limit allows at most its ``limit`` of
    weight per key in any window; rows older than the window are deleted as limits are
    consumed. The original crate never reads this table."""

    __tablename__ = RATE_EVENTS_TABLE

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    limit_name: Mapped[str] = mapped_column(Text, nullable=False)
    # '' when the limit is not partitioned: one budget for the whole fleet.
    partition_key: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("''"))
    at_ms: Mapped[int] = mapped_column(Millis, nullable=False)
    weight: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("1"))
    # The job whose claim counted this start; NULL for an application's own call.
    job_id: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_mem_tree_rate_events_window", "limit_name", "partition_key", "at_ms"),
    )


class MemTreeSchedule(Base):
    """A periodic schedule's progress: the last slot it enqueued (or skipped), so each
    slot is enqueued once across every worker process."""

    __tablename__ = SCHEDULES_TABLE

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    last_slot_ms: Mapped[int] = mapped_column(Millis, nullable=False)
    updated_at_ms: Mapped[int] = mapped_column(Millis, nullable=False)


#: The Core table the store and settle statements are built on.
jobs = cast(Table, MemTreeJob.__table__)
permits = cast(Table, MemTreePermit.__table__)
rate_events = cast(Table, MemTreeRateEvent.__table__)
schedules = cast(Table, MemTreeSchedule.__table__)
