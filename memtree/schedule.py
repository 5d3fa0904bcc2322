"""Periodic jobs: a :class:`Schedule`, the slots it is due at, and the tick that enqueues
each slot once across every process that ticks it.

A slot is an instant in epoch milliseconds on the queue's clock (:meth:`Queue.now_ms`,
which reads the database's clock unless the queue was given a test clock), so every
process computes the same slots from the same time. Cron expressions are read by
``cronsim`` in a ``zoneinfo`` time zone; fixed intervals are anchored to the epoch
(``floor(now / every) * every``), so they need no zone and no shared start.

A tick, in one transaction: compute the latest due slot, move the schedule's row in
``mem_tree_schedules`` to it by a compare-and-set (:func:`memtree.store.advance_schedule`),
and only if that moved it enqueue the slot's job. The row fences the slot, not the job's
dedupe key: a slot whose job is done already is not enqueued again.

A slot is *on time* when the tick sees it at most ``max(grace, tick interval)`` after it
began; a later one was missed (no process ticked in time), and the schedule's
``missed`` policy says whether its job runs late, once, or is skipped. Slots between the
last one recorded and the latest due one are never enqueued one by one.

This module builds no statement (they are in :mod:`memtree.store`) and never reads the
wall clock itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field, replace
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from memtree import store, wakeup
from memtree.errors import ConfigurationError
from memtree.queue import Queue
from memtree.retries import deadlock_retries
from memtree.types import NewJob, check_kind

__all__ = [
    "DEFAULT_GRACE_S",
    "SCHEDULE_TICK_S",
    "Missed",
    "Schedule",
    "Tick",
    "Ticker",
    "tick",
]

log = logging.getLogger("memtree.schedule")

#: How late a slot may be seen and still count as on time, unless a schedule says.
DEFAULT_GRACE_S = 60.0
#: How often a worker ticks each of its schedules (an interval shorter than this: every
#: interval).
SCHEDULE_TICK_S = 1.0

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class Missed(StrEnum):
    """What a tick does with a slot it sees too late (no process ticked in time)."""

    #: Enqueue the latest missed slot's job now, once.
    RUN_ONCE = "run_once"
    #: Record the slot without enqueueing; the next slot seen on time runs.
    SKIP = "skip"


@dataclass(frozen=True)
class Schedule:
    """A periodic job: ``kind`` enqueued at every slot of ``cron`` or of ``every``.

    - ``name``: the schedule's row in ``mem_tree_schedules``; every process ticking a
      schedule of that name shares its slots.
    - ``cron``: a cron expression (five fields; six put seconds first, as cronsim reads
      them) in ``timezone`` (a ``zoneinfo`` name, ``"UTC"`` by default).
    - ``every``: seconds (or a ``timedelta``) between slots, anchored to the epoch; a
      ``timezone`` other than UTC is refused, since an interval has none.
    - ``payload``: the job's payload; or ``job``, a callable building the slot's
      ``NewJob`` from the slot's epoch ms (its own dedupe key, if it sets one, is kept).
    - ``missed``: ``"run_once"`` (the default) or ``"skip"``, for a slot seen later than
      ``grace`` (seconds or a ``timedelta``, :data:`DEFAULT_GRACE_S` by default).
    - ``max_attempts``: the job's attempts (the queue's by default; not with ``job``).

    Validated when built: a bad cron, an unknown zone, a nonpositive interval and the
    like are a :class:`ConfigurationError` naming the schedule.
    """

    name: str
    kind: str
    _: KW_ONLY
    cron: str | None = None
    every: float | timedelta | None = None
    timezone: str = "UTC"
    payload: Any = None
    job: Callable[[int], NewJob] | None = None
    missed: Missed | Literal["run_once", "skip"] = Missed.RUN_ONCE
    grace: float | timedelta = DEFAULT_GRACE_S
    max_attempts: int | None = None
    #: ``every`` in milliseconds; None for a cron schedule.
    every_ms: int | None = field(init=False, repr=False)
    #: ``grace`` in milliseconds.
    grace_ms: int = field(init=False, repr=False)
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigurationError(f"a schedule needs a non-empty name, not {self.name!r}")
        what = f"schedule {self.name!r}"
        try:
            check_kind(self.kind)
        except ValueError as exc:
            raise ConfigurationError(f"{what}: {exc}") from None
        if (self.cron is None) == (self.every is None):
            raise ConfigurationError(f"{what} needs exactly one of cron= and every=")
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ConfigurationError(f"{what}: unknown time zone {self.timezone!r}") from None
        object.__setattr__(self, "_zone", zone)
        every_ms = None
        if self.every is not None:
            if self.timezone != "UTC":
                raise ConfigurationError(
                    f"{what}: an interval is anchored to the epoch and has no time zone; "
                    "use cron= for wall times in a zone"
                )
            every_ms = _to_ms(self.every, f"{what}: every")
            if every_ms < 1:
                raise ConfigurationError(f"{what}: every must be > 0, not {self.every!r}")
        else:
            if not isinstance(self.cron, str):
                raise ConfigurationError(f"{what}: cron must be a string, not {self.cron!r}")
            try:
                CronSim(self.cron, _EPOCH.astimezone(zone))
            except CronSimError as exc:
                raise ConfigurationError(f"{what}: bad cron {self.cron!r}: {exc}") from None
        object.__setattr__(self, "every_ms", every_ms)
        grace_ms = _to_ms(self.grace, f"{what}: grace")
        if grace_ms < 0:
            raise ConfigurationError(f"{what}: grace must be >= 0, not {self.grace!r}")
        object.__setattr__(self, "grace_ms", grace_ms)
        try:
            object.__setattr__(self, "missed", Missed(self.missed))
        except ValueError:
            raise ConfigurationError(
                f"{what}: missed must be 'run_once' or 'skip', not {self.missed!r}"
            ) from None
        if self.job is not None:
            if not callable(self.job):
                raise ConfigurationError(f"{what}: job must be a callable slot_ms -> NewJob")
            if self.payload is not None or self.max_attempts is not None:
                raise ConfigurationError(
                    f"{what}: give the job's payload and max_attempts in the NewJob job= builds"
                )
        else:
            try:  # the payload is checked now, not at the first slot
                self.new_job(0)
            except ValueError as exc:
                raise ConfigurationError(f"{what}: {exc}") from None

    # -- slots -------------------------------------------------------------------------

    def slot_at(self, now_ms: int) -> int | None:
        """The latest slot at or before ``now_ms``; None when the cron has none (cronsim
        looks 50 years back)."""
        if self.every_ms is not None:
            return now_ms // self.every_ms * self.every_ms
        assert self.cron is not None
        # cronsim steps strictly before its start: start just after now so now itself counts.
        found = next(CronSim(self.cron, _instant(now_ms + 1, self._zone), reverse=True), None)
        return None if found is None else _epoch_ms(found)

    def next_slot(self, now_ms: int) -> int | None:
        """The first slot after ``now_ms``; None when the cron has none (within 50 years)."""
        if self.every_ms is not None:
            return (now_ms // self.every_ms + 1) * self.every_ms
        assert self.cron is not None
        found = next(CronSim(self.cron, _instant(now_ms, self._zone)), None)
        return None if found is None else _epoch_ms(found)

    # -- jobs --------------------------------------------------------------------------

    def dedupe_key(self, slot_ms: int) -> str:
        """The dedupe key of a slot's job, unless ``job`` gives its own."""
        return f"schedule:{self.name}:{slot_ms}"

    def new_job(self, slot_ms: int) -> NewJob:
        """The job of the slot at ``slot_ms``."""
        if self.job is None:
            return NewJob(
                self.kind,
                self.payload,
                dedupe_key=self.dedupe_key(slot_ms),
                max_attempts=self.max_attempts,
            )
        job = self.job(slot_ms)
        if not isinstance(job, NewJob) or job.kind != self.kind:
            raise ConfigurationError(
                f"schedule {self.name!r}: job= must build a NewJob of kind {self.kind!r}, "
                f"not {job!r}"
            )
        return (
            job if job.dedupe_key is not None else replace(job, dedupe_key=self.dedupe_key(slot_ms))
        )


@dataclass(frozen=True, slots=True)
class Tick:
    """What one tick of a schedule did."""

    #: The latest due slot (epoch ms); None when the cron has none.
    slot_ms: int | None
    #: Whether this tick recorded the slot (no other tick had).
    recorded: bool = False
    #: Whether the slot was seen later than its grace.
    late: bool = False
    #: The job this tick enqueued; None when it enqueued none (the slot was recorded
    #: already, was skipped, or its job's dedupe key was active).
    job_id: str | None = None


def tick(
    queue: Queue,
    schedule: Schedule,
    *,
    tick_interval_s: float = 0.0,
    known_slot_ms: int | None = None,
) -> Tick:
    """Enqueue ``schedule``'s latest due slot unless some tick, here or in any other
    process, already recorded it; safe to call from every process at once.

    ``tick_interval_s`` is how often the caller ticks: a slot is on time when seen at most
    ``max(grace, tick_interval_s)`` after it. ``known_slot_ms`` is a slot the caller knows
    recorded already (its last tick's): a slot no later costs no transaction.
    """
    now = queue.now_ms()
    slot = schedule.slot_at(now)
    if slot is None or (known_slot_ms is not None and slot <= known_slot_ms):
        return Tick(slot)
    late = now - slot > max(schedule.grace_ms, math.ceil(tick_interval_s * 1000))
    job = None if late and schedule.missed == Missed.SKIP else schedule.new_job(slot)
    if job is not None and job.kind in queue.retired_kinds:
        raise ConfigurationError(f"schedule {schedule.name!r}: kind {job.kind!r} is retired")
    for attempt in deadlock_retries():
        with attempt, queue.transaction() as conn:
            recorded = store.advance_schedule(conn, schedule.name, slot_ms=slot, now_ms=now)
            job_id = None
            if recorded and job is not None:
                job_id = store.enqueue(
                    conn, job, now_ms=now, default_max_attempts=queue.max_attempts
                )
    if job_id is not None:
        wakeup.signal(queue.engine)
    if recorded:
        moment = _instant(slot, UTC).isoformat(timespec="seconds")
        if job is None:
            log.info("schedule %s: slot %s missed, skipped", schedule.name, moment)
        else:
            log.info(
                "schedule %s: slot %s%s enqueued%s",
                schedule.name,
                moment,
                " (late)" if late else "",
                "" if job_id else " nothing (its dedupe key is active)",
            )
    return Tick(slot, recorded=recorded, late=late, job_id=job_id)


class Ticker:
    """Ticks one schedule in one process, every ``interval_s`` (a worker's upkeep task).

    It remembers the last slot it saw recorded, so a tick inside that slot reads the
    clock and nothing else: a transaction runs once per slot per process.
    """

    def __init__(self, schedule: Schedule, interval_s: float) -> None:
        self.schedule = schedule
        self.interval_s = interval_s
        self._known_ms: int | None = None

    def __call__(self, queue: Queue) -> Tick:
        done = tick(
            queue, self.schedule, tick_interval_s=self.interval_s, known_slot_ms=self._known_ms
        )
        if done.slot_ms is not None:
            # Recorded by this tick or by another's: either way the row holds it now.
            self._known_ms = done.slot_ms
        return done


def _to_ms(value: object, what: str) -> int:
    if isinstance(value, timedelta):
        return value // _MS
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{what} must be a number of seconds or a timedelta")
    return round(value * 1000)


def _instant(ms: int, zone: tzinfo) -> datetime:
    # Arithmetic in UTC, then into the zone: wall-clock arithmetic would be wrong across DST.
    return (_EPOCH + ms * _MS).astimezone(zone)


def _epoch_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // _MS
