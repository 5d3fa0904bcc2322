"""The completer: settles the outcomes executors return, and counts, logs and measures
every run's end.

Settles are fenced to their claim (``settle.*``: a stale claim matches nothing). Runs
that ended :class:`~memtree.worker.outcome.Done` without touching ``ctx.session`` wait
here, at most a few milliseconds, to be settled together in the producer's next
transaction, which claims new jobs as well (:meth:`Completer.settle_batch`). A failure,
a deferral, or a run whose settle did not match is settled on its own at once, in the
thread that ran it (:meth:`Completer.complete`): on PostgreSQL a fenced single-row
settle waits for a row another session holds locked, and that wait must hold up one
run, never the producer's loop. A settle that did not match because the job was asked
to stop ends the run ``cancelled``, in the same transaction.

Release after an infrastructure error: a run that failed because the database could
not be reached goes back to ``ready`` after a backoff with its attempt given back, at
most ``max_infrastructure_releases`` times in a row per job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy import exc as sa_exc

from memtree import settle, store
from memtree.errors import DatabaseError
from memtree.queue import Queue
from memtree.redact import scrub
from memtree.retries import retried_on_deadlock
from memtree.types import Job, NewJob, SettledBatch, backoff_ms
from memtree.worker.faults import classify_error, is_infrastructure_error
from memtree.worker.outcome import (
    Committed,
    Deferred,
    Done,
    Ending,
    LeaseLost,
    Outcome,
    Run,
    Unsettled,
)

if TYPE_CHECKING:
    from memtree.metrics import Metrics

__all__ = [
    "DEFAULT_MAX_INFRASTRUCTURE_RELEASES",
    "INFRASTRUCTURE_RETRY_BASE_MS",
    "INFRASTRUCTURE_RETRY_CAP_MS",
    "Completer",
    "Finished",
    "log_uncommitted",
    "retrying",
]

log = logging.getLogger("memtree.worker")

T = TypeVar("T")

#: Runs of one job in a row this worker releases after an infrastructure error, attempt
#: given back, before the next such run counts as a failure like any other.
DEFAULT_MAX_INFRASTRUCTURE_RELEASES = 10
#: The first release after an infrastructure error waits this long; it doubles per release.
INFRASTRUCTURE_RETRY_BASE_MS = 1_000
#: The longest wait after an infrastructure error.
INFRASTRUCTURE_RETRY_CAP_MS = 60_000
# Jobs whose infrastructure releases a worker remembers (the oldest are forgotten).
_INFRASTRUCTURE_MEMORY = 10_000
# The longest a finished job waits to be settled in a batch with others.
_FLUSH_DELAY_S = 0.01
# How soon a finished job whose row another session held locked is settled again.
_LOCKED_RETRY_S = 0.1
# Tries of a single settle through database errors before the run is left to its lease.
_SETTLE_TRIES = 5


def fields(job: Job, duration_s: float | None = None) -> dict[str, Any]:
    """The structured fields of a job's log records."""
    values: dict[str, Any] = {"job_id": job.id, "kind": job.kind, "attempt": job.attempts}
    if duration_s is not None:
        values["duration_ms"] = int(duration_s * 1000)
    return values


@dataclass(frozen=True, slots=True)
class Finished:
    """A run that ended :class:`Done` and waits for a batched settle."""

    job: Job
    followups: tuple[NewJob, ...]
    duration_s: float


def retrying(operation: Callable[[], T], tries: int = _SETTLE_TRIES) -> T | None:
    """A settle, retried through database errors with the backoff their fault names;
    None if the database stayed away ``tries`` times."""
    for _ in range(tries):
        try:
            return operation()
        except (DatabaseError, sa_exc.SQLAlchemyError) as exc:
            label, backoff_s = classify_error(exc)
            log.warning(
                "memtree settle failed (%s); retrying in %.1fs: %s",
                label,
                backoff_s,
                scrub(str(exc)),
            )
            time.sleep(backoff_s)
    return None


def log_uncommitted(run: Run, error: BaseException) -> None:
    """A handler's completion did not commit: its writes are gone, the run failed."""
    label, _ = classify_error(error)
    log.warning(
        "job %s: its completion did not commit (%s: %s)",
        run.job.id,
        label,
        scrub(str(error)),
        extra=fields(run.job, run.duration_s()),
    )


class Completer:
    """Settles runs' outcomes for one worker; thread-safe."""

    def __init__(
        self,
        queue: Queue,
        *,
        max_infrastructure_releases: int,
        metrics: Metrics | None,
    ) -> None:
        self.queue = queue
        self.max_infrastructure_releases = max_infrastructure_releases
        self.metrics = metrics
        self._lock = threading.Lock()
        self._pending: list[Finished] = []
        self._since = 0.0
        # Job id -> infrastructure releases in a row.
        self._releases: dict[str, int] = {}
        self.settled = 0

    # -- the batch ---------------------------------------------------------------------

    def add(self, finished: Finished) -> bool:
        """Queue a run for the next batch; True if it is the first (it arms the timer)."""
        with self._lock:
            first = not self._pending
            if first:
                self._since = time.monotonic()
            self._pending.append(finished)
            return first

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush_in(self) -> float | None:
        """Seconds until the oldest waiting run must be settled; None when none waits."""
        with self._lock:
            if not self._pending:
                return None
            return self._since + _FLUSH_DELAY_S - time.monotonic()

    def take(self, *, now: bool, batch: int) -> list[Finished]:
        """The runs to settle in this transaction: all of them when ``now`` (the producer
        claims anyway, has nothing running, or stops), when ``batch`` wait, or when the
        oldest has waited long enough; otherwise none."""
        with self._lock:
            if not self._pending:
                return []
            if (
                now
                or len(self._pending) >= batch
                or time.monotonic() - self._since >= _FLUSH_DELAY_S
            ):
                taken, self._pending = self._pending, []
                return taken
            return []

    def put_back(self, items: Sequence[Finished], delay_s: float = 0.0) -> None:
        """Runs whose settle did not happen (the transaction rolled back, a row was locked)."""
        if not items:
            return
        with self._lock:
            self._pending[:0] = items
            self._since = time.monotonic() + delay_s

    def record_batch(self, items: Sequence[Finished], outcome: SettledBatch | None) -> None:
        """Count the runs of a committed batched settle (``outcome``; None when the
        database stayed away: they are left to their leases). A run whose row another
        session held locked is settled again shortly; one that did not match may have
        been asked to stop, which is settled on its own."""
        if not items:
            return
        if outcome is None:
            for item in items:
                self._record(item.job, Ending.DONE, None, item.duration_s)
            return
        if outcome.locked:
            self.put_back([i for i in items if i.job.id in outcome.locked], _LOCKED_RETRY_S)
        matched = [item for item in items if item.job.id in outcome.settled]
        with self._lock:
            self.settled += len(matched)
            if self._releases:
                for item in matched:
                    self._releases.pop(item.job.id, None)
        if log.isEnabledFor(logging.DEBUG):
            for item in matched:
                log.debug("job %s done", item.job.id, extra=fields(item.job, item.duration_s))
        if self.metrics is not None:
            for item in matched:
                self.metrics.on_finished(item.job, Ending.DONE, item.duration_s)
        for item in items:
            if item.job.id not in outcome.settled and item.job.id not in outcome.locked:
                ending = self._settle(item.job, lambda conn, now: False)
                self._record(item.job, Ending.DONE, ending, item.duration_s)

    # -- one at a time -----------------------------------------------------------------

    def complete(self, run: Run, outcome: Outcome, duration_s: float) -> None:
        """Settle (if it must be) and count one run's outcome other than a batched done."""
        job = run.job
        if isinstance(outcome, Done):
            raise TypeError("a Done run is settled in a batch: Completer.add")
        if isinstance(outcome, LeaseLost):
            self._record(job, Ending.LEASE_LOST, False, duration_s)
            return
        if isinstance(outcome, Unsettled):
            log.error("job %s not settled: %s", job.id, outcome.reason, extra=fields(job))
            return
        if isinstance(outcome, Committed):
            if outcome.settled:
                self._record(job, Ending.DONE, True, duration_s)
            else:
                ending = self._settle(job, lambda conn, now: False)
                self._record(job, Ending.DONE, ending, duration_s)
            return
        if isinstance(outcome, Deferred):
            defer = outcome.defer
            log.info("job %s deferred: %s", job.id, scrub(defer.reason), extra=fields(job))
            settled = self._settle(
                job,
                lambda conn, now: settle.mark_deferred(
                    conn,
                    job,
                    defer.resolve(now),
                    defer.reason,
                    now_ms=now,
                    max_defer_age_ms=self.queue.max_defer_age_ms,
                ),
            )
            self._record(job, Ending.DEFERRED, settled, duration_s)
            return
        error = outcome.error
        release = self._release_number(job, error)
        if release is not None:
            delay_ms = backoff_ms(
                release, base_ms=INFRASTRUCTURE_RETRY_BASE_MS, cap_ms=INFRASTRUCTURE_RETRY_CAP_MS
            )
            log.warning(
                "job %s: the database could not be reached (%s); released without spending "
                "an attempt, due again in %.1fs (release %d of at most %d in a row)",
                job.id,
                scrub(settle.error_text(error)),
                delay_ms / 1000,
                release,
                self.max_infrastructure_releases,
                extra=fields(job, duration_s),
            )
            settled = self._settle(
                job,
                lambda conn, now: settle.mark_released(
                    conn, job, store.saturating(now + delay_ms), error
                ),
            )
            self._record(job, Ending.RELEASED, settled, duration_s)
            return
        log.warning(
            "job %s failed: %s",
            job.id,
            scrub(settle.error_text(error)),
            extra=fields(job, duration_s),
        )
        settled = self._settle(
            job,
            lambda conn, now: settle.mark_failed(
                conn,
                job,
                error,
                now_ms=now,
                retry_base_ms=self.queue.retry_base_ms,
                retry_cap_ms=self.queue.retry_cap_ms,
            ),
        )
        self._record(job, Ending.FAILED, settled, duration_s)

    def _release_number(self, job: Job, error: BaseException) -> int | None:
        """Which release in a row this is, if the run is released for an infrastructure
        error; None when it counts as a failure."""
        if not is_infrastructure_error(error):
            return None
        with self._lock:
            count = self._releases.pop(job.id, 0) + 1
            if count > self.max_infrastructure_releases:
                return None
            self._releases[job.id] = count
            if len(self._releases) > _INFRASTRUCTURE_MEMORY:
                del self._releases[next(iter(self._releases))]
        return count

    def _settle(self, job: Job, statement: Callable[[Connection, int], bool]) -> bool | str | None:
        """Run one fenced settle in its own transaction, retried through database errors.

        Returns True if it matched; when it did not, the job may have been asked to stop:
        then it ends ``cancelled`` in the same transaction (``"cancelled"``); otherwise the
        claim was lost (False). None when the database stayed away."""

        @retried_on_deadlock
        def once() -> bool | str:
            with self.queue.transaction() as conn:
                now = self.queue.now_ms()
                if statement(conn, now):
                    return True
                return "cancelled" if settle.mark_cancelled(conn, job, now_ms=now) else False

        result: bool | str | None = retrying(once)
        return result

    def _record(
        self, job: Job, ending: Ending, settled: bool | str | None, duration: float
    ) -> None:
        """Count a run: ``settled`` True (it ended ``ending``), ``"cancelled"``, False (the
        lease was lost, nothing settled) or None (the database stayed away)."""
        if ending is not Ending.RELEASED and self._releases:
            with self._lock:
                self._releases.pop(job.id, None)
        if settled == "cancelled":
            self._count(job, Ending.CANCELLED, duration)
        elif settled is True:
            self._count(job, ending, duration)
        elif settled is False:
            log.warning(
                "job %s: lease lost before it was settled", job.id, extra=fields(job, duration)
            )
            if self.metrics is not None:
                self.metrics.on_finished(job, Ending.LEASE_LOST, duration)
        else:
            log.error(
                "job %s could not be settled; it runs again when its lease expires",
                job.id,
                extra=fields(job, duration),
            )

    def _count(self, job: Job, ending: Ending, duration: float) -> None:
        with self._lock:
            self.settled += 1
        log.debug("job %s %s", job.id, ending.value, extra=fields(job, duration))
        if self.metrics is not None:
            self.metrics.on_finished(job, ending, duration)
