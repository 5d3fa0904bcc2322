"""Enqueue, claim and read: every statement that puts jobs in or takes them out.

Callers are :class:`memtree.Queue` (in a transaction of its own) and the free
functions in :mod:`memtree.queue` (in the caller's transaction); each function here
runs on whatever ``Connection`` or ``Session`` it is given and never commits.
Settlement, every state change after a claim, lives in :mod:`memtree.settle`.

- The dedupe key is enforced by the partial unique index over ``ready``/``running``
  rows: an insert whose key is active does nothing and reports ``None``.
- A claim is one UPDATE … RETURNING over the rows a pick selects. The pick walks
  ready rows kind by kind through the claim index, so it reads at most ``limit`` rows
  per kind it may claim instead of sorting the whole backlog. On PostgreSQL the pick
  locks with ``FOR UPDATE SKIP LOCKED``, so concurrent workers never wait on each
  other nor take the same row.
- Every claim writes a fresh ``lease_token``; settles are fenced to it.
- A row another program wrote may hold what memtree never writes (SQLite types loosely:
  text in an integer column, a BLOB payload). Such a row is that row's problem only: due
  times are read from integers alone, a claimed row that cannot be read as a :class:`Job`
  is failed (``unreadable_row``, unrecoverable) in the claim's own transaction while the
  rest of the claim is returned, and the raw reads below let the CLI show what it can.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from sqlalchemy import (
    BigInteger,
    Connection,
    Row,
    Select,
    Update,
    bindparam,
    case,
    delete,
    func,
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
from memtree.models import MemTreeJob, jobs, schedules
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
    "Executor",
    "ScheduleRow",
    "advance_schedule",
    "cancel_requested",
    "claim",
    "count_by_kind_and_status",
    "count_by_status",
    "count_failed_unrecoverable",
    "count_retired",
    "count_total",
    "count_unreadable",
    "dialect_of",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "get_job",
    "get_row",
    "job_from_row",
    "list_jobs",
    "list_rows",
    "list_schedules",
    "new_job_id",
    "next_due_ms",
    "prune",
    "purge_retired_jobs",
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
        inserted.update(executor.execute(statement, dialect.batch_params(chunk)).scalars())
    return [row["id"] if row["id"] in inserted else None for row in params]


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
    lock = dialect.skip_locked
    rest = len(claim_order)
    branches: list[Select[Any]] = []
    if kinds is None:
        for priority, kind in enumerate(claim_order):
            branches.append(_branch(jobs.c.kind == kind, priority, lock))
        excluded = (*claim_order, *retired_kinds)
        others = jobs.c.kind.not_in(excluded) if excluded else true()
        branches.append(_branch(others, rest, lock))
    else:
        # One branch per kind, so each walks the claim index in due order.
        for priority, kind in enumerate(claim_order):
            if kind in kinds:
                branches.append(_branch(jobs.c.kind == kind, priority, lock))
        for kind in kinds:
            if kind not in claim_order:
                branches.append(_branch(jobs.c.kind == kind, rest, lock))
    if len(branches) == 1:
        picked: Select[Any] = select(branches[0].subquery().c.id)
    else:
        merged = union_all(*(select(b.subquery()) for b in branches)).subquery()
        picked = (
            select(merged.c.id)
            .order_by(merged.c.priority, merged.c.available_at_ms)
            .limit(bindparam("limit"))
        )
    values: dict[str, ColumnElement[Any]] = {
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
    return dialect.claim(picked, values).returning(*jobs.c)


def claim(
    executor: Executor,
    *,
    now_ms: int,
    limit: int,
    lock_duration_ms: int,
    claim_order: tuple[str, ...],
    retired_kinds: tuple[str, ...] = (),
    kinds: tuple[str, ...] | None = None,
) -> list[Job]:
    """Lease up to ``limit`` due jobs, in claim order then due time.

    ``kinds`` restricts the claim to those kinds; ``retired_kinds`` are never claimed.
    """
    if kinds is not None:
        kinds = tuple(sorted({k for k in kinds if k not in retired_kinds}))
        if not kinds:
            return []
    if limit < 1:
        return []
    statement = _claim_statement(dialect_of(executor).name, claim_order, retired_kinds, kinds)
    token = uuid.uuid4().hex
    params = {
        "now": now_ms,
        "until": saturating(now_ms + lock_duration_ms),
        "token": token,
        "limit": limit,
    }
    claimed: list[Job] = []
    unreadable: list[tuple[Any, CorruptJobError]] = []
    for row in executor.execute(statement, params).all():
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
        .scalar_subquery()
    )
    return rowcount(executor.execute(delete(jobs).where(jobs.c.id.in_(doomed))))


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
