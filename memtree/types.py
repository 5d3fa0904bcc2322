"""The values memtree passes around: statuses, failures, jobs to enqueue and claimed jobs.

Nothing here touches a database. Wire strings (statuses, failure classes) are
``StrEnum`` members so they compare equal to the strings stored in ``mem_tree_jobs``,
the table memtree shares with the original Rust crate. Kinds are any non-empty string;
no kind is special here (the memory tree's live in :mod:`memtree.tree.kinds`).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import accumulate, repeat
from typing import Any

from memtree.errors import ConfigurationError, InvalidJobError

__all__ = [
    "DEFAULT_LOCK_DURATION_MS",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_DEFER_AGE_MS",
    "DEFAULT_SELF_HEAL_LIMIT",
    "MAX_DEDUPE_KEY_BYTES",
    "MAX_KIND_BYTES",
    "MAX_MS",
    "MAX_PAYLOAD_DEPTH",
    "RETRY_BASE_MS",
    "RETRY_CAP_MS",
    "CancelOutcome",
    "FailureClass",
    "Job",
    "JobFailure",
    "JobStatus",
    "NewJob",
    "Payload",
    "SettledBatch",
    "backoff_ms",
    "check_kinds",
    "decode_payload",
    "find_failure",
]

#: The lease of a claim: a worker that dies mid-job has its row recovered after this.
DEFAULT_LOCK_DURATION_MS = 5 * 60 * 1000
#: Attempts a job gets when its ``NewJob`` does not say.
DEFAULT_MAX_ATTEMPTS = 5
#: First retry delay; doubles with every attempt after it.
RETRY_BASE_MS = 60 * 1000
#: Longest retry delay.
RETRY_CAP_MS = 60 * 60 * 1000
#: A job deferred for longer than this since it was created fails ``defer_age_exceeded``.
DEFAULT_MAX_DEFER_AGE_MS = 7 * 24 * 60 * 60 * 1000
#: Times self-heal revives one failed job before it stays failed (0 turns self-heal off).
DEFAULT_SELF_HEAL_LIMIT = 3
#: Largest time memtree stores (the columns are signed 64-bit).
MAX_MS = 2**63 - 1
#: Longest kind, in UTF-8 bytes. Kinds are indexed, and an index entry must fit a page.
MAX_KIND_BYTES = 255
#: Longest dedupe key, in UTF-8 bytes (a PostgreSQL B-tree entry holds at most ~2.7 kB).
MAX_DEDUPE_KEY_BYTES = 2000
#: Deepest nesting of arrays and objects in a payload (``[]`` is 1 deep). Fixed, so whether
#: a payload is accepted never depends on how deep the caller's stack is, and far below
#: what any thread can parse (and below serde_json's 128, so the original crate reads it too).
MAX_PAYLOAD_DEPTH = 100
_MAX_INT32 = 2**31 - 1


class JobStatus(StrEnum):
    """Where a job is in its life (the ``status`` column)."""

    READY = "ready"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True when no worker will move the job again without an operator."""
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


class FailureClass(StrEnum):
    """Whether retrying a failed job can help (the ``failure_class`` column)."""

    TRANSIENT = "transient"
    UNRECOVERABLE = "unrecoverable"


class CancelOutcome(StrEnum):
    """What :meth:`memtree.Queue.cancel` did."""

    #: The job was ready: it is cancelled now, and its dedupe key is free.
    CANCELLED = "cancelled"
    #: The job is running: its worker was asked to stop; it ends cancelled when its handler returns.
    REQUESTED = "requested"
    #: The job had already finished (done, failed or cancelled): nothing changed.
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class SettledBatch:
    """What a batched ``done`` settle (:meth:`memtree.Queue.complete_and_claim`) did.

    A claim of the batch is in ``settled``, or in ``locked``, or in neither: then its
    lease was lost (recovered, released, claimed again) or its job was asked to stop.
    """

    #: The jobs settled ``done``.
    settled: frozenset[str] = frozenset()
    #: Jobs still held by their claim whose row another session holds locked
    #: (PostgreSQL): skipped rather than waited for, not settled; settle them again.
    locked: frozenset[str] = frozenset()


class JobFailure(Exception):
    """A classified failure: raise it (or chain it) from a handler to say whether to retry.

    An unrecoverable failure ends the job at once; a transient one follows the usual
    attempts-bounded retry with backoff.
    """

    def __init__(self, code: str, failure_class: FailureClass | str) -> None:
        if not isinstance(code, str) or not code:
            raise InvalidJobError("a JobFailure code must be a non-empty string")
        self.code = code
        self.failure_class = FailureClass(failure_class)
        super().__init__(code, self.failure_class.value)

    @classmethod
    def transient(cls, code: str) -> JobFailure:
        return cls(code, FailureClass.TRANSIENT)

    @classmethod
    def unrecoverable(cls, code: str) -> JobFailure:
        return cls(code, FailureClass.UNRECOVERABLE)

    @classmethod
    def budget_exhausted(cls) -> JobFailure:
        return cls.unrecoverable("budget_exhausted")

    @property
    def is_unrecoverable(self) -> bool:
        return self.failure_class is FailureClass.UNRECOVERABLE

    def __str__(self) -> str:
        return f"{self.code} ({self.failure_class.value})"

    def __repr__(self) -> str:
        return f"JobFailure({self.code!r}, {self.failure_class.value!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JobFailure):
            return NotImplemented
        return (self.code, self.failure_class) == (other.code, other.failure_class)

    def __hash__(self) -> int:
        return hash((self.code, self.failure_class))


def _exception_chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ if current.__cause__ is not None else current.__context__


def find_failure(error: object) -> JobFailure | None:
    """The first :class:`JobFailure` in an exception's cause/context chain, if any."""
    if not isinstance(error, BaseException):
        return None
    for link in _exception_chain(error):
        if isinstance(link, JobFailure):
            return link
    return None


def backoff_ms(
    attempts_so_far: int, *, base_ms: int = RETRY_BASE_MS, cap_ms: int = RETRY_CAP_MS
) -> int:
    """Delay before the next retry: ``base * 2**(attempts - 1)``, at most ``cap_ms``.

    ``attempts_so_far`` counts the attempt that just failed, so the first retry waits
    ``base_ms`` (60 s by default), the second twice that, and so on.
    """
    exponent = min(max(attempts_so_far - 1, 0), 20)
    return int(min(base_ms * (1 << exponent), cap_ms))


def check_ms(name: str, value: object) -> int:
    """``value`` as a time in epoch milliseconds, or :class:`InvalidJobError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidJobError(f"{name} must be an integer number of milliseconds, not {value!r}")
    if not -MAX_MS - 1 <= value <= MAX_MS:
        raise InvalidJobError(f"{name} {value} does not fit in a signed 64-bit integer")
    return value


def _check_text(name: str, value: object, *, max_bytes: int | None = None) -> str:
    if not isinstance(value, str):
        raise InvalidJobError(f"{name} must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidJobError(f"{name} must not be empty")
    if "\x00" in value:
        raise InvalidJobError(f"{name} must not contain NUL characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidJobError(f"{name} is not valid Unicode text: {exc.reason}") from None
    if max_bytes is not None and size > max_bytes:
        raise InvalidJobError(f"{name} is {size} bytes long; at most {max_bytes} are allowed")
    return value


def check_kind(kind: object, retired: tuple[str, ...] = ()) -> str:
    """``kind`` as a storable kind string, or :class:`InvalidJobError`; a kind in
    ``retired`` (a queue's retired kinds, which it never claims) is refused too."""
    text = _check_text("kind", kind, max_bytes=MAX_KIND_BYTES)
    if text in retired:
        raise InvalidJobError(f"kind {text!r} is retired and would never be claimed")
    return text


def check_kinds(name: str, kinds: Iterable[str], retired: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A queue setting naming kinds (``claim_order``, ``retired_kinds``) as a tuple of
    distinct kind strings, none in ``retired``, or :class:`ConfigurationError`."""
    if isinstance(kinds, str):
        raise ConfigurationError(f"{name} must be a sequence of kinds, not one string")
    try:
        checked = tuple(check_kind(kind, retired) for kind in kinds)
    except ValueError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None
    if len(set(checked)) != len(checked):
        raise ConfigurationError(f"{name} names a kind twice")
    return checked


class Payload(ABC):
    """A typed payload: its wire JSON value and its dedupe key. A :class:`NewJob` stores
    ``to_wire()``; the memory tree's payloads (:mod:`memtree.tree.payloads`) are these."""

    @abstractmethod
    def to_wire(self) -> Any: ...

    @abstractmethod
    def dedupe_key(self) -> str: ...


#: One encoder for every payload: ``json.dumps`` with options builds a new one per call.
_PAYLOAD_ENCODER = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":"))
#: Drops every ASCII character but brackets (``str.translate`` is fastest on ASCII); any
#: other character left over counts 0 in the running sum below.
_ONLY_BRACKETS = {code: None for code in range(128) if chr(code) not in "[]{}"}
_NESTING_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _nests_too_deep(text: str) -> bool:
    """Whether ``text`` nests arrays and objects deeper than :data:`MAX_PAYLOAD_DEPTH`.

    Iterative, so it answers for any depth in any thread. Text with no more brackets than
    the limit (nearly every payload) is answered by two counts; the rest drops escapes
    (only strings hold them) and then the strings (what lies between an odd quote and the
    next), and sums the brackets left over: all in C, a few times cheaper than parsing.
    """
    if text.count("[") + text.count("{") <= MAX_PAYLOAD_DEPTH:
        return False
    if "\\" in text:
        text = text.replace("\\\\", "").replace('\\"', "")
    brackets = "".join(text.split('"')[::2]).translate(_ONLY_BRACKETS)
    depths = accumulate(map(_NESTING_STEP.get, brackets, repeat(0)))
    return max(depths, default=0) > MAX_PAYLOAD_DEPTH


_TOO_DEEP = f"nested more than {MAX_PAYLOAD_DEPTH} levels deep (MAX_PAYLOAD_DEPTH)"


def encode_payload(payload: object) -> str:
    """Serialise a payload to the ``payload_json`` text, or :class:`InvalidJobError`."""
    value = payload.to_wire() if isinstance(payload, Payload) else payload
    try:
        text = _PAYLOAD_ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise InvalidJobError(f"payload is not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise InvalidJobError(f"payload is {_TOO_DEEP}") from None
    if _nests_too_deep(text):
        raise InvalidJobError(f"payload is {_TOO_DEEP}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidJobError(
            f"payload holds text that is not valid Unicode: {exc.reason}"
        ) from None
    return text


def decode_payload(text: str) -> Any:
    """Parse ``payload_json`` text; ``ValueError`` if it is not JSON (NaN and infinities are
    not) or nests deeper than :data:`MAX_PAYLOAD_DEPTH`, never ``RecursionError``."""
    if not isinstance(text, str):
        raise ValueError(f"payload_json is {type(text).__name__}, not text")
    if _nests_too_deep(text):
        raise ValueError(f"payload is {_TOO_DEEP}")
    return json.loads(text, parse_constant=_reject_constant)


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to enqueue. Validated when built, so a bad job never reaches the database.

    ``payload`` is any JSON value (NaN and infinities are not JSON) or a :class:`Payload`.
    A job is due at once, at ``available_at_ms`` (epoch ms), or ``delay_ms`` after it is
    enqueued, on the queue's clock (the database's): a delay is the spelling that holds
    when the enqueuing host's clock is off.
    """

    kind: str
    payload: Any = None
    dedupe_key: str | None = None
    available_at_ms: int | None = None
    max_attempts: int | None = None
    delay_ms: int | None = None
    payload_json: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_kind(self.kind)
        if self.dedupe_key is not None:
            _check_text("dedupe_key", self.dedupe_key, max_bytes=MAX_DEDUPE_KEY_BYTES)
        if self.available_at_ms is not None:
            check_ms("available_at_ms", self.available_at_ms)
        if self.delay_ms is not None:
            if self.available_at_ms is not None:
                raise InvalidJobError("give available_at_ms or delay_ms, not both")
            check_ms("delay_ms", self.delay_ms)
            if self.delay_ms < 0:
                raise InvalidJobError(f"delay_ms must not be negative, not {self.delay_ms}")
        if self.max_attempts is not None:
            if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
                raise InvalidJobError(f"max_attempts must be an integer, not {self.max_attempts!r}")
            if not 1 <= self.max_attempts <= _MAX_INT32:
                raise InvalidJobError(f"max_attempts must be between 1 and {_MAX_INT32}")
        object.__setattr__(self, "payload_json", encode_payload(self.payload))


@dataclass(frozen=True, slots=True)
class Job:
    """One ``mem_tree_jobs`` row as read at a moment: the 15 wire columns plus memtree's own
    (lease token, cancel request, heal count).

    A ``Job`` returned by a claim carries the claim's ``lease_token``; every settle is
    fenced to it, so a worker whose lease was recovered or re-claimed cannot settle.
    """

    id: str
    kind: str
    payload_json: str
    dedupe_key: str | None
    status: JobStatus
    attempts: int
    max_attempts: int
    available_at_ms: int
    locked_until_ms: int | None
    last_error: str | None
    created_at_ms: int
    started_at_ms: int | None
    completed_at_ms: int | None
    failure_reason: str | None
    failure_class: str | None
    lease_token: str | None = None
    cancel_requested_at_ms: int | None = None
    heal_count: int = 0

    @property
    def payload(self) -> Any:
        """The payload, parsed from ``payload_json`` (``ValueError`` if it is not JSON or
        nests deeper than :data:`MAX_PAYLOAD_DEPTH`; see :func:`decode_payload`)."""
        return decode_payload(self.payload_json)


def _reject_constant(name: str) -> float:
    raise ValueError(f"payload_json holds {name}, which is not JSON")
