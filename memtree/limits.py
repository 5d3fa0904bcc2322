"""Limits on how many jobs of some kinds run: :class:`Gate` (at once) and :class:`RateLimit`
(starts per window).

A gate's ``scope`` says where its limit holds. ``"process"`` counts this worker's own
runs, in memory. ``"global"`` counts every worker process on the database: a permit is
held by a claim whose job is ``running`` under a lease that has not expired (on
PostgreSQL an unkeyed gate's permits are rows of ``mem_tree_permits`` naming their claim,
taken ``SKIP LOCKED``; otherwise the running rows of the gate's kinds are counted under
the gate's lock). A permit is therefore taken by the claim and in its transaction, freed
by whatever ends the run (its settle, a shutdown's release, the recovery of a dead
worker's lease), never outlives its lease, and a stale worker cannot free a permit its
claim no longer holds: its settle is fenced to the claim. A global gate with a ``key``
applies its limit per value of that payload field (at most one ``seal`` per tree).

A rate limit counts starts (claims) in a sliding window on the database's clock, per
value of its ``key`` field when it has one, each start weighing 1 or its ``weight``
field. Its ledger is ``mem_tree_rate_events``; an application consumes from the same
budget in its own transaction with :func:`memtree.consume`.

Neither holds anything between claims: a full gate or a spent window leaves its kinds
unclaimed, and the worker claims other kinds meanwhile and looks again when a permit
frees (PostgreSQL notifies it), a lease or the window runs out, or its poll interval
passes.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any, Literal

from memtree.errors import ConfigurationError

__all__ = ["Gate", "Limit", "RateLimit", "lock_key"]

#: Where a gate's limit holds.
Scope = Literal["process", "global"]

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
#: The first of the two keys of every limit's PostgreSQL advisory lock ("mtlm").
LOCK_CLASS = 0x6D746C6D


def lock_key(name: str) -> tuple[int, int]:
    """The ``(class, object)`` pair of ``name``'s advisory lock, the same in every process."""
    objid = zlib.crc32(name.encode("utf-8"))
    return LOCK_CLASS, objid - 2**32 if objid >= 2**31 else objid


def _check(owner: str, name: object, limit: object, kinds: object, key: object) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{owner} needs a name, not {name!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigurationError(f"{owner} {name!r} needs a limit >= 1, not {limit!r}")
    if isinstance(kinds, str) or not kinds:
        raise ConfigurationError(f"{owner} {name!r} needs a collection of kinds, not {kinds!r}")
    if key is not None and (not isinstance(key, str) or not _FIELD.match(key)):
        raise ConfigurationError(
            f"{owner} {name!r}: key must name a top-level payload field, not {key!r}"
        )


@dataclass(frozen=True, slots=True)
class Gate:
    """At most ``limit`` jobs of ``kinds`` run at once: in this worker process
    (``scope="process"``, the default) or across every worker on the database
    (``scope="global"``), per value of the payload field ``key`` if given."""

    name: str
    limit: int
    kinds: tuple[str, ...]
    scope: Scope = "process"
    key: str | None = None

    def __post_init__(self) -> None:
        _check("gate", self.name, self.limit, self.kinds, self.key)
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if self.scope not in ("process", "global"):
            raise ConfigurationError(
                f"gate {self.name!r}: scope is 'process' or 'global', not {self.scope!r}"
            )
        if self.key is not None and self.scope != "global":
            raise ConfigurationError(f"gate {self.name!r}: a key needs scope='global'")

    @property
    def is_global(self) -> bool:
        return self.scope == "global"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``limit`` starts of ``kinds`` in any ``window_s`` seconds across every
    worker on the database (and every :func:`memtree.consume`), per value of the payload
    field ``key`` if given; a start weighs 1, or the integer in payload field ``weight``."""

    name: str
    limit: int
    window_s: float
    kinds: tuple[str, ...]
    key: str | None = None
    weight: str | None = None

    def __post_init__(self) -> None:
        _check("rate limit", self.name, self.limit, self.kinds, self.key)
        object.__setattr__(self, "kinds", tuple(self.kinds))
        window = self.window_s
        if isinstance(window, bool) or not isinstance(window, int | float) or not window > 0:
            raise ConfigurationError(
                f"rate limit {self.name!r} needs a window_s > 0, not {window!r}"
            )
        if window * 1000 > 2**40:
            raise ConfigurationError(f"rate limit {self.name!r}: window_s {window} is too long")
        if self.weight is not None and (
            not isinstance(self.weight, str) or not _FIELD.match(self.weight)
        ):
            raise ConfigurationError(
                f"rate limit {self.name!r}: weight must name a top-level payload field, "
                f"not {self.weight!r}"
            )

    @property
    def window_ms(self) -> int:
        return max(1, round(self.window_s * 1000))

    def weight_of(self, payload: Any) -> int:
        """The weight of a start with this payload: 1, or its ``weight`` field (at least 1,
        and at most the limit: a job heavier than the whole budget would never run)."""
        if self.weight is None or not isinstance(payload, dict):
            return 1
        value = payload.get(self.weight, 1)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return 1
        return min(max(int(value), 1), self.limit)


#: What limits the claims of some kinds across the fleet: a global gate, a rate limit, or
#: both. (A process gate is the producer's own business: it never reaches the database.)
@dataclass(frozen=True, slots=True)
class Limit:
    gate: Gate | None = None
    rate: RateLimit | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(x.name for x in (self.gate, self.rate) if x is not None)

    @property
    def partitioned(self) -> bool:
        """Whether a claim must look at each job: a key, or a weight."""
        return bool(
            (self.gate is not None and self.gate.key)
            or (self.rate is not None and (self.rate.key or self.rate.weight))
        )
