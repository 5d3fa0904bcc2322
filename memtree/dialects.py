"""What differs per database, chosen explicitly by ``engine.dialect.name``.

A shared statement would be a trap: SQLAlchemy's SQLite compiler silently drops
``FOR UPDATE``, so a claim written once would "work" on SQLite and lose its
guarantee on PostgreSQL, or the reverse. Each supported database registers one
:class:`Dialect` here; an unknown database is an error, never a fallback.

Only statement *shapes* live here. Which statements run, and when, is the business
of :mod:`memtree.store` and :mod:`memtree.settle`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar, cast

from sqlalchemy import (
    BigInteger,
    BindParameter,
    Executable,
    Insert,
    Select,
    Table,
    Text,
    Update,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.sql.elements import ColumnElement

from memtree.errors import UnsupportedDatabaseError
from memtree.models import ACTIVE_DEDUPE_PREDICATE, jobs, permits

__all__ = [
    "INSERT_COLUMNS",
    "NOTIFY_CHANNEL",
    "Claim",
    "Dialect",
    "MariaDBDialect",
    "MySQLDialect",
    "PostgresDialect",
    "SQLiteDialect",
    "dialect_for",
]


#: The PostgreSQL channel enqueues notify and idle workers listen on; the payload is the kind.
NOTIFY_CHANNEL = "memtree_jobs"

#: A claim as a batched settle matches it: ``(id, lease_token, attempts, started_at_ms)``.
Claim = tuple[str, str, int, int | None]

#: The columns an enqueue writes; every other column takes its default.
INSERT_COLUMNS = (
    "id",
    "kind",
    "payload_json",
    "dedupe_key",
    "status",
    "attempts",
    "max_attempts",
    "available_at_ms",
    "created_at_ms",
)


class Dialect:
    """The per-database strategy: how to insert-unless-deduped, claim, and wake workers."""

    name: ClassVar[str]
    #: Whether claims lock their rows and skip rows other transactions hold.
    skip_locked: ClassVar[bool] = False
    #: Whether enqueues notify listening workers (at commit) through the database.
    notifies: ClassVar[bool] = False
    #: Whether a column may hold a value of another type than it declares (SQLite).
    loosely_typed: ClassVar[bool] = False
    #: Whether one transaction at a time writes (SQLite's file lock), so nothing needs a
    #: lock of its own to count and then write.
    serialised_writes: ClassVar[bool] = False
    #: Whether an UPDATE (and an INSERT) can return the rows it wrote. Where it cannot
    #: (MySQL), the store locks the rows first and reads them back under that lock.
    returns_rows: ClassVar[bool] = True
    #: Whether a global gate's permits are rows taken in the claim's own statement (data-
    #: modifying CTEs); elsewhere a claim counts the gate's holders under its lock.
    permit_rows: ClassVar[bool] = False

    def insert_unless_active_key(self) -> Insert:
        """An INSERT that silently does nothing when the dedupe key is active."""
        raise NotImplementedError

    def insert_if_absent(self, table: Table) -> Insert:
        """An INSERT into ``table`` that silently does nothing when its primary key exists."""
        raise NotImplementedError

    def enqueue_one(self) -> Executable:
        """One job in, unless its dedupe key is active (and a notification, where the
        database can); :meth:`inserted` reads from its result which it was."""
        return self.insert_unless_active_key().values(_insert_binds())

    def inserted(self, result: Result[Any]) -> bool:
        """Whether :meth:`enqueue_one` inserted its row."""
        # A count, not a RETURNING row: fetching the row would cost more than the insert.
        return cast(CursorResult[Any], result).rowcount == 1

    def enqueue_batch(self) -> Executable:
        """Many jobs in, returning the id of each row inserted (and notifying, where the
        database can); run once per batch with the parameters of :meth:`batch_params`."""
        return self.insert_unless_active_key().returning(jobs.c.id)

    def batch_params(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | dict[str, Any]:
        """The parameters of :meth:`enqueue_batch` for these rows, each a value per
        :data:`INSERT_COLUMNS`: here one parameter set per row, in order."""
        return list(rows)

    def claim(self, picked: Select[tuple[str]], values: dict[str, ColumnElement[object]]) -> Update:
        """An UPDATE that applies ``values`` to the rows ``picked`` selects, returning them."""
        raise NotImplementedError

    def clock_statement(self) -> Select[Any] | None:
        """A read of the database server's clock in epoch milliseconds; None where the
        database has no clock of its own (SQLite: the host's is every process's)."""
        return None

    def payload_field(self, name: str) -> ColumnElement[str]:
        """The text of the top-level payload field ``name`` of a row ('' when the payload
        has no such field, or, where the database can tell, is not JSON at all)."""
        raise NotImplementedError

    def lock_limits(
        self, wait: Sequence[tuple[int, int]], attempt: Sequence[tuple[int, int]]
    ) -> Select[Any] | None:
        """A statement taking the transaction-scoped locks of fleet-wide limits: waiting
        for each of ``wait``, trying each of ``attempt`` (one boolean column each, after
        the waits' columns). None where transactions that write are serialised anyway
        (SQLite: a claim's transaction holds the write lock from its first statement)."""
        return None

    def notify_kinds(self) -> Executable | None:
        """A notification to listening workers that a ``:kind`` can be claimed again (a
        permit freed), delivered at commit; None where the database cannot notify."""
        return None

    def claim_only_commit(self) -> Executable | None:
        """Run first in a transaction that only claims, to let its commit skip the wait for
        the disk, where the database can (see :func:`memtree.store.relax_claim_commit`)."""
        return None

    def holds_claims(self) -> ColumnElement[bool]:
        """True for a ``running`` row still under one of the claims bound by
        :meth:`claims_params`: its ``(id, lease_token, attempts, started_at_ms)`` is one of
        them. The token alone is not enough: the original crate's claim keeps whatever
        token the row had, so a row it recovered and claimed again still carries the
        token of memtree's stale claim; its claim moves ``attempts`` and
        ``started_at_ms``. The SQL text is the same for any number of claims, so it is
        compiled once and prepared by the driver, where a list of bound tuples would be a
        new statement for every batch size."""
        raise NotImplementedError

    def claims_params(self, claims: Sequence[Claim]) -> dict[str, Any]:
        """The parameters of :meth:`holds_claims` for these claims."""
        raise NotImplementedError

    def update_held(
        self, values: dict[str, Any], also: ColumnElement[bool] | None = None
    ) -> Executable:
        """An UPDATE applying ``values`` to every row :meth:`holds_claims` (and ``also``)
        selects, returning the ``(id, lease_token)`` of each row it updated. Where rows
        have locks, a row another transaction holds locked is skipped, not waited for:
        :meth:`skipped_for_a_lock` then tells a skipped claim from a lost one."""
        held = self.holds_claims() if also is None else and_(self.holds_claims(), also)
        return update(jobs).where(held).values(values).returning(jobs.c.id, jobs.c.lease_token)

    def update_locked(self, values: dict[str, Any]) -> Executable | None:
        """Where an UPDATE cannot return rows: the UPDATE applying ``values`` to the rows
        :meth:`update_held` locked and returned, by id (``:locked_ids``). None where
        :meth:`update_held` updates them itself."""
        return None

    def limit_lock_rows(self, skip_locked: bool) -> Select[tuple[str]] | None:
        """Where limits lock rows instead of advisory locks (MySQL), the locking read of
        those rows; None elsewhere (see :meth:`lock_limits`)."""
        return None

    def current_read(self, statement: Select[Any]) -> Select[Any]:
        """``statement`` as a read of the newest committed rows, for a count that decides a
        limit in a caller's transaction. Needed where a transaction may read a snapshot
        taken at its first read (MySQL's REPEATABLE READ, the default): there it is a
        locking read (``LOCK IN SHARE MODE``), which reads the newest rows instead."""
        return statement

    def begin_statement(self) -> str | None:
        """Run before memtree begins a transaction of its own on an engine it did not build
        (what that transaction needs of the session); None where nothing is needed."""
        return None

    def skipped_for_a_lock(
        self, also: ColumnElement[bool] | None = None
    ) -> Select[tuple[str]] | None:
        """Run over the claims :meth:`update_held` (with the same ``also``) left out: the
        ids of those it skipped for another transaction's row lock, to be settled again
        later; the others were lost (or ``also`` refused them). None where rows have no
        locks."""
        return None


class SQLiteDialect(Dialect):
    """SQLite serialises writers, so a claim is one UPDATE of the picked ids."""

    name = "sqlite"
    loosely_typed = True
    serialised_writes = True

    def insert_unless_active_key(self) -> Insert:
        # Input is validated before it gets here, so the dedupe index is the only
        # constraint OR IGNORE can ever swallow.
        return insert(jobs).prefix_with("OR IGNORE")

    def insert_if_absent(self, table: Table) -> Insert:
        # Callers bind validated values: the primary key is the only constraint to swallow.
        return insert(table).prefix_with("OR IGNORE")

    def claim(self, picked: Select[tuple[str]], values: dict[str, ColumnElement[object]]) -> Update:
        return update(jobs).where(jobs.c.id.in_(picked.scalar_subquery())).values(values)

    def payload_field(self, name: str) -> ColumnElement[str]:
        # json_extract raises on a payload that is not JSON; json_valid keeps such a row
        # (another program's) from failing every claim of its kinds.
        value = func.json_extract(jobs.c.payload_json, literal(f'$."{name}"', Text))
        valid = func.json_valid(jobs.c.payload_json) == literal_column("1")
        return func.coalesce(case((valid, value.cast(Text))), _EMPTY)

    def holds_claims(self) -> ColumnElement[bool]:
        # One JSON array of [id, token, attempts, started] claims, each id looked up by
        # primary key. Without ANALYZE statistics SQLite would rather walk every running
        # row through the status index; the unary + (SQLite's own idiom) takes that index
        # out of the choice.
        pairs = func.json_each(bindparam("claims", type_=Text)).table_valued("value")
        return and_(
            literal_column("+mem_tree_jobs.status") == literal_column("'running'"),
            tuple_(*_FENCE_COLUMNS).in_(
                select(
                    func.json_extract(pairs.c.value, literal_column("'$[0]'")),
                    func.json_extract(pairs.c.value, literal_column("'$[1]'")),
                    func.json_extract(pairs.c.value, literal_column("'$[2]'")),
                    func.json_extract(pairs.c.value, literal_column("'$[3]'")),
                )
            ),
        )

    def claims_params(self, claims: Sequence[Claim]) -> dict[str, Any]:
        return {"claims": json.dumps(claims)}


class PostgresDialect(Dialect):
    """PostgreSQL claims lock their rows and skip locked ones, so workers never collide."""

    name = "postgresql"
    skip_locked = True
    notifies = True
    permit_rows = True

    def enqueue_one(self) -> Executable:
        return _notifying(self.insert_unless_active_key().values(_insert_binds()))

    def inserted(self, result: Result[Any]) -> bool:
        # The statement is a SELECT over the RETURNING rows: the row is the answer.
        return result.first() is not None

    def enqueue_batch(self) -> Executable:
        # One array per column, unnested into rows: the text is the same for any number of
        # jobs, so the driver prepares it once, where a multi-row VALUES list would be a
        # new statement for the driver to parse and the server to plan for every size.
        # unnest reads the arrays in order, so rows go in (and take their dedupe index
        # locks) in the order given.
        batch = (
            func.unnest(
                *(bindparam(name, type_=ARRAY(jobs.c[name].type)) for name in INSERT_COLUMNS)
            )
            .table_valued(*INSERT_COLUMNS)
            .render_derived(name="batch")
        )
        insert = self.insert_unless_active_key().from_select(INSERT_COLUMNS, select(*batch.c))
        return _notifying(insert)

    def batch_params(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | dict[str, Any]:
        return {name: [row[name] for row in rows] for name in INSERT_COLUMNS}

    def insert_unless_active_key(self) -> Insert:
        # The conflict target names the partial index by its literal predicate, so the
        # planner can infer it even from a generic plan of a prepared statement.
        return pg_insert(jobs).on_conflict_do_nothing(
            index_elements=[jobs.c.dedupe_key], index_where=text(ACTIVE_DEDUPE_PREDICATE)
        )

    def payload_field(self, name: str) -> ColumnElement[str]:
        # A payload that is not JSON fails the statement (22P02): the store fails such
        # ready rows as unreadable and claims again (see memtree.store.claim_limited).
        field = jobs.c.payload_json.cast(JSONB).op("->>", return_type=Text)(literal(name, Text))
        return func.coalesce(field, _EMPTY)

    def lock_limits(
        self, wait: Sequence[tuple[int, int]], attempt: Sequence[tuple[int, int]]
    ) -> Select[Any] | None:
        columns = [func.pg_advisory_xact_lock(literal(a), literal(b)) for a, b in wait]
        columns += [func.pg_try_advisory_xact_lock(literal(a), literal(b)) for a, b in attempt]
        return select(*columns)

    def notify_kinds(self) -> Executable | None:
        return select(func.pg_notify(literal(NOTIFY_CHANNEL), bindparam("kind", type_=Text)))

    def clock_statement(self) -> Select[Any] | None:
        # clock_timestamp(), not now(): now() is when the transaction began.
        epoch_ms = func.floor(
            func.extract("epoch", func.clock_timestamp()) * literal_column("1000")
        )
        return select(epoch_ms.cast(BigInteger))

    def insert_if_absent(self, table: Table) -> Insert:
        return pg_insert(table).on_conflict_do_nothing(index_elements=list(table.primary_key))

    def claim(self, picked: Select[tuple[str]], values: dict[str, ColumnElement[object]]) -> Update:
        # A materialised CTE runs the locking pick exactly once; an IN (subquery) may be
        # re-run by the planner and lock more rows than it claims.
        chosen = picked.cte("picked").prefix_with("MATERIALIZED")
        return update(jobs).where(jobs.c.id == chosen.c.id).values(values)

    def holds_claims(self) -> ColumnElement[bool]:
        # One array per fence column zipped by unnest: one prepared statement for any batch.
        claims = (
            func.unnest(
                *(
                    bindparam(f"claim_{column.name}", type_=ARRAY(column.type))
                    for column in _FENCE_COLUMNS
                )
            )
            .table_valued(*(column.name for column in _FENCE_COLUMNS))
            .render_derived(name="claims")
        )
        # Joined by primary key, then each fence column compared: an index lookup per
        # claim, where a row-value IN over the four columns plans worse.
        return and_(
            jobs.c.status == literal_column("'running'"),
            *(column == claims.c[column.name] for column in _FENCE_COLUMNS),
        )

    def claims_params(self, claims: Sequence[Claim]) -> dict[str, Any]:
        return {
            f"claim_{column.name}": [claim[i] for claim in claims]
            for i, column in enumerate(_FENCE_COLUMNS)
        }

    def update_held(
        self, values: dict[str, Any], also: ColumnElement[bool] | None = None
    ) -> Executable:
        # The loop thread runs these, and it must never wait on a row lock of another
        # session (a host's SELECT ... FOR UPDATE, a handler's open transaction): the rows
        # are locked with SKIP LOCKED first, once (a materialised CTE), and only those are
        # updated. ``also`` applies once the row is locked, so a locked row it would refuse
        # (a cancel requested) is skipped too, not handed to a follow-up statement that
        # would wait on the lock. Telling skipped claims from lost ones costs a second
        # statement (still_held), run only when some claim was left out.
        locked = (
            select(jobs.c.id)
            .where(self.holds_claims())
            .with_for_update(skip_locked=True, of=jobs)
            .cte("locked")
            .prefix_with("MATERIALIZED")
        )
        updated = update(jobs).where(jobs.c.id == locked.c.id)
        if also is not None:
            updated = updated.where(also)
        return updated.values(values).returning(jobs.c.id, jobs.c.lease_token)

    def skipped_for_a_lock(
        self, also: ColumnElement[bool] | None = None
    ) -> Select[tuple[str]] | None:
        # A claim still held that update_held left out was skipped for a lock, even if
        # that lock is gone by now (a claim's pick in another worker locks a row it then
        # finds running, until its transaction ends). Only one that ``also`` refuses was
        # left out for that, unless another transaction still holds it locked: a SKIP
        # LOCKED read returns the rows this one can lock and skips the others'.
        return _held_or_locked(self.holds_claims(), also, lock_of=True)


class MySQLDialect(Dialect):
    """MySQL 8 and MariaDB 10.6+ (InnoDB): claims lock their rows ``FOR UPDATE SKIP
    LOCKED`` and then update them by id, as neither returns rows from an UPDATE; there is
    no partial index (the dedupe index is over a generated column) and no NOTIFY.

    memtree's own transactions run at READ COMMITTED (see :func:`memtree.engine.begin_write`),
    so a claim's locking read takes no gap locks that would stall concurrent enqueues."""

    name = "mysql"
    skip_locked = True
    returns_rows = False

    def insert_unless_active_key(self) -> Insert:
        # Input is validated before it gets here (and the server is in strict mode), so
        # the dedupe index is the only error IGNORE can ever swallow: job ids are fresh.
        return insert(jobs).prefix_with("IGNORE")

    def insert_if_absent(self, table: Table) -> Insert:
        return insert(table).prefix_with("IGNORE")

    def enqueue_batch(self) -> Executable:
        # Run as an executemany, which the driver sends as one multi-row INSERT; the store
        # reads back which ids went in (see memtree.store.enqueue_many).
        return self.insert_unless_active_key()

    def claim(self, picked: Select[tuple[str]], values: dict[str, ColumnElement[object]]) -> Update:
        raise NotImplementedError("MySQL claims lock, then update by id (store._claim_by_ids)")

    def payload_field(self, name: str) -> ColumnElement[str]:
        # JSON null and a missing field are both '' (as on the other databases); a
        # payload that is not JSON is '' too, JSON_VALID keeping JSON_EXTRACT from failing.
        path = literal(f'$."{name}"', Text)
        value = func.json_extract(jobs.c.payload_json, path)
        readable = and_(
            func.json_valid(jobs.c.payload_json) == literal_column("1"),
            func.coalesce(func.json_type(value), literal_column("'NULL'"))
            != literal_column("'NULL'"),
        )
        return case((readable, func.json_unquote(value)), else_=_EMPTY)

    def clock_statement(self) -> Select[Any] | None:
        # UTC_TIMESTAMP, not UNIX_TIMESTAMP(NOW()): no session time zone, no DST fold.
        micros = func.timestampdiff(
            literal_column("MICROSECOND"),
            literal_column("'1970-01-01 00:00:00'"),
            func.utc_timestamp(literal_column("6")),
        )
        return select((micros.op("DIV")(literal_column("1000"))).cast(BigInteger))

    def holds_claims(self) -> ColumnElement[bool]:
        # The ids first, so the primary key finds the rows; then each row's whole claim.
        return and_(
            jobs.c.id.in_(bindparam("claim_ids", expanding=True)),
            jobs.c.status == literal_column("'running'"),
            tuple_(*_FENCE_COLUMNS).in_(bindparam("claims", expanding=True)),
        )

    def claims_params(self, claims: Sequence[Claim]) -> dict[str, Any]:
        return {"claim_ids": [claim[0] for claim in claims], "claims": [tuple(c) for c in claims]}

    def update_held(
        self, values: dict[str, Any], also: ColumnElement[bool] | None = None
    ) -> Executable:
        # No RETURNING: this is the locking read of the rows to update (skipping rows other
        # sessions hold, as on PostgreSQL); update_locked then writes them by id.
        held = self.holds_claims() if also is None else and_(self.holds_claims(), also)
        return select(jobs.c.id, jobs.c.lease_token).where(held).with_for_update(skip_locked=True)

    def update_locked(self, values: dict[str, Any]) -> Executable | None:
        return (
            update(jobs)
            .where(jobs.c.id.in_(bindparam("locked_ids", expanding=True)))
            .values(values)
        )

    def skipped_for_a_lock(
        self, also: ColumnElement[bool] | None = None
    ) -> Select[tuple[str]] | None:
        # As on PostgreSQL; MariaDB's locking clause names no table (``OF``).
        return _held_or_locked(self.holds_claims(), also, lock_of=False)

    def lock_limits(
        self, wait: Sequence[tuple[int, int]], attempt: Sequence[tuple[int, int]]
    ) -> Select[Any] | None:
        raise NotImplementedError("MySQL's limit locks are rows (see limit_lock_rows)")

    def limit_lock_rows(self, skip_locked: bool) -> Select[tuple[str]]:
        """A locking read of the lock rows of the limits named ``:names`` (rows of
        ``mem_tree_permits`` with slot -1; :meth:`insert_if_absent` makes them): MySQL has
        no transaction-scoped advisory lock, and a row lock is one. Waiting reads lock in
        primary-key order, so two claims never deadlock on them; a read that skips locked
        rows returns the names it took."""
        return (
            select(permits.c.gate)
            .where(permits.c.gate.in_(bindparam("names", expanding=True)))
            .where(permits.c.slot == literal_column("-1"))
            .order_by(permits.c.gate)
            .with_for_update(skip_locked=skip_locked)
        )

    def current_read(self, statement: Select[Any]) -> Select[Any]:
        return statement.with_for_update(read=True)

    def begin_statement(self) -> str | None:
        return "SET TRANSACTION ISOLATION LEVEL READ COMMITTED"


class MariaDBDialect(MySQLDialect):
    """MariaDB as SQLAlchemy names it for ``mariadb+pymysql://`` URLs: the same engine."""

    name = "mariadb"


_EMPTY: ColumnElement[str] = literal_column("''")

#: The columns a settle matches its claim on, in the order of a :data:`Claim`.
_FENCE_COLUMNS = (jobs.c.id, jobs.c.lease_token, jobs.c.attempts, jobs.c.started_at_ms)

_DIALECTS: dict[str, Dialect] = {
    d.name: d for d in (SQLiteDialect(), PostgresDialect(), MySQLDialect(), MariaDBDialect())
}


def _held_or_locked(
    holds: ColumnElement[bool], also: ColumnElement[bool] | None, *, lock_of: bool
) -> Select[tuple[str]]:
    """The ids of the claims ``holds`` selects that a batched settle skipped for a lock:
    every one still held, or, with ``also``, those ``also`` accepts or another
    transaction holds locked (a SKIP LOCKED read returns only the rows this one can lock)."""
    held = select(jobs.c.id).where(holds)
    if also is None:
        return held
    lockable = (
        select(jobs.c.id)
        .where(holds)
        .with_for_update(skip_locked=True, of=jobs if lock_of else None)
        .correlate(None)  # its own scan of the table, not the outer query's row
    )
    return held.where(or_(also, jobs.c.id.not_in(lockable)))


def _insert_binds() -> dict[str, BindParameter[Any]]:
    return {name: bindparam(name, type_=jobs.c[name].type) for name in INSERT_COLUMNS}


def _notifying(insert: Insert) -> Executable:
    """``insert`` and a NOTIFY per row it really inserted, in one round trip, returning
    each inserted id. Notifications are delivered when the transaction commits, and one
    kind notified many times in a transaction is delivered once."""
    inserted = insert.returning(jobs.c.id, jobs.c.kind).cte("inserted")
    return select(inserted.c.id, func.pg_notify(literal(NOTIFY_CHANNEL), inserted.c.kind))


def dialect_for(name: str) -> Dialect:
    """The registered dialect for ``engine.dialect.name``, or :class:`UnsupportedDatabaseError`."""
    try:
        return _DIALECTS[name]
    except KeyError:
        raise UnsupportedDatabaseError(name) from None
