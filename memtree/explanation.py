"""Why one job is where it is: :func:`explain`.

An :class:`Explanation` names, for one job, the one thing it waits for or the way it
ended, in a sentence an operator can act on, with the facts behind it: due later (and
why: scheduled, a retry's backoff, deferred or released by its worker), due but no
running worker handles its kind, waiting behind a full fleet-wide gate or a spent rate
limit (and the jobs holding it), waiting its turn behind due jobs of its kind, running
under a live lease (the worker, its last beat, the time left) or under an expired one
recovery has not reached, asked to stop, and the ends: done, cancelled, failed (the
error scrubbed, the failure class, whether self-heal retries it). ``memtree explain``,
the dashboard's job page and the API all read it.

Everything is read in one transaction of the queue, on the database's clock. Nothing here
writes, and nothing builds a statement: the reads are :mod:`memtree.store`'s. Gates of
``scope="process"`` live in a worker's memory and cannot be seen from here; fleet-wide
limits are seen only when the caller passes them (the job row does not name its gate).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection

from memtree import store
from memtree.limits import Gate, RateLimit
from memtree.queue import Queue
from memtree.redact import scrub
from memtree.types import DEFAULT_SELF_HEAL_LIMIT, FailureClass, Job, JobStatus

__all__ = ["ExplainReason", "Explanation", "explain"]

#: How much of a job's last error an explanation shows (scrubbed of secrets first).
ERROR_SHOWN_BYTES = 2_000


class ExplainReason(StrEnum):
    """What a job waits for, or how it ended: the ``reason`` of an :class:`Explanation`."""

    SCHEDULED = "scheduled"
    BACKOFF = "backoff"
    DEFERRED = "deferred"
    RETIRED_KIND = "retired_kind"
    NO_WORKER = "no_worker"
    GATE_FULL = "gate_full"
    RATE_LIMITED = "rate_limited"
    WAITING_TURN = "waiting_turn"
    RUNNING = "running"
    CANCEL_REQUESTED = "cancel_requested"
    LEASE_EXPIRED = "lease_expired"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"
    UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why one job is where it is: an :class:`ExplainReason`, a one-line ``summary``, further
    ``details`` (lines), and the ``facts`` behind them as JSON-ready values (times in
    epoch milliseconds on the database's clock, durations in milliseconds)."""

    job_id: str
    status: str
    reason: ExplainReason
    summary: str
    details: tuple[str, ...] = ()
    facts: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status,
            "reason": self.reason.value,
            "summary": self.summary,
            "details": list(self.details),
            "facts": self.facts,
        }


def explain(
    queue: Queue, job_id: str, limits: Iterable[Gate | RateLimit] = ()
) -> Explanation | None:
    """Why job ``job_id`` is where it is, or None if there is no such job. ``limits`` are
    the application's fleet-wide gates and rate limits (the row does not say which apply)."""
    with queue.transaction() as conn:
        values = store.get_row(conn, job_id)
        if values is None:
            return None
        now = queue.now_ms()
        problem = store.unreadable_reason(values)
        if problem is not None:
            return Explanation(
                job_id,
                str(values[store.JOB_COLUMNS.index("status")]),
                ExplainReason.UNREADABLE,
                f"memtree cannot read this row as a job: {problem}",
                ("no worker claims it as it is; another program wrote it",),
            )
        job = store.job_from_values(values)
        return _Reader(queue, conn, job, now, tuple(limits)).explanation()


def _span(ms: int) -> str:
    """A duration for a sentence: ``3.2 s``, ``4.0 min``, ``2.5 h``, ``1.2 d``."""
    seconds = abs(ms) / 1000
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


class _Reader:
    """The reads and sentences of one explanation, in the caller's transaction."""

    def __init__(
        self,
        queue: Queue,
        conn: Connection,
        job: Job,
        now: int,
        limits: Sequence[Gate | RateLimit],
    ) -> None:
        self.queue = queue
        self.conn = conn
        self.job = job
        self.now = now
        self.limits = limits
        self.facts: dict[str, Any] = {"now_ms": now, "attempts": job.attempts}
        self.facts["max_attempts"] = job.max_attempts
        self._alive: list[store.WorkerRow] | None = None

    def explanation(self) -> Explanation:
        status = self.job.status
        if status is JobStatus.READY:
            return self._ready()
        if status is JobStatus.RUNNING:
            return self._running()
        if status is JobStatus.DONE:
            return self._ended(ExplainReason.DONE, "done")
        if status is JobStatus.CANCELLED:
            return self._ended(ExplainReason.CANCELLED, "cancelled")
        return self._failed()

    def _make(self, reason: ExplainReason, summary: str, *details: str) -> Explanation:
        lines = [*details, *self._dedupe()]
        return Explanation(
            self.job.id, self.job.status.value, reason, summary, tuple(lines), self.facts
        )

    # -- ready ---------------------------------------------------------------------

    def _ready(self) -> Explanation:
        job, now = self.job, self.now
        self.facts["available_at_ms"] = job.available_at_ms
        if job.kind in self.queue.retired_kinds:
            return self._make(
                ExplainReason.RETIRED_KIND,
                f"its kind {job.kind!r} is retired: no worker claims it",
                "a worker purges rows of retired kinds when it starts "
                "(or `memtree jobs purge-retired`)",
            )
        if job.available_at_ms > now:
            return self._due_later()
        self.facts["due_for_ms"] = now - job.available_at_ms
        waited = f"due {_span(now - job.available_at_ms)} ago"
        nobody = self._no_worker()
        if nobody is not None:
            return self._make(
                ExplainReason.NO_WORKER, f"{waited}, but {nobody}", *self._workers_seen()
            )
        for limit in self.limits:
            if job.kind not in limit.kinds:
                continue
            blocked = self._blocked_by(limit)
            if blocked is not None:
                return blocked
        ahead = store.count_due_ahead(self.conn, job.kind, job.available_at_ms)
        self.facts["due_ahead"] = ahead
        return self._make(
            ExplainReason.WAITING_TURN,
            f"{waited}: waiting for a worker to claim it, behind {ahead} due "
            f"{job.kind} job{'s' if ahead != 1 else ''}",
            "workers claim due jobs by claim order, then by due time, as their slots free",
            *self._workers_seen(),
        )

    def _due_later(self) -> Explanation:
        job = self.job
        wait = job.available_at_ms - self.now
        self.facts["due_in_ms"] = wait
        error = self._error_line()
        if job.started_at_ms is not None and job.last_error is not None and job.attempts > 0:
            return self._make(
                ExplainReason.BACKOFF,
                f"due in {_span(wait)}: a retry, after attempt {job.attempts} of "
                f"{job.max_attempts} failed",
                *error,
            )
        if job.last_error is not None:
            return self._make(
                ExplainReason.DEFERRED,
                f"due in {_span(wait)}: deferred or released by its worker",
                f"reason: {scrub(job.last_error, max_bytes=ERROR_SHOWN_BYTES)}",
            )
        return self._make(ExplainReason.SCHEDULED, f"due in {_span(wait)}: scheduled for later")

    def _alive_workers(self) -> list[store.WorkerRow]:
        if self._alive is None:
            self._alive = [w for w in store.list_workers(self.conn) if w.alive(self.now)]
        return self._alive

    def _no_worker(self) -> str | None:
        """Why no worker will claim this job's kind, or None when some worker handles it."""
        alive = self._alive_workers()
        self.facts["workers_alive"] = len(alive)
        if not alive:
            return "no worker process is running (none seen in the last " + (
                f"{_span(store.WORKER_GONE_MS)})"
            )
        if any(self.job.kind in worker.kinds for worker in alive):
            return None
        return f"none of the {len(alive)} running workers has a handler for {self.job.kind!r}"

    def _workers_seen(self) -> tuple[str, ...]:
        lines = []
        for worker in self._alive_workers()[:5]:
            kinds = ", ".join(worker.kinds[:8]) + (", ..." if len(worker.kinds) > 8 else "")
            lines.append(
                f"worker {worker.name} ({worker.id}), seen {_span(self.now - worker.seen_at_ms)} "
                f"ago, handles: {kinds}"
            )
        lines.append(
            "a process that keeps no row in mem_tree_workers (the original crate) may claim it too"
        )
        return tuple(lines)

    def _blocked_by(self, limit: Gate | RateLimit) -> Explanation | None:
        job = self.job
        try:
            payload = job.payload
        except ValueError:
            payload = None
        key = "" if limit.key is None else store.key_of(payload, limit.key)
        per = "" if limit.key is None else f" for {limit.key}={key!r}"
        if isinstance(limit, Gate):
            if not limit.is_global:
                return None  # a worker's memory: not visible from here
            used, expiry = store.gate_holders(self.conn, limit, self.now)
            if used.get(key, 0) < limit.limit:
                return None
            holders = [
                h
                for h in store.list_running(self.conn, limit.kinds, self.now)
                if limit.key is None or store.key_of(_payload(h), limit.key) == key
            ]
            self.facts["gate"] = {
                "name": limit.name,
                "limit": limit.limit,
                "key": key if limit.key else None,
                "holders": [h.id for h in holders],
            }
            lines = [
                f"held by {h.id} ({h.kind}, lease {_span((h.locked_until_ms or 0) - self.now)} "
                "left)"
                for h in holders[:10]
            ]
            if expiry is not None:
                lines.append(f"a permit frees at the latest in {_span(expiry - self.now)}")
            return self._make(
                ExplainReason.GATE_FULL,
                f"waiting behind gate {limit.name!r}{per}: all {limit.limit} permits are held",
                *lines,
            )
        spent, rolls_at = store.rate_used(self.conn, limit, self.now, key=key)
        weight = limit.weight_of(payload)
        if spent.get(key, 0) + weight <= limit.limit:
            return None
        self.facts["rate_limit"] = {
            "name": limit.name,
            "limit": limit.limit,
            "window_s": limit.window_s,
            "used": spent.get(key, 0),
            "weight": weight,
            "key": key if limit.key else None,
            "rolls_at_ms": rolls_at,
        }
        lines = []
        if rolls_at is not None:
            lines.append(f"the window frees room in {_span(rolls_at - self.now)}")
        return self._make(
            ExplainReason.RATE_LIMITED,
            f"waiting for rate limit {limit.name!r}{per}: {spent.get(key, 0)} of "
            f"{limit.limit} used in the last {limit.window_s:g} s (this job weighs {weight})",
            *lines,
        )

    # -- running -------------------------------------------------------------------

    def _running(self) -> Explanation:
        job, now = self.job, self.now
        until = job.locked_until_ms or 0
        self.facts["locked_until_ms"] = job.locked_until_ms
        self.facts["lease_left_ms"] = until - now
        lines = list(self._holder())
        if job.started_at_ms is not None:
            lines.insert(
                0,
                f"attempt {job.attempts} of {job.max_attempts}, started "
                f"{_span(now - job.started_at_ms)} ago",
            )
        if until < now:
            return self._make(
                ExplainReason.LEASE_EXPIRED,
                f"its lease expired {_span(now - until)} ago and recovery has not reached "
                "it yet: it is ready again at the next recovery pass",
                *lines,
                "every worker recovers expired leases at least every 30 s (`memtree recover` "
                "does it now)",
            )
        if job.cancel_requested_at_ms is not None:
            self.facts["cancel_requested_at_ms"] = job.cancel_requested_at_ms
            return self._make(
                ExplainReason.CANCEL_REQUESTED,
                f"running, asked to stop {_span(now - job.cancel_requested_at_ms)} ago: "
                "it ends cancelled when its handler returns",
                *lines,
            )
        return self._make(
            ExplainReason.RUNNING, f"running under a live lease, {_span(until - now)} left", *lines
        )

    def _holder(self) -> tuple[str, ...]:
        claimant = store.claimant_of(self.job.lease_token)
        if claimant is None:
            return ("claimed by a process that keeps no row in mem_tree_workers",)
        found = next((w for w in store.list_workers(self.conn) if w.id == claimant), None)
        self.facts["worker_id"] = claimant
        if found is None:
            return (f"claimed by worker {claimant}, which has stopped or is no longer known",)
        seen = self.now - found.seen_at_ms
        self.facts["worker"] = {"id": found.id, "name": found.name, "seen_at_ms": found.seen_at_ms}
        state = "" if found.alive(self.now) else " (gone: it missed its beats)"
        return (f"run by worker {found.name} ({found.id}), last beat {_span(seen)} ago{state}",)

    # -- ended ---------------------------------------------------------------------

    def _ended(self, reason: ExplainReason, word: str) -> Explanation:
        job = self.job
        self.facts["completed_at_ms"] = job.completed_at_ms
        when = (
            "" if job.completed_at_ms is None else f" {_span(self.now - job.completed_at_ms)} ago"
        )
        return self._make(reason, f"{word}{when}, after {job.attempts} attempt(s)")

    def _failed(self) -> Explanation:
        job = self.job
        self.facts["completed_at_ms"] = job.completed_at_ms
        self.facts["failure_class"] = job.failure_class
        self.facts["failure_reason"] = job.failure_reason
        cause = job.failure_reason or "its handler failed"
        klass = job.failure_class or "unclassified, so transient"
        lines = list(self._error_line())
        if job.failure_class == FailureClass.UNRECOVERABLE:
            lines.append("unrecoverable: self-heal never retries it; `memtree jobs retry` does")
        elif job.heal_count < DEFAULT_SELF_HEAL_LIMIT:
            lines.append(
                f"transient: a worker's self-heal retries it (healed {job.heal_count} of "
                f"{DEFAULT_SELF_HEAL_LIMIT} times by default)"
            )
        else:
            lines.append(
                f"transient, but self-healed {job.heal_count} times already: "
                "`memtree jobs retry` retries it"
            )
        return self._make(
            ExplainReason.FAILED,
            f"failed ({klass}) after {job.attempts} of {job.max_attempts} attempts: {cause}",
            *lines,
        )

    # -- shared --------------------------------------------------------------------

    def _error_line(self) -> tuple[str, ...]:
        if self.job.last_error is None:
            return ()
        error = scrub(self.job.last_error, max_bytes=ERROR_SHOWN_BYTES)
        self.facts["last_error"] = error
        return (f"last error: {error}",)

    def _dedupe(self) -> tuple[str, ...]:
        key = self.job.dedupe_key
        if key is None:
            return ()
        self.facts["dedupe_key"] = key
        if self.job.status in (JobStatus.READY, JobStatus.RUNNING):
            return (
                f"while it is {self.job.status.value}, an enqueue with dedupe key {key!r} is "
                "suppressed (returns None)",
            )
        holder = store.active_with_key(self.conn, key)
        if holder is None:
            return ()
        self.facts["dedupe_holder"] = holder
        return (
            f"job {holder} holds dedupe key {key!r} now: enqueues with it are suppressed, "
            "and this job cannot be retried until that one ends",
        )


def _payload(job: Job) -> Any:
    try:
        return job.payload
    except ValueError:
        return None
