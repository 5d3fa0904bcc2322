"""How a run ends, as values: what an executor returns and the completer settles.

An executor runs one handler and says what happened, without touching the queue:

- :class:`Done` — the handler returned and wrote nothing through ``ctx.session``; the
  completer settles it ``done`` in a batch with others.
- :class:`Committed` — the handler's own session committed its writes and the
  completion together (``settled``), or found the claim gone (not ``settled``).
- :class:`Failed`, :class:`Deferred` — settled by the completer, one each.
- :class:`LeaseLost` — the heartbeat found the lease gone while it ran: not settled.
- :class:`Unsettled` — the database file changed under the worker: not settled.

:class:`Ending` names how a run ended once settled; those strings are what logs and
metrics say, and there is no other list of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, TypeAlias

from memtree.types import Job, NewJob

if TYPE_CHECKING:
    from memtree.worker.context import Defer, Gate, JobContext

__all__ = [
    "Chain",
    "Committed",
    "Deferred",
    "Done",
    "Ending",
    "Failed",
    "LeaseLost",
    "Outcome",
    "Run",
    "Unsettled",
    "settles_in_the_database",
]


class Ending(StrEnum):
    """How a run ended: the ``outcome`` label of logs and metrics."""

    DONE = "done"
    FAILED = "failed"
    DEFERRED = "deferred"
    RELEASED = "released"
    CANCELLED = "cancelled"
    LEASE_LOST = "lease_lost"


@dataclass(frozen=True, slots=True)
class Done:
    followups: tuple[NewJob, ...] = ()


@dataclass(frozen=True, slots=True)
class Committed:
    settled: bool


@dataclass(frozen=True, slots=True)
class Failed:
    error: BaseException


@dataclass(frozen=True, slots=True)
class Deferred:
    defer: Defer


@dataclass(frozen=True, slots=True)
class LeaseLost:
    pass


@dataclass(frozen=True, slots=True)
class Unsettled:
    reason: str


Outcome: TypeAlias = Done | Committed | Failed | Deferred | LeaseLost | Unsettled


def settles_in_the_database(outcome: Outcome) -> bool:
    """Whether the completer has a statement to run for ``outcome`` (else it only counts)."""
    if isinstance(outcome, Committed):
        return not outcome.settled
    return isinstance(outcome, Failed | Deferred)


@dataclass(slots=True)
class Run:
    """A claim this worker holds, from dispatch to settle."""

    job: Job
    context: JobContext
    gate: Gate | None
    traced: bool
    started: float = field(default_factory=time.monotonic)
    #: Set once its completion is being committed: from then on the commit's fence, not
    #: the heartbeat, says whether the claim still held.
    settling: bool = False

    def duration_s(self) -> float:
        return time.monotonic() - self.started


@dataclass(slots=True)
class Chain:
    """What a finishing job hands its thread: the job it claimed to run next, if any,
    and the gate permits held while it claimed."""

    follower: Run | None = None
    reserved: list[Gate] = field(default_factory=list)
