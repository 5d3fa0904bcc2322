"""Every state change after a claim: settle, recover, release, requeue.

Each settle, single or batched, is *guarded*: its WHERE clause names the row,
``status = 'running'`` and the exact claim the :class:`Job` came from (its
``lease_token``, ``attempts`` and ``started_at_ms``), and it reports whether it matched.
A worker whose lease was recovered, re-claimed, or deferred and re-claimed (even within
one millisecond) therefore changes nothing and gets ``False``. The token alone would not
do: the original crate, sharing the table, neither writes nor clears it, so a row it
recovered and claimed again still carries memtree's stale token; its claim moves
``attempts`` and ``started_at_ms``. Jobs claimed by the crate carry no token; they are
fenced by ``attempts`` and ``started_at_ms`` as it did.

The batched settles (:func:`mark_done_many`, :func:`extend_leases`, a held
:func:`release_running_locks`) run on the worker's loop thread, so on PostgreSQL they
skip a row another session holds locked instead of waiting for it, and say so.

Like :mod:`memtree.store`, these functions run on the caller's ``Connection`` or
``Session`` and never commit. See ``docs/states.md`` for the diagram.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Executable,
    Select,
    Update,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.elements import ColumnClause

from memtree import store
from memtree.dialects import Claim, dialect_for
from memtree.models import jobs
from memtree.store import FAILED, READY, RUNNING, Executor
from memtree.types import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_DEFER_AGE_MS,
    DEFAULT_SELF_HEAL_LIMIT,
    RETRY_BASE_MS,
    RETRY_CAP_MS,
    CancelOutcome,
    Job,
    JobFailure,
    NewJob,
    SettledBatch,
    backoff_ms,
    check_ms,
    find_failure,
)

__all__ = [
    "cancel",
    "error_text",
    "extend_lease",
    "extend_leases",
    "mark_cancelled",
    "mark_deferred",
    "mark_done",
    "mark_done_many",
    "mark_failed",
    "mark_released",
    "recover_stale_locks",
    "release_running_locks",
    "requeue_failed",
    "requeue_job",
    "requeue_transient_failed",
    "storable_text",
]

NULL: ColumnClause[Any] = literal_column("NULL")
DONE: ColumnClause[str] = literal_column("'done'")
CANCELLED: ColumnClause[str] = literal_column("'cancelled'")
UNRECOVERABLE: ColumnClause[str] = literal_column("'unrecoverable'")
TRANSIENT: ColumnClause[str] = literal_column("'transient'")


# Attempts at a requeue that lost a race for a dedupe key on PostgreSQL; each retry
# sees the winner and leaves that key alone, so a second attempt already succeeds.
_REQUEUE_RETRIES = 5


def _fenced(values: dict[str, Any], *, cancel_requested: bool | None = False) -> Update:
    """An UPDATE of the one row still running under the claim in the ``f_*`` parameters.

    Settles also require that nobody asked the job to stop (``cancel_requested=False``):
    once a cancel is requested, only :func:`mark_cancelled` ends the run. The heartbeat
    (``None``) does not care.
    """
    statement = (
        update(jobs)
        .where(jobs.c.id == bindparam("f_id"))
        .where(jobs.c.status == RUNNING)
        .where(jobs.c.lease_token.is_not_distinct_from(bindparam("f_token")))
        .where(jobs.c.attempts == bindparam("f_attempts"))
        .where(jobs.c.started_at_ms.is_not_distinct_from(bindparam("f_started")))
        .values(values)
    )
    if cancel_requested is False:
        statement = statement.where(jobs.c.cancel_requested_at_ms.is_(None))
    elif cancel_requested:
        statement = statement.where(jobs.c.cancel_requested_at_ms.is_not(None))
    return statement


def _fence_params(job: Job) -> dict[str, Any]:
    return {
        "f_id": job.id,
        "f_token": job.lease_token,
        "f_attempts": job.attempts,
        "f_started": job.started_at_ms,
    }


@cache
def _statements() -> dict[str, Update]:
    aged_out = jobs.c.created_at_ms <= bindparam("oldest")
    exhausted = jobs.c.attempts >= jobs.c.max_attempts
    cancelling = jobs.c.cancel_requested_at_ms.is_not(None)
    return {
        "done": _fenced(
            {
                "status": DONE,
                "completed_at_ms": bindparam("now"),
                "locked_until_ms": NULL,
                "last_error": NULL,
            }
        ),
        "failed": _fenced(
            {
                "status": FAILED,
                "completed_at_ms": bindparam("now"),
                "locked_until_ms": NULL,
                "last_error": bindparam("error"),
                "failure_reason": bindparam("reason"),
                "failure_class": bindparam("class"),
            }
        ),
        "retry": _fenced(
            {
                "status": READY,
                "available_at_ms": bindparam("next_at"),
                "locked_until_ms": NULL,
                "last_error": bindparam("error"),
                "failure_reason": NULL,
                "failure_class": NULL,
                "lease_token": NULL,
            }
        ),
        "deferred": _fenced(
            {
                "status": case((aged_out, FAILED), else_=READY),
                "attempts": bindparam("pre_claim_attempts"),
                "available_at_ms": bindparam("until"),
                "locked_until_ms": NULL,
                "started_at_ms": NULL,
                "completed_at_ms": case((aged_out, bindparam("now")), else_=NULL),
                "last_error": bindparam("reason"),
                "failure_reason": case(
                    (aged_out, literal_column("'defer_age_exceeded'")), else_=NULL
                ),
                "failure_class": case((aged_out, UNRECOVERABLE), else_=NULL),
                "lease_token": NULL,
            }
        ),
        "released": _fenced(
            {
                "status": READY,
                "attempts": bindparam("pre_claim_attempts"),
                "available_at_ms": bindparam("until"),
                "locked_until_ms": NULL,
                "started_at_ms": NULL,
                "last_error": bindparam("reason"),
                "failure_reason": NULL,
                "failure_class": NULL,
                "lease_token": NULL,
            }
        ),
        "extend": _fenced({"locked_until_ms": bindparam("until")}, cancel_requested=None),
        "cancelled": _fenced(
            {
                "status": CANCELLED,
                "completed_at_ms": bindparam("now"),
                "locked_until_ms": NULL,
            },
            cancel_requested=True,
        ),
        "recover": update(jobs)
        .where(jobs.c.status == RUNNING)
        .where(jobs.c.locked_until_ms.is_not(None))
        .where(jobs.c.locked_until_ms < bindparam("now"))
        .values(
            # A job asked to stop whose worker died ends cancelled, not retried.
            status=case((cancelling, CANCELLED), (exhausted, FAILED), else_=READY),
            last_error=func.coalesce(
                jobs.c.last_error,
                case(
                    (cancelling, literal_column("'cancelled'")),
                    (exhausted, literal_column("'stale_lock_exhausted'")),
                    else_=literal_column("'recovered_from_stale_lock'"),
                ),
            ),
            completed_at_ms=case((cancelling | exhausted, bindparam("now")), else_=NULL),
            failure_reason=case(
                (cancelling, NULL),
                (exhausted, literal_column("'stale_lock_exhausted'")),
                else_=NULL,
            ),
            failure_class=case((cancelling, NULL), (exhausted, TRANSIENT), else_=NULL),
            locked_until_ms=NULL,
            lease_token=NULL,
        ),
    }


def _settled(executor: Executor, name: str, job: Job, params: dict[str, Any]) -> bool:
    result = executor.execute(_statements()[name], {**_fence_params(job), **params})
    return store.rowcount(result) == 1


def storable_text(text: str) -> str:
    """``text`` as every database can store it: lone surrogates backslash-escaped, NUL as
    ``\\x00`` (PostgreSQL text cannot hold it). Anything else is kept exactly."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def error_text(error: object) -> str:
    """The full text stored in ``last_error``: the message, or every link of an exception
    chain, made storable (see :func:`storable_text`)."""
    if not isinstance(error, BaseException):
        return storable_text(str(error))
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = str(current)
        parts.append(f"{type(current).__name__}: {message}" if message else type(current).__name__)
        current = current.__cause__ if current.__cause__ is not None else current.__context__
    return storable_text("; caused by ".join(parts))


def mark_done(
    executor: Executor,
    job: Job,
    followups: Sequence[NewJob] = (),
    *,
    now_ms: int,
    default_max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> bool:
    """Settle ``done`` and enqueue ``followups``, only if the caller still holds the lease."""
    if not _settled(executor, "done", job, {"now": now_ms}):
        return False
    if followups:
        store.enqueue_many(
            executor, list(followups), now_ms=now_ms, default_max_attempts=default_max_attempts
        )
    return True


def mark_cancelled(executor: Executor, job: Job, *, now_ms: int) -> bool:
    """End a run that was asked to stop as ``cancelled``; False if the lease was lost."""
    return _settled(executor, "cancelled", job, {"now": now_ms})


def cancel(executor: Executor, job_id: str, *, now_ms: int) -> CancelOutcome | None:
    """Cancel a job: a ``ready`` one at once (its dedupe key is free again), a ``running``
    one by asking its worker to stop. None when there is no such job."""
    cancelled = executor.execute(
        update(jobs)
        .where(jobs.c.id == job_id)
        .where(jobs.c.status == READY)
        .values(status=CANCELLED, completed_at_ms=now_ms, locked_until_ms=NULL, lease_token=NULL)
    )
    if store.rowcount(cancelled) == 1:
        return CancelOutcome.CANCELLED
    requested = executor.execute(
        update(jobs)
        .where(jobs.c.id == job_id)
        .where(jobs.c.status == RUNNING)
        .values(cancel_requested_at_ms=func.coalesce(jobs.c.cancel_requested_at_ms, now_ms))
    )
    if store.rowcount(requested) == 1:
        return CancelOutcome.REQUESTED
    found = executor.execute(select(jobs.c.id).where(jobs.c.id == job_id)).first()
    return None if found is None else CancelOutcome.FINISHED


_CANCELLING = jobs.c.cancel_requested_at_ms.is_not(None)
#: A released run: ``ready`` again with its attempt given back, or ``cancelled`` at
#: ``:now`` if someone asked it to stop meanwhile.
_RELEASED: dict[str, Any] = {
    "status": case((_CANCELLING, CANCELLED), else_=READY),
    "attempts": case((jobs.c.attempts > 0, jobs.c.attempts - 1), else_=0),
    "locked_until_ms": NULL,
    "started_at_ms": NULL,
    "completed_at_ms": case((_CANCELLING, bindparam("now")), else_=NULL),
    "lease_token": NULL,
}


def _claims(held: Sequence[Job]) -> list[Claim]:
    return [
        (job.id, job.lease_token, job.attempts, job.started_at_ms)
        for job in held
        if job.lease_token is not None
    ]


_NOT_CANCELLING = jobs.c.cancel_requested_at_ms.is_(None)


@cache
def _held_statements(dialect_name: str) -> dict[str, Executable]:
    """The batched settles, each row fenced to its own claim, built once per database
    (see :meth:`Dialect.update_held`)."""
    dialect = dialect_for(dialect_name)
    return {
        "done": dialect.update_held(_DONE, also=_NOT_CANCELLING),
        "extend": dialect.update_held(_EXTENDED),
        "release": dialect.update_held(_RELEASED),
    }


#: What a batched settle writes, per settle.
_DONE: dict[str, Any] = {
    "status": DONE,
    "completed_at_ms": bindparam("now"),
    "locked_until_ms": NULL,
    "last_error": NULL,
}
_EXTENDED: dict[str, Any] = {"locked_until_ms": bindparam("until")}


@cache
def _locked_statements(dialect_name: str) -> dict[str, Executable | None]:
    """Where an UPDATE cannot return rows (MySQL): per batched settle, the UPDATE of the
    rows its locking read returned (see :meth:`Dialect.update_locked`)."""
    dialect = dialect_for(dialect_name)
    return {
        "done": dialect.update_locked(_DONE),
        "extend": dialect.update_locked(_EXTENDED),
        "release": dialect.update_locked(_RELEASED),
    }


@cache
def _skipped_statements(dialect_name: str) -> dict[str, Executable | None]:
    """Per batched settle, the read of the claims it skipped for a row lock."""
    dialect = dialect_for(dialect_name)
    return {
        "done": dialect.skipped_for_a_lock(also=_NOT_CANCELLING),
        "extend": dialect.skipped_for_a_lock(),
        "release": dialect.skipped_for_a_lock(),
    }


def _run_held(
    executor: Executor, which: str, held: Sequence[Job], params: dict[str, Any]
) -> tuple[set[tuple[str, str]], set[str]]:
    """Run a batched settle over the claims of ``held`` that carry a token: the
    ``(id, lease_token)`` of each row it changed, and the ids of the rows it skipped
    because another session holds them locked (PostgreSQL; SQLite has no row locks)."""
    claims = _claims(held)
    if not claims:
        return set(), set()
    dialect = store.dialect_of(executor)
    statement = _held_statements(dialect.name)[which]
    result = executor.execute(statement, {**params, **dialect.claims_params(claims)})
    changed: set[tuple[str, str]] = {(job_id, token) for job_id, token in result.all()}
    then_update = _locked_statements(dialect.name)[which]
    if then_update is not None and changed:
        # The statement only locked them (MySQL): now write them.
        executor.execute(then_update, {**params, "locked_ids": [i for i, _ in changed]})
    locked: set[str] = set()
    skipped_for_a_lock = _skipped_statements(dialect.name)[which]
    if skipped_for_a_lock is not None and len(changed) < len(claims):
        # Only then: a second statement to tell the claims skipped for a lock from the
        # lost ones (and, for done, the ones asked to stop), so the common batch pays one.
        left_out = [claim for claim in claims if (claim[0], claim[1]) not in changed]
        found = executor.execute(skipped_for_a_lock, dialect.claims_params(left_out))
        locked.update(found.scalars())
    return changed, locked


def mark_done_many(
    executor: Executor,
    done: Sequence[tuple[Job, Sequence[NewJob]]],
    *,
    now_ms: int,
    default_max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> SettledBatch:
    """Settle many claims ``done`` in one statement, each fenced to its own claim, and
    enqueue the follow-ups of those that matched.

    This is the worker's batched completer: jobs whose handlers wrote nothing through
    the settlement session share one transaction instead of paying for one each. A row
    another session holds locked is not waited for: it is reported ``locked``, to be
    settled again.
    """
    matched: set[tuple[str, str | None]] = set()
    changed, locked = _run_held(executor, "done", [job for job, _ in done], {"now": now_ms})
    matched.update(changed)
    # Jobs the original crate claimed carry no token: fence them one by one.
    for job, _ in done:
        if job.lease_token is None and mark_done(executor, job, (), now_ms=now_ms):
            matched.add((job.id, None))
    # Only the claims that settled bring their follow-ups, not a stale claim of the same job.
    followups = [new for job, news in done if (job.id, job.lease_token) in matched for new in news]
    if followups:
        store.enqueue_many(
            executor, followups, now_ms=now_ms, default_max_attempts=default_max_attempts
        )
    return SettledBatch(frozenset(job_id for job_id, _ in matched), frozenset(locked))


def extend_leases(
    executor: Executor, held: Sequence[Job], *, now_ms: int, lock_duration_ms: int
) -> set[str]:
    """Heartbeat many claims in one statement; returns the ids whose lease is still held.

    A row another session holds locked is not waited for: its lease is not extended this
    time, but it is still held, so it is among the ids returned.
    """
    until = store.saturating(now_ms + lock_duration_ms)
    changed, locked = _run_held(executor, "extend", held, {"until": until})
    kept = {job_id for job_id, _ in changed} | locked
    for job in held:
        if job.lease_token is None and extend_lease(
            executor, job, now_ms=now_ms, lock_duration_ms=lock_duration_ms
        ):
            kept.add(job.id)
    return kept


def mark_failed(
    executor: Executor,
    job: Job,
    error: object,
    failure: JobFailure | BaseException | None = None,
    *,
    now_ms: int,
    retry_base_ms: int = RETRY_BASE_MS,
    retry_cap_ms: int = RETRY_CAP_MS,
) -> bool:
    """Retry with backoff, or fail for good when attempts are spent or the failure is unrecoverable.

    The failure class comes from ``failure``, else from ``error``, else from anywhere in
    either's cause/context chain. ``last_error`` keeps the full text.
    """
    typed = find_failure(failure) or find_failure(error)
    text = error_text(error)
    if job.attempts >= job.max_attempts or (typed is not None and typed.is_unrecoverable):
        return _settled(
            executor,
            "failed",
            job,
            {
                "now": now_ms,
                "error": text,
                "reason": storable_text(typed.code) if typed else None,
                "class": typed.failure_class.value if typed else None,
            },
        )
    delay = backoff_ms(job.attempts, base_ms=retry_base_ms, cap_ms=retry_cap_ms)
    return _settled(
        executor, "retry", job, {"next_at": store.saturating(now_ms + delay), "error": text}
    )


def mark_deferred(
    executor: Executor,
    job: Job,
    until_ms: int,
    reason: str,
    *,
    now_ms: int,
    max_defer_age_ms: int = DEFAULT_MAX_DEFER_AGE_MS,
) -> bool:
    """Back to ``ready`` at ``until_ms`` without spending the attempt; a job older than the
    defer-age cap fails ``unrecoverable`` with reason ``defer_age_exceeded`` instead."""
    params = {
        "now": now_ms,
        "oldest": store.saturating(now_ms - max_defer_age_ms),
        "pre_claim_attempts": max(job.attempts - 1, 0),
        "until": check_ms("until_ms", until_ms),
        "reason": storable_text(str(reason)),
    }
    return _settled(executor, "deferred", job, params)


def mark_released(executor: Executor, job: Job, until_ms: int, reason: object) -> bool:
    """Back to ``ready`` at ``until_ms`` with the claim's attempt given back, because the
    run failed for a reason that is not the job's (the database was unreachable). Unlike
    :func:`mark_deferred` there is no age cap: an outage does not make a job too old.
    ``last_error`` keeps the reason's full text."""
    params = {
        "pre_claim_attempts": max(job.attempts - 1, 0),
        "until": check_ms("until_ms", until_ms),
        "reason": error_text(reason),
    }
    return _settled(executor, "released", job, params)


def extend_lease(executor: Executor, job: Job, *, now_ms: int, lock_duration_ms: int) -> bool:
    """Push the lease of a running job forward (a heartbeat); False when it was lost."""
    until = store.saturating(now_ms + lock_duration_ms)
    return _settled(executor, "extend", job, {"until": until})


@cache
def _recover_statement(dialect_name: str) -> Update:
    if not dialect_for(dialect_name).returns_rows:
        # MySQL cannot update a table a subquery of the same statement reads: the expired
        # rows are locked first (_expired_statement), then updated by id.
        return _statements()["recover"].where(jobs.c.id.in_(bindparam("ids", expanding=True)))
    return _statements()["recover"].where(
        jobs.c.id.in_(_expired_statement(dialect_name).scalar_subquery())
    )


@cache
def _expired_statement(dialect_name: str) -> Select[tuple[str]]:
    expired = (
        select(jobs.c.id)
        .where(jobs.c.status == RUNNING)
        .where(jobs.c.locked_until_ms.is_not(None))
        .where(jobs.c.locked_until_ms < bindparam("now"))
    )
    if dialect_for(dialect_name).skip_locked:
        # A row another transaction holds (a frozen worker mid-commit) is skipped, not
        # waited for: recovery runs on the worker's only loop thread.
        expired = expired.with_for_update(skip_locked=True)
    return expired


def recover_stale_locks(executor: Executor, *, now_ms: int) -> int:
    """Return expired leases to ``ready``; a row with no attempts left fails
    ``stale_lock_exhausted`` (transient) instead of looping forever."""
    dialect = store.dialect_of(executor)
    statement = _recover_statement(dialect.name)
    params: dict[str, Any] = {"now": now_ms}
    if not dialect.returns_rows:
        params["ids"] = list(executor.execute(_expired_statement(dialect.name), params).scalars())
        if not params["ids"]:
            return 0
    return store.rowcount(executor.execute(statement, params))


def release_running_locks(
    executor: Executor, held: Sequence[Job] | None = None, *, now_ms: int
) -> int:
    """Give running jobs back at a graceful shutdown, attempt returned.

    With ``held``, only those claims are released (a worker releases its own leases),
    each fenced to its claim; without it, every running row is.
    """
    if held is not None:
        # A row another session holds locked is skipped, not waited for (its lease
        # expires and recovery returns it).
        return len(_run_held(executor, "release", held, {"now": now_ms})[0])
    statement = update(jobs).where(jobs.c.status == RUNNING).values(_RELEASED)
    return store.rowcount(executor.execute(statement, {"now": now_ms}))


def _failed(table: Any, transient_only: bool, heal: bool = False) -> ColumnElement[bool]:
    condition: ColumnElement[bool] = table.c.status == FAILED
    if transient_only:
        condition = and_(
            condition,
            or_(table.c.failure_class.is_(None), table.c.failure_class != UNRECOVERABLE),
        )
    if heal:
        condition = and_(condition, table.c.heal_count < bindparam("heal_limit"))
    return condition


@cache
def _requeue_statement(transient_only: bool, one: bool = False, heal: bool = False) -> Update:
    """The requeue: every matching failed row, or (``one``) the failed or cancelled row
    ``:job_id``; never a row whose dedupe key is active again.

    A self-heal (``heal``) only takes rows healed fewer than ``:heal_limit`` times and
    counts the heal; an operator's requeue starts the row's heal count over."""
    active = jobs.alias("active")
    newer = jobs.alias("newer")
    key_is_free = ~exists(
        select(active.c.id)
        .where(active.c.dedupe_key == jobs.c.dedupe_key)
        .where(active.c.status.in_([READY, RUNNING]))
    )
    is_newest = ~exists(
        select(newer.c.id)
        .where(newer.c.dedupe_key == jobs.c.dedupe_key)
        .where(_failed(newer, transient_only, heal))
        .where(
            or_(
                newer.c.created_at_ms > jobs.c.created_at_ms,
                and_(newer.c.created_at_ms == jobs.c.created_at_ms, newer.c.id > jobs.c.id),
            )
        )
    )
    if one:
        statement = (
            update(jobs)
            .where(jobs.c.id == bindparam("job_id"))
            .where(jobs.c.status.in_([FAILED, CANCELLED]))
            .where(or_(jobs.c.dedupe_key.is_(None), key_is_free))
        )
    else:
        statement = (
            update(jobs)
            .where(_failed(jobs, transient_only, heal))
            .where(or_(jobs.c.dedupe_key.is_(None), and_(key_is_free, is_newest)))
        )
    return statement.values(
        status=READY,
        attempts=0,
        available_at_ms=bindparam("now"),
        locked_until_ms=NULL,
        started_at_ms=NULL,
        completed_at_ms=NULL,
        last_error=NULL,
        failure_reason=NULL,
        failure_class=NULL,
        lease_token=NULL,
        cancel_requested_at_ms=NULL,
        heal_count=jobs.c.heal_count + 1 if heal else literal_column("0"),
    )


def _requeue(
    executor: Executor,
    *,
    now_ms: int,
    transient_only: bool,
    job_id: str | None = None,
    heal_limit: int | None = None,
) -> int:
    statement = _requeue_statement(transient_only, job_id is not None, heal_limit is not None)
    params = {"now": now_ms, "job_id": job_id, "heal_limit": heal_limit}
    for attempt in range(_REQUEUE_RETRIES):
        savepoint = executor.begin_nested()
        try:
            count = store.rowcount(executor.execute(statement, params))
        except sa_exc.IntegrityError:
            # A concurrent enqueue took a key between our check and our write.
            savepoint.rollback()
            if attempt == _REQUEUE_RETRIES - 1:
                raise
            continue
        savepoint.commit()
        return count
    return 0  # pragma: no cover - the loop returns or raises


def requeue_failed(executor: Executor, *, now_ms: int) -> int:
    """Every ``failed`` row back to ``ready`` with a fresh budget (attempts and heals),
    except rows whose key is active again; of several failed rows sharing a key, only the
    newest."""
    return _requeue(executor, now_ms=now_ms, transient_only=False)


def requeue_job(executor: Executor, job_id: str, *, now_ms: int) -> bool:
    """One ``failed`` or ``cancelled`` job back to ``ready`` with a fresh budget (attempts
    and heals); False when it is in another status, unknown, or its dedupe key is active
    again."""
    return _requeue(executor, now_ms=now_ms, transient_only=False, job_id=job_id) == 1


def requeue_transient_failed(
    executor: Executor, *, now_ms: int, heal_limit: int | None = DEFAULT_SELF_HEAL_LIMIT
) -> int:
    """Self-heal: like :func:`requeue_failed`, leaving ``unrecoverable`` failures parked,
    and only rows healed fewer than ``heal_limit`` times, each counted as one more heal
    (0 heals nothing). ``heal_limit=None`` is an operator's requeue of the transient
    failures: unbounded, and the heal count starts over."""
    if heal_limit is not None and heal_limit <= 0:
        return 0
    return _requeue(executor, now_ms=now_ms, transient_only=True, heal_limit=heal_limit)
