"""Enqueue, claim and read: every statement that puts jobs in or takes them out.

Callers are :class:`memtree.Queue` (in a transaction of its own) and the free
functions in :mod:`memtree.queue` (in the caller's transaction); each function here
runs on whatever ``Connection`` or ``Session`` it is given and never commits.
Settlement, every state change after a claim, lives in :mod:`memtree.settle`.

- The dedupe key is enforced by the partial unique index over ``ready``/``running``
  rows: an insert whose key is active does nothing and reports ``None``.
- A claim is one UPDATE … RETURNING over the rows a pick selects. The pick walks
  ready rows kind by kind through the claim index, so it reads at most ``limit`` rows
  per kind it may claim instead of sorting the whole backlog. On PostgreSQL and MySQL
  the pick locks with ``FOR UPDATE SKIP LOCKED``, so concurrent workers never wait on
  each other nor take the same row. MySQL returns no rows from an UPDATE: there the
  locking reads run kind by kind and the UPDATE of their ids follows.
- Every claim writes a fresh ``lease_token``; settles are fenced to it.
- A row another program wrote may hold what memtree never writes (SQLite types loosely:
  text in an integer column, a BLOB payload). Such a row is that row's problem only: due
  times are read from integers alone, a claimed row that cannot be read as a :class:`Job`
  is failed (``unreadable_row``, unrecoverable) in the claim's own transaction while the
  rest of the claim is returned, and the raw reads below let the CLI show what it can.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from sqlalchemy import (
    BigInteger,
    Connection,
    Row,
    Select,
    Table,
    Update,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnClause, ColumnElement

from memtree import dberrors
from memtree.dialects import Dialect, dialect_for
from memtree.errors import CorruptJobError, InvalidJobError, MemtreeError
from memtree.limits import Gate, Limit, RateLimit, lock_key
from memtree.models import MemTreeJob, jobs, permits, rate_events, schedules, workers
from memtree.types import (
    DEFAULT_MAX_ATTEMPTS,
    MAX_MS,
    FailureClass,
    Job,
    JobStatus,
    NewJob,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

__all__ = [
    "WORKER_BEAT_MS",
    "WORKER_FORGET_MS",
    "WORKER_GONE_MS",
    "Executor",
    "ScheduleRow",
    "WorkerRow",
    "active_with_key",
    "advance_schedule",
    "beat_worker",
    "cancel_requested",
    "claim",
    "claim_limited",
    "claim_pick",
    "claimant_of",
    "completions",
    "consume",
    "count_by_kind_and_status",
    "count_by_status",
    "count_due_ahead",
    "count_failed_unrecoverable",
    "count_retired",
    "count_total",
    "count_unreadable",
    "database_clock_ms",
    "dialect_of",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "forget_worker",
    "gate_holders",
    "get_job",
    "get_row",
    "job_from_row",
    "job_from_values",
    "lease_token",
    "list_failed",
    "list_jobs",
    "list_rows",
    "list_running",
    "list_schedules",
    "list_workers",
    "lock_limits",
    "new_job_id",
    "next_due_ms",
    "notify",
    "prune",
    "purge_retired_jobs",
    "rate_used",
    "ready_backlog",
    "record_starts",
    "relax_claim_commit",
    "rowcount",
    "saturating",
    "translate_errors",
]

log = logging.getLogger("memtree.store")

#: Anything memtree can run a statement on inside the caller's transaction.
Executor: TypeAlias = Connection | Session

# Status literals are rendered inline, not bound: a generic plan of a prepared statement
# can only use the partial indexes when the predicate names the status literally.
READY: ColumnClause[str] = literal_column("'ready'")
RUNNING: ColumnClause[str] = literal_column("'running'")
FAILED: ColumnClause[str] = literal_column("'failed'")
DONE: ColumnClause[str] = literal_column("'done'")
# Every due time memtree writes is in this range; on SQLite text and BLOB values sort above
# any number and infinities lie outside it, so the range (which the ready and claim
# indexes serve) leaves them out.
_MIN_MS = literal(-MAX_MS - 1, BigInteger())
_MAX_MS = literal(MAX_MS, BigInteger())
#: ``failure_reason`` of a claimed row that could not be read as a job.
UNREADABLE_ROW = "unreadable_row"

_MAX_ATTEMPTS = 2**31 - 1

# Rows per INSERT in enqueue_many: under SQLite's bound-parameter limit on any build.
_INSERT_CHUNK = 500


def new_job_id() -> str:
    return f"job:{uuid.uuid4()}"


def dialect_of(executor: Executor) -> Dialect:
    if isinstance(executor, Session):
        return dialect_for(executor.get_bind(MemTreeJob).dialect.name)
    return dialect_for(executor.dialect.name)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn driver errors into memtree's (see :func:`memtree.dberrors.translate`): a missing
    table is a schema error, the rest a :class:`DatabaseError` with the driver's exception
    as its cause and its :class:`~memtree.dberrors.Fault`."""
    try:
        yield
    except MemtreeError:
        raise
    except sa_exc.DBAPIError as exc:
        raise dberrors.translate(exc) from exc


# -- enqueue -------------------------------------------------------------------------


def _insert_params(job: NewJob, now_ms: int, default_max_attempts: int) -> dict[str, Any]:
    return {
        "id": new_job_id(),
        "kind": str(job.kind),
        "payload_json": job.payload_json,
        "dedupe_key": job.dedupe_key,
        "status": JobStatus.READY.value,
        "attempts": 0,
        "max_attempts": job.max_attempts if job.max_attempts is not None else default_max_attempts,
        "available_at_ms": (
            job.available_at_ms
            if job.available_at_ms is not None
            else saturating(now_ms + (job.delay_ms or 0))
        ),
        "created_at_ms": now_ms,
    }


def _checked(job: object) -> NewJob:
    if not isinstance(job, NewJob):
        raise InvalidJobError(f"expected a NewJob, not {type(job).__name__}")
    return job


@cache
def _enqueue_one_statement(dialect_name: str) -> Any:
    return dialect_for(dialect_name).enqueue_one()


@cache
def _enqueue_batch_statement(dialect_name: str) -> Any:
    return dialect_for(dialect_name).enqueue_batch()


def enqueue(
    executor: Executor,
    job: NewJob,
    *,
    now_ms: int,
    default_max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> str | None:
    """Insert one ``ready`` job; None when its dedupe key is already active."""
    job = _checked(job)
    params = _insert_params(job, now_ms, default_max_attempts)
    dialect = dialect_of(executor)
    result = executor.execute(_enqueue_one_statement(dialect.name), params)
    return params["id"] if dialect.inserted(result) else None


async def enqueue_async(
    executor: AsyncSession | AsyncConnection,
    job: NewJob,
    *,
    now_ms: int,
    default_max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> str | None:
    """:func:`enqueue` on an ``AsyncSession`` or ``AsyncConnection``."""
    from sqlalchemy.ext.asyncio import AsyncSession

    job = _checked(job)
    bind = executor.get_bind() if isinstance(executor, AsyncSession) else executor
    params = _insert_params(job, now_ms, default_max_attempts)
    dialect = dialect_for(bind.dialect.name)
    result = await executor.execute(_enqueue_one_statement(dialect.name), params)
    return params["id"] if dialect.inserted(result) else None


def enqueue_many(
    executor: Executor,
    new_jobs: Sequence[NewJob],
    *,
    now_ms: int,
    default_max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> list[str | None]:
    """Insert many jobs; None at every position dedupe suppressed.

    A key repeated inside the batch is suppressed after its first occurrence, the
    same as if the jobs had been enqueued one by one.
    """
    checked = [_checked(job) for job in new_jobs]
    if not checked:
        return []
    params = [_insert_params(job, now_ms, default_max_attempts) for job in checked]
    seen: set[str] = set()
    to_insert: list[dict[str, Any]] = []
    for row in params:
        key = row["dedupe_key"]
        if key is not None:
            if key in seen:
                row["id"] = None
                continue
            seen.add(key)
        to_insert.append(row)
    # Every batch takes its keys' index locks in one order, so two batches holding the
    # same keys in opposite orders cannot deadlock on PostgreSQL.
    to_insert.sort(key=lambda row: (row["dedupe_key"] is None, row["dedupe_key"] or ""))
    dialect = dialect_of(executor)
    statement = _enqueue_batch_statement(dialect.name)
    inserted: set[str] = set()
    for start in range(0, len(to_insert), _INSERT_CHUNK):
        chunk = to_insert[start : start + _INSERT_CHUNK]
        result = executor.execute(statement, dialect.batch_params(chunk))
        if dialect.returns_rows:
            inserted.update(result.scalars())
        else:
            # No RETURNING (MySQL): every id is fresh, so the rows found are the ones in.
            ids = [row["id"] for row in chunk]
            inserted.update(executor.execute(_ids_present_statement(), {"ids": ids}).scalars())
    return [row["id"] if row["id"] in inserted else None for row in params]


@cache
def _ids_present_statement() -> Select[Any]:
    return select(jobs.c.id).where(jobs.c.id.in_(bindparam("ids", expanding=True)))


# -- claim ---------------------------------------------------------------------------


def _branch(kind_filter: ColumnElement[bool], priority: int, lock: bool) -> Select[Any]:
    """Due ready rows matching ``kind_filter``, oldest first, at most ``limit`` of them."""
    pick = (
        select(jobs.c.id, literal(priority).label("priority"), jobs.c.available_at_ms)
        .where(jobs.c.status == READY)
        .where(jobs.c.available_at_ms <= bindparam("now"))
        .where(kind_filter)
        .order_by(jobs.c.available_at_ms)
        .limit(bindparam("limit"))
    )
    return pick.with_for_update(skip_locked=True) if lock else pick


@lru_cache(maxsize=256)
def _claim_statement(
    dialect_name: str,
    claim_order: tuple[str, ...],
    retired_kinds: tuple[str, ...],
    kinds: tuple[str, ...] | None,
) -> Update:
    """The claim for one (database, claim order, retired kinds, kinds) combination, built
    once. Kinds are rendered into the statement, so each combination is its own entry."""
    dialect = dialect_for(dialect_name)
    picked = _picked(dialect, claim_order, retired_kinds, kinds, None)
    return dialect.claim(picked, _claim_values()).returning(*jobs.c)


def _picked(
    dialect: Dialect,
    claim_order: tuple[str, ...],
    retired_kinds: tuple[str, ...],
    kinds: tuple[str, ...] | None,
    room: ColumnElement[Any] | None,
) -> Select[Any]:
    """The ids a claim takes: due ready rows, kind by kind in claim order, at most
    ``:limit`` per kind and in all (and at most ``room``, when given)."""
    lock = dialect.skip_locked
    branches = [
        _branch(kind_filter, priority, lock)
        for kind_filter, priority in _branch_filters(claim_order, retired_kinds, kinds)
    ]
    if len(branches) == 1:
        only = select(branches[0].subquery().c.id)
        return only if room is None else only.limit(room)
    merged = union_all(*(select(b.subquery()) for b in branches)).subquery()
    return (
        select(merged.c.id)
        .order_by(merged.c.priority, merged.c.available_at_ms)
        .limit(bindparam("limit") if room is None else room)
    )


def _branch_filters(
    claim_order: tuple[str, ...], retired_kinds: tuple[str, ...], kinds: tuple[str, ...] | None
) -> list[tuple[ColumnElement[bool], int]]:
    """The kind filter and priority of each branch of a claim, in claim order: one branch
    per kind, so each walks the claim index in due order (and, when ``kinds`` is None, a
    last one for every kind the claim order does not name)."""
    rest = len(claim_order)
    if kinds is None:
        filters = [(jobs.c.kind == kind, priority) for priority, kind in enumerate(claim_order)]
        excluded = (*claim_order, *retired_kinds)
        return [*filters, (jobs.c.kind.not_in(excluded) if excluded else true(), rest)]
    filters = [
        (jobs.c.kind == kind, priority)
        for priority, kind in enumerate(claim_order)
        if kind in kinds
    ]
    return filters + [(jobs.c.kind == kind, rest) for kind in kinds if kind not in claim_order]


@lru_cache(maxsize=256)
def _locking_branches(
    claim_order: tuple[str, ...], retired_kinds: tuple[str, ...], kinds: tuple[str, ...] | None
) -> tuple[tuple[int, Select[Any]], ...]:
    """A claim's branches as statements of their own, each with its priority, where the
    database cannot lock rows in a UNION's branches and update them in one statement
    (MySQL)."""
    return tuple(
        (
            priority,
            select(*jobs.c)
            .where(jobs.c.status == READY)
            .where(jobs.c.available_at_ms <= bindparam("now"))
            .where(kind_filter)
            .order_by(jobs.c.available_at_ms)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True),
        )
        for kind_filter, priority in _branch_filters(claim_order, retired_kinds, kinds)
    )


def claim_pick(
    dialect_name: str,
    kind: str,
    claim_order: tuple[str, ...] = (),
    retired_kinds: tuple[str, ...] = (),
) -> Select[Any]:
    """The read a claim of ``kind`` begins with, as :func:`claim` runs it on this database:
    the due ready rows it picks, in due order, locked where claims lock (binds ``:now``
    and ``:limit``). For EXPLAIN only (:mod:`memtree.doctor`): the pick is where a claim
    walks the claim index or sorts the backlog, and the UPDATE that follows it finds its
    rows by primary key. Never run it: on PostgreSQL and MySQL it locks what it reads."""
    dialect = dialect_for(dialect_name)
    if dialect.returns_rows:
        return _picked(dialect, claim_order, retired_kinds, (kind,), None)
    [(_, pick)] = _locking_branches(claim_order, retired_kinds, (kind,))
    return pick


def _claim_by_pick(
    executor: Executor,
    claim_order: tuple[str, ...],
    retired_kinds: tuple[str, ...],
    kinds: tuple[str, ...] | None,
    params: dict[str, Any],
) -> Sequence[Sequence[Any]]:
    """A claim where an UPDATE cannot return rows (MySQL): lock due ready rows branch by
    branch (``FOR UPDATE SKIP LOCKED``, the claim index in due order, at most what is
    still wanted), then claim them by id. The rows are locked from the read to the
    commit, so the claimed rows are the rows read with the claim's values applied, as
    the UPDATE applies them: no read back."""
    picked: list[Row[Any]] = []
    branches = _locking_branches(claim_order, retired_kinds, kinds)
    for _, group in itertools.groupby(branches, key=lambda branch: branch[0]):
        wanted = params["limit"] - len(picked)
        if wanted <= 0:
            break
        # Kinds of one priority are claimed in due order across them: each branch's first
        # rows, merged. Rows locked beyond what is claimed stay ready, skipped by other
        # claims only until this transaction ends.
        found = [
            row
            for _, branch in group
            for row in executor.execute(branch, {"now": params["now"], "limit": wanted})
        ]
        found.sort(key=lambda row: row[_DUE])
        picked.extend(found[:wanted])
    if not picked:
        return []
    executor.execute(_claim_ids_statement(), {**params, "ids": [row[0] for row in picked]})
    return [_as_claimed(row, params) for row in picked]


def _as_claimed(row: Row[Any], params: dict[str, Any]) -> tuple[Any, ...]:
    """A ready row's values once :func:`_claim_values` applied (the same arithmetic)."""
    values = list(row)
    attempts = values[_ATTEMPTS]
    values[_STATUS] = JobStatus.RUNNING.value
    values[_ATTEMPTS] = attempts + 1 if attempts < _MAX_ATTEMPTS else attempts
    values[_STARTED] = params["now"]
    values[_LOCKED_UNTIL] = params["until"]
    values[_LAST_ERROR] = None
    values[_TOKEN] = params["token"]
    return tuple(values)


_COLUMN_AT = {column.name: index for index, column in enumerate(jobs.c)}
_DUE = _COLUMN_AT["available_at_ms"]
_STATUS = _COLUMN_AT["status"]
_ATTEMPTS = _COLUMN_AT["attempts"]
_STARTED = _COLUMN_AT["started_at_ms"]
_LOCKED_UNTIL = _COLUMN_AT["locked_until_ms"]
_LAST_ERROR = _COLUMN_AT["last_error"]
_TOKEN = _COLUMN_AT["lease_token"]


def _claim_ids(
    executor: Executor, ids: Sequence[str], params: dict[str, Any]
) -> Sequence[Row[Any]]:
    """Claim the ready rows of ``ids``, which this transaction holds locked (or which no
    other transaction can write, on SQLite), returning them as claimed."""
    if not ids:
        return []
    binds = {**params, "ids": list(ids)}
    if dialect_of(executor).returns_rows:
        return executor.execute(_claim_ids_returning_statement(), binds).all()
    executor.execute(_claim_ids_statement(), binds)
    return executor.execute(_claimed_rows_statement(), binds).all()


@cache
def _claim_ids_returning_statement() -> Update:
    return _claim_ids_statement().returning(*jobs.c)


@cache
def _claimed_rows_statement() -> Select[Any]:
    return (
        select(jobs)
        .where(jobs.c.id.in_(bindparam("ids", expanding=True)))
        .where(jobs.c.lease_token == bindparam("token"))
    )


def _claim_values() -> dict[str, ColumnElement[Any]]:
    """What a claim writes: ``running`` under a fresh token, ``:now`` to ``:until``."""
    return {
        "status": RUNNING,
        # Saturating: a row another program wrote with the largest attempts must not make
        # the whole claim overflow PostgreSQL's INTEGER and fail for every job behind it.
        "attempts": case(
            (jobs.c.attempts < _MAX_ATTEMPTS, jobs.c.attempts + 1), else_=jobs.c.attempts
        ),
        "started_at_ms": bindparam("now"),
        "locked_until_ms": bindparam("until"),
        "last_error": literal_column("NULL"),
        "lease_token": bindparam("token"),
    }


def claim(
    executor: Executor,
    *,
    now_ms: int,
    limit: int,
    lock_duration_ms: int,
    claim_order: tuple[str, ...],
    retired_kinds: tuple[str, ...] = (),
    kinds: tuple[str, ...] | None = None,
    claimant: str | None = None,
) -> list[Job]:
    """Lease up to ``limit`` due jobs, in claim order then due time.

    ``kinds`` restricts the claim to those kinds; ``retired_kinds`` are never claimed.
    ``claimant``, a worker's id, starts the lease token (see :func:`lease_token`).
    """
    if kinds is not None:
        kinds = tuple(sorted({k for k in kinds if k not in retired_kinds}))
        if not kinds:
            return []
    if limit < 1:
        return []
    dialect = dialect_of(executor)
    token = lease_token(claimant)
    params = {
        "now": now_ms,
        "until": saturating(now_ms + lock_duration_ms),
        "token": token,
        "limit": limit,
    }
    if dialect.returns_rows:
        statement = _claim_statement(dialect.name, claim_order, retired_kinds, kinds)
        rows: Sequence[Sequence[Any]] = executor.execute(statement, params).all()
    else:
        rows = _claim_by_pick(executor, claim_order, retired_kinds, kinds, params)
    return _claimed(executor, rows, token=token, now_ms=now_ms, claim_order=claim_order)


def lease_token(claimant: str | None = None) -> str:
    """A fresh lease token: random, after ``claimant`` and a dot when a worker claims, so
    a running job names the worker whose claim holds it (:func:`claimant_of`)."""
    token = uuid.uuid4().hex
    return token if claimant is None else f"{claimant}.{token}"


def claimant_of(token: str | None) -> str | None:
    """The worker id a lease token starts with; None for a token without one (a claim of
    the original crate's, of an application's own, or of memtree before workers had ids)."""
    if not isinstance(token, str) or "." not in token:
        return None
    return token.partition(".")[0] or None


def _claimed(
    executor: Executor,
    rows: Sequence[Sequence[Any]],
    *,
    token: str,
    now_ms: int,
    claim_order: tuple[str, ...],
) -> list[Job]:
    """The jobs of a claim's returned rows, in claim order then due order; a row that
    cannot be read as a job is failed under the claim instead."""
    claimed: list[Job] = []
    unreadable: list[tuple[Any, CorruptJobError]] = []
    for row in rows:
        try:
            claimed.append(job_from_values(row))
        except CorruptJobError as exc:
            unreadable.append((row[0], exc))
    if unreadable:
        _fail_unreadable(executor, unreadable, token=token, now_ms=now_ms)
    # RETURNING keeps no order: put the claim order and due order back.
    order = {kind: index for index, kind in enumerate(claim_order)}
    rest = len(order)
    claimed.sort(key=lambda job: (order.get(job.kind, rest), job.available_at_ms, job.id))
    return claimed


@cache
def _fail_unreadable_statement() -> Update:
    return (
        update(jobs)
        .where(jobs.c.id == bindparam("f_id"))
        .where(jobs.c.lease_token == bindparam("f_token"))
        .values(
            status=FAILED,
            completed_at_ms=bindparam("now"),
            locked_until_ms=literal_column("NULL"),
            last_error=bindparam("error"),
            failure_reason=literal(UNREADABLE_ROW),
            failure_class=literal(FailureClass.UNRECOVERABLE.value),
        )
    )


def _fail_unreadable(
    executor: Executor, rows: list[tuple[Any, CorruptJobError]], *, token: str, now_ms: int
) -> None:
    """Fail, under the claim that just took them, rows no :class:`Job` can be built from:
    retrying cannot make them readable, and leaving them running would only have them
    recovered and claimed again at every lease."""
    for _, exc in rows:
        log.warning("memtree failed a claimed row (%s): %s", UNREADABLE_ROW, exc)
    params = [
        {"f_id": job_id, "f_token": token, "now": now_ms, "error": str(exc)} for job_id, exc in rows
    ]
    executor.execute(_fail_unreadable_statement(), params)


def relax_claim_commit(executor: Executor) -> None:
    """Let this transaction's commit return before its WAL reaches the disk (PostgreSQL's
    ``synchronous_commit = off``, for this transaction only). Only for a transaction that
    does nothing but claim: losing such a commit in a crash only leaves the jobs ready,
    and any later commit that settles them flushes the WAL up to and past the claim
    first, so no settled job can lose its claim. A claim then costs a round trip, not a
    round trip and a disk flush. SQLite needs nothing here: memtree's ``synchronous =
    NORMAL`` in WAL mode already flushes at checkpoints, not at commits."""
    statement = dialect_of(executor).claim_only_commit()
    if statement is not None:
        executor.execute(statement)


def saturating(value: int) -> int:
    """``value`` clamped to the signed 64-bit range the time columns hold."""
    return max(min(value, 2**63 - 1), -(2**63))


@lru_cache(maxsize=256)
def _next_due_statement(
    kinds: tuple[str, ...] | None, retired_kinds: tuple[str, ...]
) -> Select[Any]:
    if kinds is None:
        earliest = (
            select(func.min(jobs.c.available_at_ms))
            .where(jobs.c.status == READY)
            .where(jobs.c.available_at_ms.between(_MIN_MS, _MAX_MS))
        )
        if retired_kinds:
            earliest = earliest.where(jobs.c.kind.not_in(retired_kinds))
        return earliest
    # One MIN per kind: each is the first entry of that kind in the claim index.
    per_kind = union_all(
        *(
            select(func.min(jobs.c.available_at_ms).label("due"))
            .where(jobs.c.status == READY)
            .where(jobs.c.kind == kind)
            .where(jobs.c.available_at_ms.between(_MIN_MS, _MAX_MS))
            for kind in kinds
        )
    ).subquery()
    return select(func.min(per_kind.c.due))


def next_due_ms(
    executor: Executor,
    kinds: tuple[str, ...] | None = None,
    retired_kinds: tuple[str, ...] = (),
) -> int | None:
    """When the earliest ready job of ``kinds`` is due (maybe in the past); None if none is
    ready. A read: idle workers poll with it instead of attempting a claim, which writes.
    Only numbers are due times: a row whose ``available_at_ms`` is text (SQLite) is never
    due, and a fractional one is claimed and failed as unreadable."""
    if kinds is not None:
        kinds = tuple(sorted({k for k in kinds if k not in retired_kinds}))
        if not kinds:
            return None
        retired_kinds = ()  # the kinds named are already none of them
    due = executor.execute(_next_due_statement(kinds, retired_kinds)).scalar()
    return None if due is None else int(due)


def prune(
    executor: Executor, *, status: JobStatus, completed_before_ms: int, limit: int = 10_000
) -> int:
    """Delete up to ``limit`` terminal rows of ``status`` completed before the cutoff.

    Bounded, so a retention pass over millions of rows never holds locks for long;
    call it until it returns less than ``limit``.
    """
    if not status.is_terminal:
        raise InvalidJobError(f"only terminal statuses can be pruned, not {status.value!r}")
    doomed = (
        select(jobs.c.id)
        .where(jobs.c.status == status.value)
        .where(jobs.c.completed_at_ms < completed_before_ms)
        .limit(limit)
    )
    return _delete_picked(executor, jobs, doomed)


def _delete_picked(executor: Executor, table: Table, picked: Select[Any]) -> int:
    """Delete the rows of ``table`` whose ids ``picked`` selects (a bounded pick). MySQL
    can neither delete from a table a subquery reads nor take a LIMIT in an IN subquery:
    there the ids are read first."""
    if dialect_of(executor).returns_rows:
        statement = delete(table).where(table.c.id.in_(picked.scalar_subquery()))
        return rowcount(executor.execute(statement))
    ids = list(executor.execute(picked).scalars())
    if not ids:
        return 0
    return rowcount(executor.execute(delete(table).where(table.c.id.in_(ids))))


# -- reads ---------------------------------------------------------------------------


_STATUSES = {status.value: status for status in JobStatus}
#: ``Job``'s fields are the table's columns in the table's order, so a row of all the
#: columns builds a ``Job`` positionally (checked by tests/test_types.py).
JOB_COLUMNS = tuple(column.name for column in jobs.c)


_TEXT = (str,)
_INTEGER = (int,)
_OPTIONAL_TEXT = (str, type(None))
_OPTIONAL_INTEGER = (int, type(None))
#: The Python types a column's value may have in a row a :class:`Job` can be built from.
_COLUMN_TYPES: dict[str, tuple[type, ...]] = {
    "id": _TEXT,
    "kind": _TEXT,
    "payload_json": _TEXT,
    "dedupe_key": _OPTIONAL_TEXT,
    "status": _TEXT,
    "attempts": _INTEGER,
    "max_attempts": _INTEGER,
    "available_at_ms": _INTEGER,
    "locked_until_ms": _OPTIONAL_INTEGER,
    "last_error": _OPTIONAL_TEXT,
    "created_at_ms": _INTEGER,
    "started_at_ms": _OPTIONAL_INTEGER,
    "completed_at_ms": _OPTIONAL_INTEGER,
    "failure_reason": _OPTIONAL_TEXT,
    "failure_class": _OPTIONAL_TEXT,
    "lease_token": _OPTIONAL_TEXT,
    "cancel_requested_at_ms": _OPTIONAL_INTEGER,
    "heal_count": _INTEGER,
}
_CHECKS = tuple(_COLUMN_TYPES[name] for name in JOB_COLUMNS)
#: Every sequence of value types a readable row can have (a few hundred): one set lookup
#: of a row's types, in C, instead of a Python loop over its columns for every row claimed.
_READABLE_TYPES = frozenset(itertools.product(*_CHECKS))


def shown(value: object, limit: int = 60) -> str:
    """``value`` as a short repr, for messages about values memtree did not expect."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def unreadable_reason(values: Sequence[Any]) -> str | None:
    """Why no :class:`Job` can be built from these :data:`JOB_COLUMNS` values, or None.

    On PostgreSQL the column types already hold; SQLite stores any type in any column, so
    another program can leave text in ``available_at_ms`` or a BLOB in ``payload_json``.
    """
    for name, value, allowed in zip(JOB_COLUMNS, values, _CHECKS, strict=True):
        if type(value) not in allowed:
            wanted = "text" if allowed[0] is str else "an integer"
            null = " or NULL" if len(allowed) > 1 else ""
            return f"{name} holds {type(value).__name__} {shown(value)}, not {wanted}{null}"
    if values[4] not in _STATUSES:
        return f"unknown status {values[4]!r}"
    return None


def job_from_values(values: Sequence[Any]) -> Job:
    """A :class:`Job` from the values of every column in :data:`JOB_COLUMNS` order: the
    claim's fast path, without a mapping per row. A value of a type memtree never writes,
    or an unknown status, is a :class:`CorruptJobError`."""
    if tuple(map(type, values)) in _READABLE_TYPES:
        status = _STATUSES.get(values[4])
        if status is not None:
            job_id, kind, payload_json, dedupe_key, _, *rest = values
            return Job(job_id, kind, payload_json, dedupe_key, status, *rest)
    job_id = values[0] if isinstance(values[0], str) else shown(values[0])
    raise CorruptJobError(job_id, unreadable_reason(values) or "unreadable")


def job_from_row(row: Row[Any] | Mapping[str, Any]) -> Job:
    """A :class:`Job` from a full row; an unreadable one is a :class:`CorruptJobError`."""
    data = row._mapping if isinstance(row, Row) else row
    return job_from_values(tuple(data.get(name) for name in JOB_COLUMNS))


def cancel_requested(executor: Executor, ids: Sequence[str]) -> set[str]:
    """Which of these jobs have been asked to stop."""
    if not ids:
        return set()
    statement = (
        select(jobs.c.id)
        .where(jobs.c.id.in_(list(ids)))
        .where(jobs.c.cancel_requested_at_ms.is_not(None))
    )
    return set(executor.execute(statement).scalars())


def _list_statement(
    status: JobStatus | None, kind: str | None, dedupe_key: str | None, limit: int
) -> Select[Any]:
    statement = select(jobs)
    if status is not None:
        statement = statement.where(jobs.c.status == status.value)
    if kind is not None:
        statement = statement.where(jobs.c.kind == kind)
    if dedupe_key is not None:
        statement = statement.where(jobs.c.dedupe_key == dedupe_key)
    return statement.order_by(jobs.c.created_at_ms.desc(), jobs.c.id.desc()).limit(limit)


def list_jobs(
    executor: Executor,
    *,
    status: JobStatus | None = None,
    kind: str | None = None,
    dedupe_key: str | None = None,
    limit: int = 100,
) -> list[Job]:
    """Jobs matching every filter given, newest first (:class:`CorruptJobError` on a row
    that cannot be read; :func:`list_rows` reads those too)."""
    statement = _list_statement(status, kind, dedupe_key, limit)
    return [job_from_row(row) for row in executor.execute(statement)]


def list_rows(
    executor: Executor,
    *,
    status: JobStatus | None = None,
    kind: str | None = None,
    limit: int = 100,
) -> list[tuple[Any, ...]]:
    """The rows :func:`list_jobs` would read, as raw :data:`JOB_COLUMNS` values, readable or
    not: for showing an operator what is there (see :func:`unreadable_reason`)."""
    statement = _list_statement(status, kind, None, limit)
    return [tuple(row) for row in executor.execute(statement)]


def get_job(executor: Executor, job_id: str) -> Job | None:
    row = get_row(executor, job_id)
    return None if row is None else job_from_values(row)


def get_row(executor: Executor, job_id: str) -> tuple[Any, ...] | None:
    """One row's raw :data:`JOB_COLUMNS` values, readable or not; None if there is none."""
    row = executor.execute(select(jobs).where(jobs.c.id == job_id)).first()
    return None if row is None else tuple(row)


def count_by_status(executor: Executor, status: JobStatus | str) -> int:
    statement = select(func.count()).select_from(jobs).where(jobs.c.status == str(status))
    return int(executor.execute(statement).scalar_one())


def count_failed_unrecoverable(executor: Executor) -> int:
    statement = (
        select(func.count())
        .select_from(jobs)
        .where(jobs.c.status == FAILED)
        .where(jobs.c.failure_class == FailureClass.UNRECOVERABLE.value)
    )
    return int(executor.execute(statement).scalar_one())


def count_by_kind_and_status(executor: Executor) -> dict[tuple[str, str], int]:
    """Row counts grouped by (kind, status); a kind or status that is not text (another
    program's, on SQLite) is given by its repr."""
    statement = select(jobs.c.kind, jobs.c.status, func.count()).group_by(
        jobs.c.kind, jobs.c.status
    )
    counts: dict[tuple[str, str], int] = {}
    for kind, status, n in executor.execute(statement):
        key = (_text(kind), _text(status))
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def _text(value: object) -> str:
    return value if isinstance(value, str) else shown(value)


@cache
def _unreadable_statement(dialect_name: str) -> Select[Any]:
    problems: list[ColumnElement[bool]] = [jobs.c.status.not_in(list(_STATUSES))]
    if dialect_for(dialect_name).loosely_typed:
        # Only there can a column hold another type than it declares.
        for name, allowed in _COLUMN_TYPES.items():
            types = ["text" if allowed[0] is str else "integer"]
            if len(allowed) > 1:
                types.append("null")
            problems.append(func.typeof(jobs.c[name]).not_in(types))
    return select(func.count()).select_from(jobs).where(or_(*problems))


def count_unreadable(executor: Executor) -> int:
    """Rows no :class:`Job` can be built from: an unknown status, or (SQLite) a value of a
    type memtree never writes. Payloads are not parsed here."""
    return int(executor.execute(_unreadable_statement(dialect_of(executor).name)).scalar_one())


def ready_backlog(executor: Executor, limit: int) -> list[tuple[str, int]]:
    """The ``limit`` kinds with the most ready jobs (due or not) and how many each has, the
    deepest backlog first: where a claim that sorted its kind's ready rows would sort the
    most. It reads ready rows only, which the claim index holds."""
    count = func.count().label("ready")
    statement = (
        select(jobs.c.kind, count)
        .where(jobs.c.status == READY)
        .group_by(jobs.c.kind)
        .order_by(count.desc(), jobs.c.kind)
        .limit(limit)
    )
    return [(_text(kind), int(n)) for kind, n in executor.execute(statement)]


def count_retired(executor: Executor, retired_kinds: tuple[str, ...]) -> int:
    """Rows of ``retired_kinds``."""
    if not retired_kinds:
        return 0
    statement = select(func.count()).select_from(jobs).where(jobs.c.kind.in_(retired_kinds))
    return int(executor.execute(statement).scalar_one())


def count_total(executor: Executor) -> int:
    return int(executor.execute(select(func.count()).select_from(jobs)).scalar_one())


def purge_retired_jobs(executor: Executor, retired_kinds: tuple[str, ...]) -> int:
    """Delete rows of ``retired_kinds``; the original's one-shot cleanup at worker start."""
    if not retired_kinds:
        return 0
    return rowcount(executor.execute(delete(jobs).where(jobs.c.kind.in_(retired_kinds))))


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched."""
    return int(cast(CursorResult[Any], result).rowcount)


# -- fleet-wide limits ---------------------------------------------------------------
#
# A global gate's permits are its kinds' running rows under a live lease; a rate limit's
# are its ledger's rows in the window. Claims through a limit, and consume(), count them
# under the limit's transaction-scoped lock (PostgreSQL; a SQLite claim holds the write
# lock already), so two claims can never both take the last permit.


def database_clock_ms(executor: Executor) -> int | None:
    """The database server's clock, read now in this transaction; None where the database
    has no clock of its own (SQLite)."""
    statement = dialect_of(executor).clock_statement()
    return None if statement is None else int(executor.execute(statement).scalar_one())


def lock_limits(executor: Executor, wait: Sequence[str], attempt: Sequence[str] = ()) -> set[str]:
    """Take the locks of the limits named: waiting for each of ``wait`` (held by other
    claims only for the moment of a claim), trying each of ``attempt`` (which an
    application's transaction may hold for as long as it runs). Returns the names of
    ``attempt`` another transaction holds; their kinds must not be claimed now."""
    if not wait and not attempt:
        return set()
    dialect = dialect_of(executor)
    if dialect.limit_lock_rows(False) is not None:
        return _lock_limit_rows(executor, dialect, wait, attempt)
    statement = dialect.lock_limits(
        [lock_key(name) for name in wait], [lock_key(name) for name in attempt]
    )
    if statement is None:
        return set()
    row = executor.execute(statement).one()
    return {name for name, took in zip(attempt, row[len(wait) :], strict=True) if not took}


def _lock_limit_rows(
    executor: Executor, dialect: Dialect, wait: Sequence[str], attempt: Sequence[str]
) -> set[str]:
    """:func:`lock_limits` where a limit's lock is a row's (MySQL): its row in
    ``mem_tree_permits`` (slot -1), made here the first time any transaction needs it."""
    missing = [
        name for name in (*wait, *attempt) if (_url_of(executor), name) not in _LOCK_ROWS_MADE
    ]
    if missing:
        # A plain read first: an insert of a row that exists waits for its lock, and an
        # application's transaction may hold it for as long as it runs.
        existing = select(permits.c.gate).where(permits.c.gate.in_(missing), permits.c.slot == -1)
        absent = set(missing) - set(executor.execute(existing).scalars())
        if absent:
            executor.execute(
                dialect.insert_if_absent(permits), [{"gate": name, "slot": -1} for name in absent]
            )
        _LOCK_ROWS_MADE.update((_url_of(executor), name) for name in missing)
    waiting, trying = dialect.limit_lock_rows(False), dialect.limit_lock_rows(True)
    assert waiting is not None and trying is not None
    if wait:
        found = set(executor.execute(waiting, {"names": list(wait)}).scalars())
        if len(found) < len(set(wait)):
            # The rows are gone (the table was emptied): make them, then wait for them.
            for name in set(wait) - found:
                _LOCK_ROWS_MADE.discard((_url_of(executor), name))
            return _lock_limit_rows(executor, dialect, wait, attempt)
    if not attempt:
        return set()
    took = set(executor.execute(trying, {"names": list(attempt)}).scalars())
    if len(took) < len(set(attempt)):
        present = select(permits.c.gate).where(permits.c.gate.in_(list(attempt)))
        gone = set(attempt) - set(executor.execute(present.where(permits.c.slot == -1)).scalars())
        if gone:  # not held: gone with an emptied table; made again, tried again
            for name in gone:
                _LOCK_ROWS_MADE.discard((_url_of(executor), name))
            return _lock_limit_rows(executor, dialect, (), attempt)
    return set(attempt) - took


#: The (database, limit) whose lock rows this process has made (MySQL).
_LOCK_ROWS_MADE: set[tuple[str, str]] = set()


def gate_holders(executor: Executor, gate: Gate, now_ms: int) -> tuple[dict[str, int], int | None]:
    """Running jobs of ``gate``'s kinds under a live lease, counted per key ('' when the
    gate has none), and when the first of their leases runs out. Keys are read here, not
    in SQL: a running row another program wrote with a payload that is not JSON counts
    as key '' instead of failing every claim of the gate."""
    live = (
        jobs.c.status == RUNNING,
        jobs.c.kind.in_(gate.kinds),
        jobs.c.locked_until_ms >= now_ms,
    )
    counts: dict[str, int] = {}
    first_expiry: int | None = None
    if gate.key is None:
        count, first_expiry = executor.execute(
            select(func.count(), func.min(jobs.c.locked_until_ms)).where(*live)
        ).one()
        return ({"": int(count)} if count else {}), first_expiry
    for payload_json, expiry in executor.execute(
        select(jobs.c.payload_json, jobs.c.locked_until_ms).where(*live)
    ):
        key = key_of(_parsed(payload_json), gate.key)
        counts[key] = counts.get(key, 0) + 1
        first_expiry = int(expiry) if first_expiry is None else min(first_expiry, int(expiry))
    return counts, first_expiry


def key_of(payload: Any, field: str) -> str:
    """A payload's partition key as the database reads it: the field's JSON text, '' when
    it has none."""
    if not isinstance(payload, dict) or payload.get(field) is None:
        return ""
    value = payload[field]
    if isinstance(value, str):
        return value
    return json.dumps(value) if not isinstance(value, bool | int | float) else _scalar(value)


def _scalar(value: bool | int | float) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def rate_used(
    executor: Executor, rate: RateLimit, now_ms: int, key: str | None = None
) -> tuple[dict[str, int], int | None]:
    """The weight ``rate`` counted in the window ending now, per key (one key if given),
    and when the oldest of those starts leaves the window."""
    statement = (
        select(
            rate_events.c.partition_key,
            func.sum(rate_events.c.weight),
            func.min(rate_events.c.at_ms),
        )
        .where(rate_events.c.limit_name == rate.name)
        .where(rate_events.c.at_ms > now_ms - rate.window_ms)
        .group_by(rate_events.c.partition_key)
    )
    if key is not None:
        statement = statement.where(rate_events.c.partition_key == key)
    statement = dialect_of(executor).current_read(statement)
    used: dict[str, int] = {}
    oldest: int | None = None
    value: object
    weight: int
    first: int
    for value, weight, first in executor.execute(statement):
        used[str(value)] = int(weight)
        oldest = int(first) if oldest is None else min(oldest, int(first))
    rolls_at = None if oldest is None else oldest + rate.window_ms
    return used, rolls_at


def record_starts(
    executor: Executor, rate: RateLimit, starts: Sequence[tuple[str, int, str | None]], now_ms: int
) -> None:
    """Count ``(key, weight, job_id)`` starts against ``rate`` at ``now_ms``, and forget
    the starts that left its window (a bounded delete: the window's index finds them)."""
    if starts:
        executor.execute(
            insert(rate_events),
            [
                {
                    "limit_name": rate.name,
                    "partition_key": key,
                    "at_ms": now_ms,
                    "weight": weight,
                    "job_id": job_id,
                }
                for key, weight, job_id in starts
            ],
        )
    expired = (
        select(rate_events.c.id)
        .where(rate_events.c.limit_name == rate.name)
        .where(rate_events.c.at_ms <= now_ms - rate.window_ms)
        .limit(1000)
    )
    _delete_picked(executor, rate_events, expired)


def consume(executor: Executor, rate: RateLimit, key: str, weight: int, now_ms: int | None) -> bool:
    """Take ``weight`` from ``rate``'s budget for ``key`` in the caller's transaction, if
    the window has that much left; False (and nothing kept) if it has not. ``now_ms`` is
    a test clock's time, or None for the database's."""
    dialect = dialect_of(executor)
    if not dialect.serialised_writes:
        lock_limits(executor, [rate.name])
        at = database_clock_ms(executor) if now_ms is None else now_ms
        assert at is not None
        used, _ = rate_used(executor, rate, at, key)
        if used.get(key, 0) + weight > rate.limit:
            return False
        record_starts(executor, rate, [(key, weight, None)], at)
        return True
    # SQLite: the insert takes the file's write lock first, so the count after it sees
    # every start any other transaction can have committed.
    at = wall_clock_ms_of_host() if now_ms is None else now_ms
    row_id = executor.execute(
        insert(rate_events)
        .values(limit_name=rate.name, partition_key=key, at_ms=at, weight=weight)
        .returning(rate_events.c.id)
    ).scalar_one()
    used, _ = rate_used(executor, rate, at, key)
    if used.get(key, 0) > rate.limit:
        executor.execute(delete(rate_events).where(rate_events.c.id == row_id))
        return False
    return True


def wall_clock_ms_of_host() -> int:
    return time.time_ns() // 1_000_000


def notify(executor: Executor, kinds: Sequence[str]) -> None:
    """Wake listening workers for ``kinds`` at commit (where the database notifies)."""
    statement = dialect_of(executor).notify_kinds()
    if statement is not None:
        for kind in kinds:
            executor.execute(statement, {"kind": kind})


def count_due_ahead(executor: Executor, kind: str, available_at_ms: int) -> int:
    """Ready jobs of ``kind`` due before ``available_at_ms``: claimed before a job due
    then (through the claim index)."""
    statement = (
        select(func.count())
        .select_from(jobs)
        .where(jobs.c.status == READY)
        .where(jobs.c.kind == kind)
        .where(jobs.c.available_at_ms >= _MIN_MS)
        .where(jobs.c.available_at_ms < available_at_ms)
    )
    return int(executor.execute(statement).scalar_one())


def active_with_key(executor: Executor, dedupe_key: str) -> str | None:
    """The id of the ready or running job holding ``dedupe_key``, if one does."""
    statement = (
        select(jobs.c.id)
        .where(jobs.c.dedupe_key == dedupe_key)
        .where(jobs.c.status.in_([READY, RUNNING]))
        .limit(1)
    )
    found = executor.execute(statement).scalar()
    return None if found is None else str(found)


def completions(executor: Executor, *, since_ms: int, bucket_ms: int) -> list[tuple[int, str, int]]:
    """Jobs done and failed since ``since_ms``, counted per ``bucket_ms`` by completion
    time: ``(bucket, status, count)``, bucket 0 starting at ``since_ms``. Finished rows
    have no index by completion time: this reads the done and failed rows (the
    dashboard's chart asks seldom, and pruning bounds them)."""
    bucket = ((jobs.c.completed_at_ms - since_ms) // bucket_ms).label("bucket")
    statement = (
        select(bucket, jobs.c.status, func.count())
        .where(jobs.c.status.in_([DONE, FAILED]))
        .where(jobs.c.completed_at_ms >= since_ms)
        .where(jobs.c.completed_at_ms <= _MAX_MS)
        .group_by(bucket, jobs.c.status)
    )
    return [(int(b), str(status), int(n)) for b, status, n in executor.execute(statement)]


def list_failed(executor: Executor, limit: int) -> list[Job]:
    """The most recently failed jobs, newest first."""
    statement = (
        select(jobs)
        .where(jobs.c.status == FAILED)
        .order_by(jobs.c.completed_at_ms.desc(), jobs.c.id)
        .limit(limit)
    )
    found = []
    for row in executor.execute(statement):
        try:
            found.append(job_from_row(row))
        except CorruptJobError:
            continue  # counted by count_unreadable, shown by `memtree jobs list`
    return found


def list_running(executor: Executor, kinds: Sequence[str], now_ms: int) -> list[Job]:
    """The running jobs of ``kinds`` under a live lease, the oldest claim first."""
    statement = (
        select(jobs)
        .where(jobs.c.status == RUNNING)
        .where(jobs.c.kind.in_(list(kinds)))
        .where(jobs.c.locked_until_ms >= now_ms)
        .order_by(jobs.c.started_at_ms)
        .limit(1000)
    )
    return [job_from_row(row) for row in executor.execute(statement)]


@lru_cache(maxsize=256)
def _limited_pick(
    dialect_name: str, kinds: tuple[str, ...], limit: Limit, lock: bool
) -> tuple[Select[Any], ...]:
    """Due ready rows of ``kinds`` whose keys are not full, per kind in due order, each
    with its gate key, rate key and payload."""
    dialect = dialect_for(dialect_name)
    empty: ColumnElement[str] = literal_column("''")
    gate_key = (
        dialect.payload_field(limit.gate.key) if limit.gate and limit.gate.key else empty
    ).label("gate_key")
    rate_key = (
        dialect.payload_field(limit.rate.key) if limit.rate and limit.rate.key else empty
    ).label("rate_key")
    branches = []
    for kind in kinds:
        branch = (
            select(jobs.c.id, jobs.c.available_at_ms, gate_key, rate_key, jobs.c.payload_json)
            .where(jobs.c.status == READY)
            .where(jobs.c.kind == kind)
            .where(jobs.c.available_at_ms <= bindparam("now"))
            .where(gate_key.element.not_in(bindparam("full_gate_keys", expanding=True)))
            .where(rate_key.element.not_in(bindparam("full_rate_keys", expanding=True)))
            .order_by(jobs.c.available_at_ms)
            .limit(bindparam("scan"))
        )
        branches.append(branch.with_for_update(skip_locked=True) if lock else branch)
    if len(branches) == 1 or not dialect.returns_rows:
        # MySQL locks no rows in a UNION's branches: there each branch runs on its own.
        return tuple(branches)
    return (select(union_all(*(select(b.subquery()) for b in branches)).subquery()),)


@cache
def _claim_ids_statement() -> Update:
    return (
        update(jobs)
        .where(jobs.c.id.in_(bindparam("ids", expanding=True)))
        .where(jobs.c.status == READY)
        .values(_claim_values())
    )


@lru_cache(maxsize=256)
def _permit_claim_statement(
    dialect_name: str,
    claim_order: tuple[str, ...],
    retired_kinds: tuple[str, ...],
    kinds: tuple[str, ...],
) -> Select[Any]:
    """A global gate's claim in one statement: lock up to ``:limit`` free permits of gate
    ``:p_gate`` (``SKIP LOCKED``), claim as many due jobs, and name each claimed job and
    its claim's token as the holder of one of those permits; returns the claimed rows.
    (Parameters that name a column of an UPDATE would be taken as values to set: hence
    ``p_gate``, not ``gate``.)"""
    dialect = dialect_for(dialect_name)
    held: Select[Any] = (
        select(literal_column("1"))
        .where(jobs.c.id == permits.c.job_id)
        .where(jobs.c.status == RUNNING)
        .where(jobs.c.lease_token == permits.c.lease_token)
        .where(jobs.c.locked_until_ms >= bindparam("now"))
    )
    free = (
        select(permits.c.slot)
        .where(permits.c.gate == bindparam("p_gate"))
        .where(permits.c.slot < bindparam("p_limit"))
        .where(~held.exists())
        .order_by(permits.c.slot)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True, of=permits)
        .cte("free")
        .prefix_with("MATERIALIZED")
    )
    room = select(func.count()).select_from(free).scalar_subquery()
    picked = _picked(dialect, claim_order, retired_kinds, kinds, room)
    claimed = dialect.claim(picked, _claim_values()).returning(*jobs.c).cte("claimed")
    holders = select(
        claimed.c.id,
        claimed.c.lease_token,
        func.row_number().over(order_by=claimed.c.id).label("n"),
    ).cte("holders")
    slots = select(free.c.slot, func.row_number().over(order_by=free.c.slot).label("n")).cte(
        "slots"
    )
    assigned = (
        update(permits)
        .where(permits.c.gate == bindparam("p_gate"))
        .where(permits.c.slot == slots.c.slot)
        .where(slots.c.n == holders.c.n)
        .values(job_id=holders.c.id, lease_token=holders.c.lease_token)
        .returning(permits.c.slot)
        .cte("assigned")
    )
    return select(*claimed.c).add_cte(assigned)


def _claim_through_permits(
    executor: Executor,
    gate: Gate,
    *,
    now_ms: int,
    want: int,
    lock_duration_ms: int,
    claim_order: tuple[str, ...],
    retired_kinds: tuple[str, ...],
    kinds: tuple[str, ...],
    claimant: str | None,
) -> list[Job]:
    """Claim up to ``want`` jobs of ``kinds``, each holding a free permit of ``gate``. The
    gate's permit rows are made by the first claim of each process, and again when a claim
    finds none free and fewer rows than the limit (the table was emptied meanwhile)."""
    key = (_url_of(executor), gate.name, gate.limit)
    if key not in _PERMITS_MADE:
        _make_permits(executor, gate)
        _PERMITS_MADE.add(key)
    statement = _permit_claim_statement(
        dialect_of(executor).name, claim_order, retired_kinds, kinds
    )
    token = lease_token(claimant)
    params = {
        "p_gate": gate.name,
        "p_limit": gate.limit,
        "now": now_ms,
        "until": saturating(now_ms + lock_duration_ms),
        "token": token,
        "limit": want,
    }
    rows = executor.execute(statement, params).all()
    if not rows and _permit_count(executor, gate) < gate.limit:
        _make_permits(executor, gate)  # its rows are gone: the table was emptied meanwhile
        rows = executor.execute(statement, params).all()
    return _claimed(executor, rows, token=token, now_ms=now_ms, claim_order=claim_order)


def uses_permit_rows(executor: Executor, gate: Gate) -> bool:
    """Whether ``gate``'s permits are rows of ``mem_tree_permits`` (an unkeyed global gate
    where claims lock rows): claims then take free permits with ``SKIP LOCKED`` and never
    wait on each other. Elsewhere a claim counts the holders under the gate's lock."""
    return gate.key is None and dialect_of(executor).permit_rows


#: The (database, gate, limit) whose permit rows this process has made.
_PERMITS_MADE: set[tuple[str, str, int]] = set()
#: How long a claim that found a permit-row gate full may wait before looking again,
#: if nothing announces a freed permit sooner (workers cap it at their poll interval).
_LEASE_POLL_MS = 60_000


def _permit_count(executor: Executor, gate: Gate) -> int:
    statement = (
        select(func.count())
        .select_from(permits)
        .where(permits.c.gate == gate.name)
        .where(permits.c.slot < gate.limit)
    )
    return int(executor.execute(statement).scalar_one())


def _url_of(executor: Executor) -> str:
    if isinstance(executor, Session):
        return str(executor.get_bind(MemTreeJob).engine.url)
    return str(executor.engine.url)


def _make_permits(executor: Executor, gate: Gate) -> None:
    executor.execute(
        dialect_of(executor).insert_if_absent(permits),
        [{"gate": gate.name, "slot": slot} for slot in range(gate.limit)],
    )


def claim_limited(
    executor: Executor,
    limit: Limit,
    *,
    now_ms: int,
    want: int,
    lock_duration_ms: int,
    claim_order: tuple[str, ...],
    retired_kinds: tuple[str, ...] = (),
    kinds: tuple[str, ...],
    claimant: str | None = None,
) -> tuple[list[Job], int | None]:
    """Claim up to ``want`` jobs of ``kinds`` within ``limit``, whose locks the caller
    holds (:func:`lock_limits`): the jobs, and, when the limit left some due job
    unclaimed, the time (epoch ms) a permit frees at the latest or the window rolls."""
    kinds = tuple(sorted({k for k in kinds if k not in retired_kinds}))
    if not kinds or want < 1:
        return [], None
    gate, rate = limit.gate, limit.rate
    rows = gate is not None and uses_permit_rows(executor, gate)
    held, expiry = gate_holders(executor, gate, now_ms) if gate and not rows else ({}, None)
    used, rolls_at = rate_used(executor, rate, now_ms) if rate else ({}, None)
    blocked = min((t for t in (expiry, rolls_at) if t is not None), default=None)
    if not limit.partitioned:
        room = want
        if gate is not None and not rows:
            room = min(room, gate.limit - held.get("", 0))
        if rate is not None:
            room = min(room, rate.limit - used.get("", 0))
        if room <= 0:
            return [], blocked
        if rows:
            assert gate is not None
            claimed = _claim_through_permits(
                executor,
                gate,
                now_ms=now_ms,
                want=room,
                lock_duration_ms=lock_duration_ms,
                claim_order=claim_order,
                retired_kinds=retired_kinds,
                kinds=kinds,
                claimant=claimant,
            )
            if len(claimed) < room:
                # The permits (or the due jobs) ran out. A freed permit and a new job are
                # announced; the poll interval covers a holder that died.
                blocked = rolls_at or now_ms + _LEASE_POLL_MS
            held_back = len(claimed) < want
        else:
            claimed = claim(
                executor,
                now_ms=now_ms,
                limit=room,
                lock_duration_ms=lock_duration_ms,
                claim_order=claim_order,
                retired_kinds=retired_kinds,
                kinds=kinds,
                claimant=claimant,
            )
            held_back = len(claimed) == room < want
        if rate is not None:
            record_starts(executor, rate, [("", 1, job.id) for job in claimed], now_ms)
        return claimed, blocked if held_back else None
    return _claim_partitioned(
        executor,
        limit,
        held,
        used,
        blocked,
        now_ms=now_ms,
        want=want,
        lock_duration_ms=lock_duration_ms,
        claim_order=claim_order,
        kinds=kinds,
        claimant=claimant,
    )


def _claim_partitioned(
    executor: Executor,
    limit: Limit,
    held: dict[str, int],
    used: dict[str, int],
    blocked: int | None,
    *,
    now_ms: int,
    want: int,
    lock_duration_ms: int,
    claim_order: tuple[str, ...],
    kinds: tuple[str, ...],
    claimant: str | None,
) -> tuple[list[Job], int | None]:
    gate, rate = limit.gate, limit.rate
    gate_room = {k: gate.limit - n for k, n in held.items()} if gate else {}
    rate_room = {k: rate.limit - n for k, n in used.items()} if rate else {}
    dialect = dialect_of(executor)
    pick = _limited_pick(dialect.name, kinds, limit, dialect.skip_locked)
    params = {
        "now": now_ms,
        "scan": want * 4 + 16,
        "full_gate_keys": [k for k, room in gate_room.items() if room <= 0],
        "full_rate_keys": [k for k, room in rate_room.items() if room <= 0],
    }
    try:
        with executor.begin_nested() if dialect.skip_locked else nullcontext():
            candidates = [row for branch in pick for row in executor.execute(branch, params)]
    except sa_exc.DataError:
        # PostgreSQL could not read some ready row's payload as JSON: fail those rows as
        # unreadable (nothing can ever key them) and leave the claim to the next round.
        _fail_unparseable(executor, kinds, now_ms)
        return [], now_ms
    candidates.sort(key=lambda row: row[1])
    chosen: list[tuple[str, str, int]] = []
    for job_id, _, gate_key, rate_key, payload_json in candidates:
        if len(chosen) == want:
            break
        weight = 1
        if rate is not None and rate.weight:
            weight = rate.weight_of(_parsed(payload_json))
        if gate is not None and gate_room.get(gate_key, gate.limit) < 1:
            continue
        if rate is not None and rate_room.get(rate_key, rate.limit) < weight:
            continue
        if gate is not None:
            gate_room[gate_key] = gate_room.get(gate_key, gate.limit) - 1
        if rate is not None:
            rate_room[rate_key] = rate_room.get(rate_key, rate.limit) - weight
        chosen.append((job_id, rate_key, weight))
    # The limit held jobs back if a full key was left out, or a candidate did not fit.
    held_back = len(chosen) < want and bool(
        params["full_gate_keys"] or params["full_rate_keys"] or len(candidates) > len(chosen)
    )
    if not chosen:
        return [], blocked if held_back else None
    token = lease_token(claimant)
    rows = _claim_ids(
        executor,
        [job_id for job_id, _, _ in chosen],
        {"now": now_ms, "until": saturating(now_ms + lock_duration_ms), "token": token},
    )
    claimed = _claimed(executor, rows, token=token, now_ms=now_ms, claim_order=claim_order)
    if rate is not None:
        taken = {job.id for job in claimed}
        record_starts(executor, rate, [(k, w, i) for i, k, w in chosen if i in taken], now_ms)
    return claimed, blocked if held_back else None


def _parsed(payload_json: str) -> Any:
    try:
        return json.loads(payload_json)
    except ValueError:
        return None


def _fail_unparseable(executor: Executor, kinds: tuple[str, ...], now_ms: int) -> None:
    rows = executor.execute(
        select(jobs.c.id, jobs.c.payload_json)
        .where(jobs.c.status == READY)
        .where(jobs.c.kind.in_(kinds))
    ).all()
    bad = [job_id for job_id, payload in rows if _parsed(payload) is None and payload != "null"]
    if not bad:
        return
    log.warning("memtree failed %d ready rows whose payload is not JSON", len(bad))
    executor.execute(
        update(jobs)
        .where(jobs.c.id.in_(bad))
        .where(jobs.c.status == READY)
        .values(
            status=FAILED,
            completed_at_ms=now_ms,
            last_error="payload is not JSON: a keyed limit cannot read it",
            failure_reason=UNREADABLE_ROW,
            failure_class=FailureClass.UNRECOVERABLE.value,
        )
    )


# -- schedules ---------------------------------------------------------------------------

#: One row of ``mem_tree_schedules``: ``(name, last_slot_ms, updated_at_ms)``.
ScheduleRow: TypeAlias = tuple[str, int, int]


@cache
def _schedule_insert_statement(dialect_name: str) -> Any:
    return (
        dialect_for(dialect_name)
        .insert_if_absent(schedules)
        .values(
            name=bindparam("s_name"),
            last_slot_ms=bindparam("before"),
            updated_at_ms=bindparam("now"),
        )
    )


@cache
def _schedule_advance_statement() -> Update:
    return (
        update(schedules)
        .where(schedules.c.name == bindparam("s_name"))
        .where(schedules.c.last_slot_ms < bindparam("slot"))
        .values(last_slot_ms=bindparam("slot"), updated_at_ms=bindparam("now"))
    )


def advance_schedule(executor: Executor, name: str, *, slot_ms: int, now_ms: int) -> bool:
    """Record ``slot_ms`` as schedule ``name``'s last slot if it is later than the one
    recorded; True when this call moved it, so its caller alone enqueues the slot.

    The row is inserted first if absent (recording the moment before ``slot_ms``, which
    the update below replaces in the same transaction), then moved by a compare-and-set
    fenced to an earlier slot: of two transactions ticking the same slot, the second's
    update waits for the first's row lock (PostgreSQL) or its write lock (SQLite) and then
    matches nothing.
    """
    dialect = dialect_of(executor)
    params = {"s_name": name, "before": slot_ms - 1, "slot": slot_ms, "now": now_ms}
    executor.execute(_schedule_insert_statement(dialect.name), params)
    return rowcount(executor.execute(_schedule_advance_statement(), params)) == 1


def list_schedules(executor: Executor) -> list[ScheduleRow]:
    """Every schedule's row, by name."""
    statement = select(
        schedules.c.name, schedules.c.last_slot_ms, schedules.c.updated_at_ms
    ).order_by(schedules.c.name)
    return [
        (str(name), int(last), int(updated)) for name, last, updated in executor.execute(statement)
    ]


# -- workers ------------------------------------------------------------------------------

#: How often a running worker touches its row of ``mem_tree_workers``.
WORKER_BEAT_MS = 10_000
#: A worker not seen for this long is taken for gone (stopped without a word, killed, or
#: cut off from the database): three beats missed.
WORKER_GONE_MS = 3 * WORKER_BEAT_MS
#: A gone worker's row is kept this long (so ``memtree explain`` can name it), then deleted.
WORKER_FORGET_MS = 24 * 60 * 60 * 1000


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One row of ``mem_tree_workers``: a worker process and what it handles."""

    id: str
    name: str
    kinds: tuple[str, ...]
    concurrency: int
    version: str
    started_at_ms: int
    seen_at_ms: int

    def alive(self, now_ms: int) -> bool:
        """Whether it was seen within :data:`WORKER_GONE_MS` of ``now_ms``."""
        return now_ms - self.seen_at_ms <= WORKER_GONE_MS


def beat_worker(executor: Executor, worker: WorkerRow, *, now_ms: int) -> None:
    """Record that ``worker`` runs at ``now_ms``: touch its row, or write it if it is not
    there (its first beat, or a row a peer forgot while this worker was cut off); and
    forget the workers gone for :data:`WORKER_FORGET_MS`."""
    touched = executor.execute(
        update(workers).where(workers.c.id == worker.id).values(seen_at_ms=now_ms)
    )
    if rowcount(touched) == 0:
        executor.execute(
            insert(workers).values(
                id=worker.id,
                name=worker.name,
                kinds=json.dumps(sorted(worker.kinds)),
                concurrency=worker.concurrency,
                version=worker.version,
                started_at_ms=worker.started_at_ms,
                seen_at_ms=now_ms,
            )
        )
    executor.execute(delete(workers).where(workers.c.seen_at_ms < now_ms - WORKER_FORGET_MS))


def forget_worker(executor: Executor, worker_id: str) -> None:
    """Delete a stopping worker's row."""
    executor.execute(delete(workers).where(workers.c.id == worker_id))


def list_workers(executor: Executor) -> list[WorkerRow]:
    """Every worker's row, the most recently seen first. A row whose kinds another program
    wrote as anything but a JSON list of strings lists no kinds."""
    statement = select(
        workers.c.id,
        workers.c.name,
        workers.c.kinds,
        workers.c.concurrency,
        workers.c.version,
        workers.c.started_at_ms,
        workers.c.seen_at_ms,
    ).order_by(workers.c.seen_at_ms.desc(), workers.c.id)
    found = []
    for worker_id, name, kinds, concurrency, version, started, seen in executor.execute(statement):
        try:
            parsed = json.loads(kinds)
        except (TypeError, ValueError):
            parsed = []
        if not isinstance(parsed, list) or not all(isinstance(k, str) for k in parsed):
            parsed = []
        found.append(
            WorkerRow(
                str(worker_id),
                str(name),
                tuple(parsed),
                int(concurrency),
                str(version),
                int(started),
                int(seen),
            )
        )
    return found
