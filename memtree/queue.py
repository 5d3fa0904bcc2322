"""The public face: :class:`Queue`, bound to an engine, and free functions for the caller's
own transaction.

Every ``Queue`` method runs in a transaction of its own. The free functions
(:func:`enqueue`, :func:`enqueue_many`, :func:`mark_done`, :func:`enqueue_async`) do
the same work inside a ``Session`` or ``Connection`` the caller already has open and
never commit, so a job is enqueued, or a job settled, atomically with the caller's
own writes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

from sqlalchemy import URL, Connection, Engine
from sqlalchemy.orm import Session, scoped_session

from memtree import migration, settle, store, tracing, wakeup
from memtree.clock import Clock, DatabaseClock, clock_for, wall_clock_ms
from memtree.config import positive_int
from memtree.dialects import dialect_for
from memtree.engine import begin_write, configure_engine, create_engine, sync_url
from memtree.errors import (
    ConfigurationError,
    DatabaseError,
    SchemaMissingError,
    SchemaNewerError,
    SchemaOutdatedError,
)
from memtree.limits import Gate, Limit, RateLimit
from memtree.retries import retried_on_deadlock
from memtree.store import Executor
from memtree.types import (
    DEFAULT_LOCK_DURATION_MS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_DEFER_AGE_MS,
    DEFAULT_SELF_HEAL_LIMIT,
    RETRY_BASE_MS,
    RETRY_CAP_MS,
    CancelOutcome,
    Job,
    JobFailure,
    JobStatus,
    NewJob,
    SettledBatch,
    check_kind,
    check_kinds,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncEngine,
        AsyncSession,
        async_scoped_session,
    )

log = logging.getLogger("memtree.queue")

__all__ = [
    "AsyncCallerTransaction",
    "CallerTransaction",
    "ClaimGroup",
    "Clock",
    "Exchange",
    "LimitState",
    "Queue",
    "consume",
    "consume_async",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "mark_done",
    "wall_clock_ms",
]


#: How soon a claim refused a rate limit's lock (an application's transaction holds it,
#: or another worker's claim) looks again.
_LIMIT_BUSY_RETRY_MS = 50


@dataclass(frozen=True, slots=True)
class ClaimGroup:
    """Kinds claimed together in :meth:`Queue.exchange`: at most ``cap`` of them, through
    ``limit`` when fleet-wide limits apply to them."""

    cap: int
    kinds: tuple[str, ...]
    limit: Limit | None = None


@dataclass(frozen=True, slots=True)
class Exchange:
    """What :meth:`Queue.exchange` did: the settle, the jobs claimed per group, and per
    group a limit held back, when (epoch ms) to look again at the latest."""

    settled: SettledBatch
    claimed: list[list[Job]]
    blocked: dict[int, int] = field(default_factory=dict)
    now_ms: int = 0


@dataclass(frozen=True, slots=True)
class LimitState:
    """A fleet-wide limit as it is now: weight or runs used per key, and the running jobs
    that hold a global gate's permits."""

    limit: Gate | RateLimit
    used: dict[str, int]
    holders: list[Job]
    now_ms: int


def _lease(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"lock_duration_ms must be an int, not {value!r}")
    return value


def _kinds(kinds: Iterable[str] | None) -> tuple[str, ...] | None:
    if kinds is None:
        return None
    if isinstance(kinds, str):
        raise ConfigurationError("kinds must be a collection of kind strings, not one string")
    return tuple(kinds)


class Queue:
    """A job queue in the database behind ``bind`` (an ``Engine`` or a database URL).

    Settings are validated here, when the queue is built:

    - ``clock``: returns epoch milliseconds; by default the database's clock (PostgreSQL's
      ``clock_timestamp()``; on SQLite the host's), so skewed workers agree on time (see
      :mod:`memtree.clock`). Give one only for tests (:class:`memtree.testing.FakeClock`).
    - ``lock_duration_ms``: the lease of a claim unless the claim names its own.
    - ``retry_base_ms`` / ``retry_cap_ms``: exponential retry backoff.
    - ``max_defer_age_ms``: a job deferred past this age since creation fails.
    - ``claim_order``: kinds claimed before all others, in order (none by default).
    - ``retired_kinds``: kinds this queue never claims nor enqueues; rows of them that
      another program wrote are counted and purged (:meth:`purge_retired_jobs`). None by
      default; :func:`memtree.tree.queue` retires the original crate's removed kinds.
    - ``max_attempts``: attempts of a job whose ``NewJob`` does not say.
    - ``verify_schema``: check the schema revision before the first operation.
    """

    def __init__(
        self,
        bind: Engine | AsyncEngine | str | URL,
        *,
        clock: Clock | None = None,
        lock_duration_ms: int = DEFAULT_LOCK_DURATION_MS,
        retry_base_ms: int = RETRY_BASE_MS,
        retry_cap_ms: int = RETRY_CAP_MS,
        max_defer_age_ms: int = DEFAULT_MAX_DEFER_AGE_MS,
        claim_order: Sequence[str] = (),
        retired_kinds: Sequence[str] = (),
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        verify_schema: bool = True,
    ) -> None:
        if clock is not None and not callable(clock):
            raise ConfigurationError("clock must be a zero-argument callable returning epoch ms")
        self.lock_duration_ms = positive_int("lock_duration_ms", lock_duration_ms)
        self.retry_base_ms = positive_int("retry_base_ms", retry_base_ms)
        self.retry_cap_ms = positive_int("retry_cap_ms", retry_cap_ms)
        if self.retry_cap_ms < self.retry_base_ms:
            raise ConfigurationError("retry_cap_ms must be at least retry_base_ms")
        self.max_defer_age_ms = positive_int("max_defer_age_ms", max_defer_age_ms)
        self.max_attempts = positive_int("max_attempts", max_attempts)
        self.retired_kinds = check_kinds("retired_kinds", retired_kinds)
        self.claim_order = check_kinds("claim_order", claim_order, self.retired_kinds)
        #: The application's ``AsyncEngine`` when the queue was built on one.
        self.async_engine: AsyncEngine | None = None
        if isinstance(bind, Engine):
            # The application's own engine gets what memtree needs on SQLite (a busy
            # timeout, WAL unless configure_engine said otherwise); memtree's own does
            # already, and a second call changes nothing.
            self.engine = configure_engine(bind)
            self._owns_engine = False
        elif isinstance(bind, str | URL):
            self.engine = create_engine(bind)
            self._owns_engine = True
        elif isinstance(getattr(bind, "sync_engine", None), Engine):
            # An application with only an async engine: memtree's own statements run on a
            # synchronous engine to the same database, and async handlers' sessions on
            # PostgreSQL share the application's engine.
            self.async_engine = bind
            self.engine = create_engine(sync_url(bind.url))
            self._owns_engine = True
        else:
            raise ConfigurationError(
                f"bind must be an Engine, an AsyncEngine or a database URL, not {bind!r}"
            )
        self._verify_schema = verify_schema
        self._schema_ok = not verify_schema
        self.dialect = dialect_for(self.engine.dialect.name)
        self._clock: Clock = clock or clock_for(self.engine)

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Dispose of the engine if the queue made it from a URL."""
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> Queue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Queue({self.engine.url.render_as_string(hide_password=True)!r})"

    def now_ms(self) -> int:
        """Epoch milliseconds on the queue's clock: the database's unless a test gave one."""
        return int(self._clock())

    @property
    def _test_clock(self) -> bool:
        return not isinstance(self._clock, DatabaseClock)

    def _test_now(self) -> int | None:
        """The test clock's time, or None when the queue reads the database's."""
        return self.now_ms() if self._test_clock else None

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection in a fresh transaction, schema checked, driver errors translated."""
        # begin_write: BEGIN IMMEDIATE on SQLite, whoever built the engine.
        with store.translate_errors(), self.engine.connect() as conn, begin_write(conn):
            if not self._schema_ok:
                self._check_schema(conn)
            yield conn

    def _check_schema(self, conn: Connection) -> None:
        revision = migration.schema_revision(conn)
        head = migration.head_revision()
        if revision is None:
            from sqlalchemy import inspect

            if migration.revision_lost(conn):
                raise SchemaOutdatedError("unrecorded", head, migration.LOST_REVISION)
            if inspect(conn).has_table("mem_tree_jobs"):
                raise SchemaOutdatedError("the original's unversioned table", head)
            raise SchemaMissingError()
        if revision != head:
            if revision in migration.known_revisions():
                raise SchemaOutdatedError(revision, head)
            raise SchemaNewerError(revision)
        self._schema_ok = True

    # -- schema ------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the database to memtree's newest revision, adopting an original table."""
        with store.translate_errors():
            migration.upgrade(self.engine)
        self._schema_ok = not self._verify_schema or self._schema_ok

    # -- enqueue -----------------------------------------------------------------------

    def _refuse_retired(self, jobs: Iterable[NewJob]) -> None:
        if self.retired_kinds:
            for job in jobs:
                if isinstance(job, NewJob):
                    check_kind(job.kind, self.retired_kinds)

    @retried_on_deadlock
    def enqueue(self, job: NewJob) -> str | None:
        """Insert one job; its id, or None when its dedupe key is active."""
        self._refuse_retired((job,))
        with (
            tracing.span("memtree.enqueue", {"memtree.kind": str(getattr(job, "kind", ""))}),
            self.transaction() as conn,
        ):
            job_id = store.enqueue(
                conn, job, now_ms=self.now_ms(), default_max_attempts=self.max_attempts
            )
        if job_id is not None:
            wakeup.signal(self.engine)
        return job_id

    @retried_on_deadlock
    def enqueue_many(self, jobs: Iterable[NewJob]) -> list[str | None]:
        """Insert many jobs in one transaction; None where dedupe suppressed one."""
        batch = list(jobs)
        self._refuse_retired(batch)
        with (
            tracing.span("memtree.enqueue_many", {"memtree.count": len(batch)}),
            self.transaction() as conn,
        ):
            ids = store.enqueue_many(
                conn, batch, now_ms=self.now_ms(), default_max_attempts=self.max_attempts
            )
        if any(ids):
            wakeup.signal(self.engine)
        return ids

    # -- claim -------------------------------------------------------------------------

    def claim_next(
        self, lock_duration_ms: int | None = None, kinds: Iterable[str] | None = None
    ) -> Job | None:
        """Lease the next due job, or None."""
        claimed = self.claim_batch(1, lock_duration_ms, kinds)
        return claimed[0] if claimed else None

    @retried_on_deadlock
    def claim_batch(
        self,
        limit: int,
        lock_duration_ms: int | None = None,
        kinds: Iterable[str] | None = None,
    ) -> list[Job]:
        """Lease up to ``limit`` due jobs of ``kinds`` (all kinds by default)."""
        limit = positive_int("limit", limit, allow_zero=True)
        lease = self.lock_duration_ms if lock_duration_ms is None else _lease(lock_duration_ms)
        wanted = _kinds(kinds)
        with self.transaction() as conn:
            store.relax_claim_commit(conn)
            return store.claim(
                conn,
                now_ms=self.now_ms(),
                limit=limit,
                lock_duration_ms=lease,
                claim_order=self.claim_order,
                retired_kinds=self.retired_kinds,
                kinds=wanted,
            )

    # -- settle ------------------------------------------------------------------------

    @retried_on_deadlock
    def mark_done(self, job: Job, followups: Sequence[NewJob] = ()) -> bool:
        """``done``, with ``followups`` enqueued atomically; False if the lease was lost."""
        with self.transaction() as conn:
            settled = settle.mark_done(
                conn, job, followups, now_ms=self.now_ms(), default_max_attempts=self.max_attempts
            )
        if settled and followups:
            wakeup.signal(self.engine)
        return settled

    def mark_done_many(self, done: Sequence[tuple[Job, Sequence[NewJob]]]) -> set[str]:
        """Settle many claims ``done`` in one transaction, each fenced to its own claim;
        returns the ids settled. The others' leases were lost, or (PostgreSQL) another
        session held their rows locked: :meth:`complete_and_claim` tells the two apart."""
        return set(self.complete_and_claim(done, (), 0)[0].settled)

    def complete_and_claim(
        self,
        done: Sequence[tuple[Job, Sequence[NewJob]]],
        claims: Sequence[tuple[int, tuple[str, ...]]],
        limit: int,
        lock_duration_ms: int | None = None,
    ) -> tuple[SettledBatch, list[list[Job]]]:
        """The worker's round trip: settle finished claims ``done`` (each fenced to its claim)
        and claim new jobs, in one transaction, so one commit serves both.

        ``claims`` is a list of ``(cap, kinds)``, claimed in order, each taking at most its
        cap and all together at most ``limit``. Returns what the settle did (a claim whose
        row another session holds locked is skipped, not waited for: settle it again) and
        one list of jobs per entry of ``claims``. :meth:`exchange` also claims through
        fleet-wide limits.
        """
        groups = [ClaimGroup(cap, kinds) for cap, kinds in claims]
        exchanged = self.exchange(done, groups, limit, lock_duration_ms)
        return exchanged.settled, exchanged.claimed

    @retried_on_deadlock
    def exchange(
        self,
        done: Sequence[tuple[Job, Sequence[NewJob]]],
        groups: Sequence[ClaimGroup],
        limit: int,
        lock_duration_ms: int | None = None,
        *,
        notify: Iterable[str] = (),
        claimant: str | None = None,
    ) -> Exchange:
        """:meth:`complete_and_claim` with claim groups that may go through a fleet-wide
        :class:`~memtree.limits.Limit` (a global gate, a rate limit): their locks are taken
        once, gates waited for and rate limits only tried (an application's transaction
        may hold one), and each limited group claims only what its permits allow. Kinds in
        ``notify`` are announced to listening workers at commit (a permit of theirs freed).
        ``claimant``, a worker's id, starts the claims' lease tokens, so a running job names
        the worker that runs it (:func:`memtree.explain`).
        """
        lease = self.lock_duration_ms if lock_duration_ms is None else _lease(lock_duration_ms)
        freed = set(notify)
        locking = any(group.limit is not None and self._locks_for(group.limit) for group in groups)
        if done and locking and not self.dialect.serialised_writes:
            # A limit's lock is held until its transaction commits, and a settle's commit
            # waits for the disk: claiming in a transaction of its own, whose commit does
            # not (relax_claim_commit), holds the lock for a few round trips instead, so
            # the fleet's claims through one limit do not queue behind each other's flushes.
            with self.transaction() as conn:
                outcome = self._settle_batch(conn, done)
            try:
                with self.transaction() as conn:
                    store.relax_claim_commit(conn)
                    claimed, blocked, now = self._claim_groups(conn, groups, limit, lease, claimant)
                    self._announce(conn, freed, groups, blocked)
            except DatabaseError as exc:
                # The settle committed: report it, and claim again next round.
                log.warning("memtree claim failed after its settle committed: %s", exc)
                claimed, blocked, now = [[] for _ in groups], {}, self.now_ms()
        else:
            with self.transaction() as conn:
                if not done:
                    store.relax_claim_commit(conn)
                outcome = self._settle_batch(conn, done)
                claimed, blocked, now = self._claim_groups(conn, groups, limit, lease, claimant)
                self._announce(conn, freed, groups, blocked)
        if any(followups for job, followups in done if job.id in outcome.settled):
            wakeup.signal(self.engine)
        return Exchange(outcome, claimed, blocked, now)

    def _locks_for(self, limit: Limit) -> bool:
        """Whether claims through ``limit`` take a transaction-scoped lock (a rate limit,
        a keyed gate); an unkeyed global gate's permits are rows taken SKIP LOCKED."""
        if limit.rate is not None:
            return True
        return limit.gate is not None and limit.gate.key is not None

    def _announce(
        self,
        conn: Connection,
        freed: set[str],
        groups: Sequence[ClaimGroup],
        blocked: dict[int, int],
    ) -> None:
        """Tell listening workers of the kinds whose permits freed here, unless this claim
        took them all back (its limit is full again): waking the fleet then would only have
        every worker ask for permits none of them can get."""
        full = {kind for index in blocked for kind in groups[index].kinds}
        kinds = sorted(freed - full)
        if kinds:
            store.notify(conn, kinds)

    def _settle_batch(
        self, conn: Connection, done: Sequence[tuple[Job, Sequence[NewJob]]]
    ) -> SettledBatch:
        outcome = (
            settle.mark_done_many(
                conn, done, now_ms=self.now_ms(), default_max_attempts=self.max_attempts
            )
            if done
            else SettledBatch()
        )
        return outcome

    def _claim_groups(
        self,
        conn: Connection,
        groups: Sequence[ClaimGroup],
        limit: int,
        lease: int,
        claimant: str | None,
    ) -> tuple[list[list[Job]], dict[int, int], int]:
        """Claim each group in order, at most ``limit`` in all: the jobs per group, when
        to look again at each group a limit held back, and the time the limits used."""
        now = self.now_ms()
        claimed: list[list[Job]] = []
        blocked: dict[int, int] = {}
        limits = [group.limit for group in groups if group.limit is not None]
        refused: set[str] = set()
        limits_now = now
        if limits:
            gates = sorted(
                {
                    x.gate.name
                    for x in limits
                    if x.gate is not None and not store.uses_permit_rows(conn, x.gate)
                }
            )
            rates = sorted({x.rate.name for x in limits if x.rate is not None})
            refused = store.lock_limits(conn, gates, rates)
            # Under a rate limit's lock, the server's clock: the starts its window counts
            # are then in the order the locks serialised them.
            if rates and not self._test_clock:
                limits_now = store.database_clock_ms(conn) or now
        left = limit
        for index, group in enumerate(groups):
            wanted = min(group.cap, left)
            jobs: list[Job] = []
            if wanted <= 0:
                pass
            elif group.limit is None:
                jobs = store.claim(
                    conn,
                    now_ms=now,
                    limit=wanted,
                    lock_duration_ms=lease,
                    claim_order=self.claim_order,
                    retired_kinds=self.retired_kinds,
                    kinds=group.kinds,
                    claimant=claimant,
                )
            elif refused.intersection(group.limit.names):
                blocked[index] = limits_now + _LIMIT_BUSY_RETRY_MS
            else:
                jobs, until = store.claim_limited(
                    conn,
                    group.limit,
                    now_ms=limits_now,
                    want=wanted,
                    lock_duration_ms=lease,
                    claim_order=self.claim_order,
                    retired_kinds=self.retired_kinds,
                    kinds=group.kinds,
                    claimant=claimant,
                )
                if until is not None:
                    blocked[index] = until
            left -= len(jobs)
            claimed.append(jobs)
        return claimed, blocked, limits_now

    @retried_on_deadlock
    def consume(self, rate: RateLimit, *, key: str | None = None, weight: int = 1) -> bool:
        """:func:`consume` in a transaction of its own."""
        with self.transaction() as conn:
            return consume(conn, rate, key=key, weight=weight, now_ms=self._test_now())

    @retried_on_deadlock
    def limit_state(self, limit: Gate | RateLimit) -> LimitState:
        """Who holds ``limit`` now and what is left of it (for ``memtree status``)."""
        with self.transaction() as conn:
            now = self.now_ms()
            if isinstance(limit, Gate):
                if not limit.is_global:
                    return LimitState(limit, {}, [], now)
                used, _ = store.gate_holders(conn, limit, now)
                holders = store.list_running(conn, limit.kinds, now)
            else:
                used, _ = store.rate_used(conn, limit, now)
                holders = []
            return LimitState(limit, used, holders, now)

    @retried_on_deadlock
    def mark_failed(
        self, job: Job, error: object, failure: JobFailure | BaseException | None = None
    ) -> bool:
        """Retry with backoff or fail for good; False if the lease was lost."""
        with self.transaction() as conn:
            return settle.mark_failed(
                conn,
                job,
                error,
                failure,
                now_ms=self.now_ms(),
                retry_base_ms=self.retry_base_ms,
                retry_cap_ms=self.retry_cap_ms,
            )

    @retried_on_deadlock
    def mark_deferred(self, job: Job, until_ms: int, reason: str) -> bool:
        """Back to ``ready`` at ``until_ms``, attempt given back; False if the lease was lost."""
        with self.transaction() as conn:
            return settle.mark_deferred(
                conn,
                job,
                until_ms,
                reason,
                now_ms=self.now_ms(),
                max_defer_age_ms=self.max_defer_age_ms,
            )

    @retried_on_deadlock
    def mark_released(self, job: Job, until_ms: int, reason: object) -> bool:
        """Back to ``ready`` at ``until_ms``, attempt given back, after a failure that is not
        the job's own (the database was unreachable); False if the lease was lost."""
        with self.transaction() as conn:
            return settle.mark_released(conn, job, until_ms, reason)

    @retried_on_deadlock
    def extend_lease(self, job: Job, lock_duration_ms: int | None = None) -> bool:
        """Heartbeat: push the job's lease forward; False if it was lost."""
        lease = self.lock_duration_ms if lock_duration_ms is None else _lease(lock_duration_ms)
        with self.transaction() as conn:
            return settle.extend_lease(conn, job, now_ms=self.now_ms(), lock_duration_ms=lease)

    @retried_on_deadlock
    def cancel(self, job_id: str) -> CancelOutcome | None:
        """Cancel a ``ready`` job at once, or ask a ``running`` one to stop.

        Returns ``CANCELLED``, ``REQUESTED`` (the job ends ``cancelled`` once its handler
        returns), ``FINISHED`` (it had already finished; nothing changed), or None when
        there is no such job.
        """
        with self.transaction() as conn:
            outcome = settle.cancel(conn, job_id, now_ms=self.now_ms())
        if outcome is CancelOutcome.REQUESTED:
            wakeup.signal(self.engine)  # workers in this process look at once
        return outcome

    @retried_on_deadlock
    def mark_cancelled(self, job: Job) -> bool:
        """End a run that was asked to stop as ``cancelled``; False if the lease was lost."""
        with self.transaction() as conn:
            return settle.mark_cancelled(conn, job, now_ms=self.now_ms())

    @retried_on_deadlock
    def cancel_requested(self, ids: Sequence[str]) -> set[str]:
        """Which of these jobs have been asked to stop."""
        with self.transaction() as conn:
            return store.cancel_requested(conn, ids)

    @retried_on_deadlock
    def extend_leases(self, held: Sequence[Job], lock_duration_ms: int | None = None) -> set[str]:
        """Heartbeat many claims at once; returns the ids whose lease is still held."""
        lease = self.lock_duration_ms if lock_duration_ms is None else _lease(lock_duration_ms)
        if not held:
            return set()
        with self.transaction() as conn:
            return settle.extend_leases(conn, held, now_ms=self.now_ms(), lock_duration_ms=lease)

    # -- maintenance -------------------------------------------------------------------

    def _made_ready(self, count: int) -> int:
        if count:
            wakeup.signal(self.engine)
        return count

    @retried_on_deadlock
    def recover_stale_locks(self) -> int:
        with self.transaction() as conn:
            count = settle.recover_stale_locks(conn, now_ms=self.now_ms())
        return self._made_ready(count)

    @retried_on_deadlock
    def release_running_locks(self, held: Sequence[Job] | None = None) -> int:
        with self.transaction() as conn:
            count = settle.release_running_locks(conn, held, now_ms=self.now_ms())
        return self._made_ready(count)

    @retried_on_deadlock
    def requeue_failed(self) -> int:
        with self.transaction() as conn:
            count = settle.requeue_failed(conn, now_ms=self.now_ms())
        return self._made_ready(count)

    @retried_on_deadlock
    def requeue_job(self, job_id: str) -> bool:
        """Retry one failed or cancelled job with a fresh budget; False if it cannot be."""
        with self.transaction() as conn:
            requeued = settle.requeue_job(conn, job_id, now_ms=self.now_ms())
        self._made_ready(int(requeued))
        return requeued

    # -- workers ---------------------------------------------------------------------

    @retried_on_deadlock
    def beat_worker(self, worker: store.WorkerRow) -> None:
        """Record that ``worker`` runs now (a worker does, every
        :data:`~memtree.store.WORKER_BEAT_MS`)."""
        with self.transaction() as conn:
            store.beat_worker(conn, worker, now_ms=self.now_ms())

    @retried_on_deadlock
    def forget_worker(self, worker_id: str) -> None:
        """Delete a stopping worker's row."""
        with self.transaction() as conn:
            store.forget_worker(conn, worker_id)

    @retried_on_deadlock
    def list_workers(self) -> list[store.WorkerRow]:
        """Every worker process's row, alive or gone, the most recently seen first."""
        with self.transaction() as conn:
            return store.list_workers(conn)

    @retried_on_deadlock
    def count_retired(self) -> int:
        """Rows of this queue's retired kinds still in the table (purged by workers at start)."""
        with self.transaction() as conn:
            return store.count_retired(conn, self.retired_kinds)

    @retried_on_deadlock
    def requeue_transient_failed(
        self, self_heal_limit: int | None = DEFAULT_SELF_HEAL_LIMIT
    ) -> int:
        """Self-heal: failed jobs that are not ``unrecoverable`` and were self-healed fewer
        than ``self_heal_limit`` times get a fresh budget of attempts (0 heals nothing).
        ``None`` is an operator's retry of them all: unbounded, heal counts start over."""
        limit = None
        if self_heal_limit is not None:
            limit = positive_int("self_heal_limit", self_heal_limit, allow_zero=True)
        with self.transaction() as conn:
            count = settle.requeue_transient_failed(conn, now_ms=self.now_ms(), heal_limit=limit)
        return self._made_ready(count)

    @retried_on_deadlock
    def next_due_ms(self, kinds: Iterable[str] | None = None) -> int | None:
        """When the earliest ready job (of ``kinds``) is due; None when nothing is ready."""
        with self.transaction() as conn:
            return store.next_due_ms(conn, _kinds(kinds), self.retired_kinds)

    @retried_on_deadlock
    def prune(self, status: JobStatus | str, completed_before_ms: int, limit: int = 10_000) -> int:
        """Delete up to ``limit`` terminal rows of ``status`` completed before the cutoff."""
        with self.transaction() as conn:
            return store.prune(
                conn,
                status=JobStatus(status),
                completed_before_ms=completed_before_ms,
                limit=positive_int("limit", limit),
            )

    @retried_on_deadlock
    def purge_retired_jobs(self) -> int:
        """Delete rows of this queue's retired kinds; how many."""
        with self.transaction() as conn:
            return store.purge_retired_jobs(conn, self.retired_kinds)

    # -- reads -------------------------------------------------------------------------

    @retried_on_deadlock
    def count_by_status(self, status: JobStatus | str) -> int:
        with self.transaction() as conn:
            return store.count_by_status(conn, JobStatus(status))

    @retried_on_deadlock
    def count_failed_unrecoverable(self) -> int:
        with self.transaction() as conn:
            return store.count_failed_unrecoverable(conn)

    @retried_on_deadlock
    def count_by_kind_and_status(self) -> dict[tuple[str, str], int]:
        """Row counts grouped by (kind, status)."""
        with self.transaction() as conn:
            return store.count_by_kind_and_status(conn)

    @retried_on_deadlock
    def count_total(self) -> int:
        with self.transaction() as conn:
            return store.count_total(conn)

    @retried_on_deadlock
    def list_jobs(
        self,
        *,
        status: JobStatus | str | None = None,
        kind: str | None = None,
        dedupe_key: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """Jobs matching every filter given, newest first."""
        with self.transaction() as conn:
            return store.list_jobs(
                conn,
                status=None if status is None else JobStatus(status),
                kind=kind,
                dedupe_key=dedupe_key,
                limit=positive_int("limit", limit),
            )

    @retried_on_deadlock
    def get_job(self, job_id: str) -> Job | None:
        with self.transaction() as conn:
            return store.get_job(conn, job_id)


# -- the caller's transaction -----------------------------------------------------------


#: What the free functions run in: the caller's ``Session`` or ``Connection``, or a
#: ``scoped_session`` (Flask-SQLAlchemy's ``db.session``), whose current ``Session`` is used.
CallerTransaction: TypeAlias = "Session | Connection | scoped_session[Any]"
#: The same for :func:`enqueue_async`.
AsyncCallerTransaction: TypeAlias = "AsyncSession | AsyncConnection | async_scoped_session[Any]"


def _caller(executor: object, what: str) -> Executor:
    """The caller's ``Session`` or ``Connection``, or a clear error at the point of misuse."""
    if isinstance(executor, scoped_session):
        executor = executor()
    if isinstance(executor, Session | Connection):
        return executor
    if isinstance(executor, Engine):
        raise ConfigurationError(
            f"memtree.{what} runs in your transaction: pass a Session or Connection, not an "
            f"Engine (Queue(engine).{what}(...) runs in a transaction of its own)"
        )
    hint = " (use memtree.enqueue_async for an AsyncSession)" if _is_async(executor) else ""
    raise ConfigurationError(
        f"memtree.{what} needs a Session, scoped_session or Connection, "
        f"not {type(executor).__name__}{hint}"
    )


def _is_async(executor: object) -> bool:
    module = type(executor).__module__
    return module.startswith("sqlalchemy.ext.asyncio")


def enqueue(executor: CallerTransaction, job: NewJob, *, now_ms: int | None = None) -> str | None:
    """Enqueue inside the caller's ``Session`` or ``Connection``; commits with it, or never."""
    caller = _caller(executor, "enqueue")
    with (
        tracing.span("memtree.enqueue", {"memtree.kind": str(getattr(job, "kind", ""))}),
        store.translate_errors(),
    ):
        now = clock_for(caller).now_ms(caller) if now_ms is None else now_ms
        job_id = store.enqueue(caller, job, now_ms=now)
    if job_id is not None:
        wakeup.after_commit(caller)
    return job_id


def enqueue_many(
    executor: CallerTransaction, jobs: Iterable[NewJob], *, now_ms: int | None = None
) -> list[str | None]:
    """:func:`enqueue` for many jobs, with the same per-position dedupe result as the queue's."""
    caller = _caller(executor, "enqueue_many")
    with store.translate_errors():
        now = clock_for(caller).now_ms(caller) if now_ms is None else now_ms
        ids = store.enqueue_many(caller, list(jobs), now_ms=now)
    if any(ids):
        wakeup.after_commit(caller)
    return ids


def mark_done(
    executor: CallerTransaction,
    job: Job,
    followups: Sequence[NewJob] = (),
    *,
    now_ms: int | None = None,
) -> bool:
    """Settle ``done`` inside the caller's transaction, so its writes and the completion
    commit together; False (and nothing enqueued) when the lease was lost."""
    caller = _caller(executor, "mark_done")
    with store.translate_errors():
        now = clock_for(caller).now_ms(caller) if now_ms is None else now_ms
        settled = settle.mark_done(caller, job, followups, now_ms=now)
    if settled and followups:
        wakeup.after_commit(caller)
    return settled


def consume(
    executor: CallerTransaction,
    rate: RateLimit,
    *,
    key: str | None = None,
    weight: int = 1,
    now_ms: int | None = None,
) -> bool:
    """Take ``weight`` from ``rate``'s budget (for ``key``, when it is partitioned) inside
    the caller's transaction: True if the window had that much left, False (and nothing
    taken) if not. Workers claiming ``rate``'s kinds share the budget; it is spent when
    the caller commits, and given back if it rolls back. On PostgreSQL this holds the
    limit's lock until then, so keep the transaction short; workers skip the limit's kinds
    meanwhile rather than wait."""
    _check_consume(rate, key, weight)
    caller = _caller(executor, "consume")
    with store.translate_errors():
        return store.consume(caller, rate, key or "", weight, _host_now(caller, now_ms))


async def consume_async(
    executor: AsyncCallerTransaction,
    rate: RateLimit,
    *,
    key: str | None = None,
    weight: int = 1,
    now_ms: int | None = None,
) -> bool:
    """:func:`consume` inside the caller's ``AsyncSession``, ``AsyncConnection`` or
    ``async_scoped_session``."""
    _check_consume(rate, key, weight)
    target = _async_caller(executor, "consume_async", "consume")

    def take(caller: Executor) -> bool:
        return store.consume(caller, rate, key or "", weight, _host_now(caller, now_ms))

    with store.translate_errors():
        return bool(await target.run_sync(take))


def _check_consume(rate: object, key: object, weight: object) -> None:
    if not isinstance(rate, RateLimit):
        raise ConfigurationError(f"consume needs a RateLimit, not {type(rate).__name__}")
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= rate.limit:
        raise ConfigurationError(f"weight must be an int from 1 to {rate.limit}, not {weight!r}")
    if key is not None and not isinstance(key, str):
        raise ConfigurationError(f"key must be a string, not {key!r}")


def _host_now(caller: Executor, now_ms: int | None) -> int | None:
    """``now_ms``, or where the database has no clock of its own (SQLite), the host's;
    None leaves the time to the database's clock, read under the limit's lock."""
    if now_ms is None and not clock_for(caller).has_own_clock:
        return clock_for(caller).now_ms()
    return now_ms


def _async_caller(executor: object, what: str, sync_name: str) -> AsyncSession | AsyncConnection:
    """The caller's ``AsyncSession`` or ``AsyncConnection``, or a clear error."""
    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncSession,
        async_scoped_session,
    )

    target: object = executor
    if isinstance(target, async_scoped_session):
        target = target()
    if not isinstance(target, AsyncSession | AsyncConnection):
        raise ConfigurationError(
            f"memtree.{what} needs an AsyncSession, async_scoped_session or "
            f"AsyncConnection, not {type(target).__name__}"
            + (f" (use memtree.{sync_name} for a Session)" if not _is_async(target) else "")
        )
    return target


async def enqueue_async(
    executor: AsyncCallerTransaction, job: NewJob, *, now_ms: int | None = None
) -> str | None:
    """Enqueue inside the caller's ``AsyncSession``, ``AsyncConnection`` or
    ``async_scoped_session``."""
    target = _async_caller(executor, "enqueue_async", "enqueue")
    if now_ms is None:
        now_ms = await clock_for(target).now_ms_async(target)
    with store.translate_errors():
        return await store.enqueue_async(target, job, now_ms=now_ms)
