"""What a handler sees and what it may return: the job's context, the registry of
handlers, gates, and :class:`Defer`.

Nothing here touches the database: a context hands out a session from the factory the
worker gave it, and the worker settles the run from the outcome. The two signals a
running job can receive (its lease was lost; someone asked it to stop) are set by the
worker's producer from its own thread, and each context delivers them the way its
handler waits: a ``threading.Event`` for a thread, an ``asyncio.Event`` for a coroutine.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeAlias

from memtree.errors import ConfigurationError
from memtree.limits import Gate, RateLimit
from memtree.types import Job, NewJob, check_kind

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    from memtree.queue import Queue

__all__ = [
    "AsyncHandler",
    "AsyncJobContext",
    "Defer",
    "Gate",
    "Handler",
    "Handlers",
    "JobContext",
    "RateLimit",
    "is_async_handler",
]

log = logging.getLogger("memtree.worker")

_EVENT_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class Defer:
    """Returned by a handler: not now. Reschedules without spending an attempt.

    Give exactly one of ``until_ms`` (epoch ms) or ``delay_ms`` (from now).
    """

    until_ms: int | None = None
    delay_ms: int | None = None
    reason: str = "deferred"

    def __post_init__(self) -> None:
        if (self.until_ms is None) == (self.delay_ms is None):
            raise ConfigurationError("Defer needs exactly one of until_ms or delay_ms")
        for name in ("until_ms", "delay_ms"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigurationError(f"Defer.{name} must be an int, not {value!r}")

    def resolve(self, now_ms: int) -> int:
        return self.until_ms if self.until_ms is not None else now_ms + (self.delay_ms or 0)


def _fields(job: Job) -> dict[str, Any]:
    return {"job_id": job.id, "kind": job.kind, "attempt": job.attempts}


class JobContext:
    """What a handler gets: the job, its payload, a settlement session, follow-ups."""

    def __init__(
        self,
        job: Job,
        queue: Queue,
        session_factory: Callable[[], Session],
    ) -> None:
        self.job = job
        self.queue = queue
        self._session_factory = session_factory
        self._session: Session | None = None
        self._followups: list[NewJob] = []
        # Set by the producer's thread; the events (made only when someone asks for
        # one: they cost more than the rest of a context) follow the flags.
        self._lost = False
        self._cancel = False
        self._events: dict[str, Any] = {}

    @cached_property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry the job's id, kind and attempt."""
        return logging.LoggerAdapter(log, _fields(self.job))

    @cached_property
    def payload(self) -> Any:
        """The job's payload, parsed."""
        return self.job.payload

    @property
    def session(self) -> Session:
        """A ``Session`` whose transaction is also the job's settlement: its writes commit
        with ``mark_done`` (and only if the lease still holds), or not at all."""
        if self._session is None:
            self._session = self._session_factory()
        return self._session

    @property
    def uses_session(self) -> bool:
        return self._session is not None

    @property
    def lease_lost(self) -> threading.Event:
        """Set when the heartbeat finds the lease gone: this run will not be settled."""
        event: threading.Event = self._event("lease_lost")
        return event

    @property
    def cancel_event(self) -> threading.Event:
        """Set when someone asked this job to stop (``Queue.cancel``); wait on it, or poll
        :attr:`cancelled`. A run that returns after the request ends ``cancelled``."""
        event: threading.Event = self._event("cancel")
        return event

    @property
    def cancelled(self) -> bool:
        """True once the job was asked to stop: finish up and return."""
        return self._cancel

    def enqueue(self, job: NewJob) -> None:
        """Enqueue a follow-up job when this one completes (atomically with it)."""
        if not isinstance(job, NewJob):
            raise TypeError(f"ctx.enqueue takes a NewJob, not {type(job).__name__}")
        self._followups.append(job)

    def now_ms(self) -> int:
        return self.queue.now_ms()

    # -- the producer's side -----------------------------------------------------------

    def _new_event(self) -> Any:
        return threading.Event()

    def _fire(self, event: Any) -> None:
        event.set()

    def _event(self, name: str) -> Any:
        event = self._events.get(name)
        if event is None:
            with _EVENT_LOCK:
                event = self._events.get(name)
                if event is None:
                    event = self._new_event()
                    self._events[name] = event
                    if self._lost if name == "lease_lost" else self._cancel:
                        self._fire(event)
        return event

    def _signal(self, name: str) -> bool:
        """Raise ``lease_lost`` or ``cancel``; False if it was raised already."""
        with _EVENT_LOCK:
            if self._lost if name == "lease_lost" else self._cancel:
                return False
            if name == "lease_lost":
                self._lost = True
            else:
                self._cancel = True
            event = self._events.get(name)
        if event is not None:
            self._fire(event)
        return True


class AsyncJobContext(JobContext):
    """The context of an ``async def`` handler: :attr:`session` is an ``AsyncSession`` in
    the settlement transaction, and the two signals are ``asyncio.Event`` s of the loop
    the handler runs on."""

    def __init__(
        self,
        job: Job,
        queue: Queue,
        session_factory: Callable[[], AsyncSession],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(job, queue, _no_sync_session)
        self._async_session_factory = session_factory
        self._async_session: AsyncSession | None = None
        self._loop = loop

    @property
    def session(self) -> AsyncSession:  # type: ignore[override]
        """An ``AsyncSession`` whose transaction is also the job's settlement: its writes
        commit with ``mark_done`` (and only if the lease still holds), or not at all."""
        if self._async_session is None:
            self._async_session = self._async_session_factory()
        return self._async_session

    @property
    def uses_session(self) -> bool:
        return self._async_session is not None

    @property
    def lease_lost(self) -> asyncio.Event:  # type: ignore[override]
        """Set when the heartbeat finds the lease gone: this run will not be settled."""
        event: asyncio.Event = self._event("lease_lost")
        return event

    @property
    def cancel_event(self) -> asyncio.Event:  # type: ignore[override]
        """Set when someone asked this job to stop; ``await ctx.cancel_event.wait()``."""
        event: asyncio.Event = self._event("cancel")
        return event

    def _new_event(self) -> Any:
        return asyncio.Event()

    def _fire(self, event: Any) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            event.set()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(event.set)


def _no_sync_session() -> Session:
    raise ConfigurationError("an async handler's context has an AsyncSession")


Handler: TypeAlias = Callable[[JobContext], "Defer | None"]
AsyncHandler: TypeAlias = Callable[[AsyncJobContext], Awaitable["Defer | None"]]


def is_async_handler(handler: object) -> bool:
    """Whether ``handler`` is an ``async def`` (or an object whose ``__call__`` is one)."""
    call = getattr(handler, "__call__", None)  # noqa: B004 - a callable object's own method
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


def check_handler(kind: str, handler: object) -> None:
    """A handler memtree can run, or :class:`ConfigurationError` now, at registration."""
    if not callable(handler):
        raise ConfigurationError(f"the handler for {kind!r} is not callable")


class Handlers(dict[str, "Handler | AsyncHandler"]):
    """A kind → handler mapping with a decorator to fill it; a handler is a plain
    function (run in a thread) or an ``async def`` (run on an event loop)::

    handlers = Handlers()

    @handlers.register("send_email")
    def send_email(ctx: JobContext) -> None: ...
    """

    def register(self, kind: str) -> Callable[[Any], Any]:
        check_kind(kind)

        def decorate(handler: Any) -> Any:
            check_handler(kind, handler)
            if kind in self:
                raise ConfigurationError(f"a handler for {kind!r} is already registered")
            self[kind] = handler
            return handler

        return decorate
