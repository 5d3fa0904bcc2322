"""The worker: claims the kinds it has handlers for, runs them in threads, settles them.

One loop thread owns the queue's rhythm: it settles finished jobs in batches, extends
the leases of running ones (the heartbeat), runs maintenance on its intervals, and
claims exactly as many jobs as it has free slots and gate permits. Handlers run in
``concurrency`` daemon threads. The worker never builds a statement: every read and
write goes through :class:`memtree.Queue` and the store/settle functions.

Completion is transactional. A handler that touches ``ctx.session`` has its writes,
its follow-up jobs and ``mark_done`` committed in that one session, fenced to its
lease; a handler that raises or defers has its session rolled back. A handler that
never touches the session is settled with others in one batched statement.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue as queue_module
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeAlias

from sqlalchemy import Connection, Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from memtree import settle, store, tracing, wakeup
from memtree.config import positive_int, seconds
from memtree.dberrors import classify_error, is_infrastructure_error
from memtree.engine import configure_engine, handler_connection, sqlite_file
from memtree.errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseFileChangedError,
    MemtreeError,
)
from memtree.maintenance import Upkeep, enqueue_flush_stale
from memtree.queue import Queue
from memtree.redact import scrub
from memtree.types import (
    DEFAULT_SELF_HEAL_LIMIT,
    Job,
    JobKind,
    NewJob,
    SettledBatch,
    backoff_ms,
    check_kind,
)

if TYPE_CHECKING:
    from memtree.metrics import Metrics

__all__ = [
    "DEFAULT_GATES",
    "DEFAULT_MAX_INFRASTRUCTURE_RELEASES",
    "INFRASTRUCTURE_RETRY_BASE_MS",
    "INFRASTRUCTURE_RETRY_CAP_MS",
    "Defer",
    "Gate",
    "Handler",
    "Handlers",
    "JobContext",
    "Worker",
    "classify_error",
    "is_infrastructure_error",
]

log = logging.getLogger("memtree.worker")

_EVENT_LOCK = threading.Lock()

# The longest a finished job waits to be settled in a batch with others.
_FLUSH_DELAY_S = 0.01
#: How soon a finished job whose row another session held locked is settled again.
_LOCKED_RETRY_S = 0.1

#: Runs of one job in a row this worker releases after an infrastructure error, attempt
#: given back, before the next such run counts as a failure like any other.
DEFAULT_MAX_INFRASTRUCTURE_RELEASES = 10
#: The first release after an infrastructure error waits this long; it doubles per release.
INFRASTRUCTURE_RETRY_BASE_MS = 1_000
#: The longest wait after an infrastructure error.
INFRASTRUCTURE_RETRY_CAP_MS = 60_000
# Jobs whose infrastructure releases a worker remembers (the oldest are forgotten).
_INFRASTRUCTURE_MEMORY = 10_000


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


@dataclass(frozen=True, slots=True)
class Gate:
    """A concurrency limit shared by kinds: at most ``limit`` of them run at once here."""

    name: str
    limit: int
    kinds: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ConfigurationError(f"gate {self.name!r} needs a limit >= 1, not {self.limit!r}")
        object.__setattr__(self, "kinds", tuple(self.kinds))


#: The original's LLM gate: one LLM-bound job at a time per worker.
DEFAULT_GATES: tuple[Gate, ...] = (
    Gate(
        "llm",
        1,
        (JobKind.EXTRACT_CHUNK, JobKind.SEAL, JobKind.REEMBED_BACKFILL, JobKind.SEAL_DOCUMENT),
    ),
)


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
        # Events cost more than the rest of a context: made only when someone asks.
        self._lease_lost: threading.Event | None = None
        self._cancel_event: threading.Event | None = None
        self._session_factory = session_factory
        self._session: Session | None = None
        self._followups: list[NewJob] = []

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
    def lease_lost(self) -> threading.Event:
        """Set when the heartbeat finds the lease gone: this run will not be settled."""
        return self._event("_lease_lost")

    @property
    def cancel_event(self) -> threading.Event:
        """Set when someone asked this job to stop (``Queue.cancel``); wait on it, or poll
        :attr:`cancelled`. A run that returns after the request ends ``cancelled``."""
        return self._event("_cancel_event")

    def _event(self, name: str) -> threading.Event:
        event: threading.Event | None = getattr(self, name)
        if event is None:
            with _EVENT_LOCK:
                event = getattr(self, name)
                if event is None:
                    event = threading.Event()
                    setattr(self, name, event)
        return event

    def _is_set(self, name: str) -> bool:
        event: threading.Event | None = getattr(self, name)
        return event is not None and event.is_set()

    @property
    def cancelled(self) -> bool:
        """True once the job was asked to stop: finish up and return."""
        return self._is_set("_cancel_event")

    @property
    def uses_session(self) -> bool:
        return self._session is not None

    def enqueue(self, job: NewJob) -> None:
        """Enqueue a follow-up job when this one completes (atomically with it)."""
        if not isinstance(job, NewJob):
            raise TypeError(f"ctx.enqueue takes a NewJob, not {type(job).__name__}")
        self._followups.append(job)

    def now_ms(self) -> int:
        return self.queue.now_ms()

    def _close(self, *, commit: bool) -> None:
        session = self._session
        if session is None:
            return
        try:
            if commit:
                session.commit()
            else:
                session.rollback()
        finally:
            session.close()
            release = session.info.pop(_RELEASE_CONNECTION, None)
            if release is not None:
                release()


Handler: TypeAlias = Callable[[JobContext], "Defer | None"]

#: ``Session.info`` key: closes the handler connection a session was bound to.
_RELEASE_CONNECTION = "memtree.release_connection"


def _check_handler(kind: str, handler: object) -> None:
    """A handler memtree can run, or :class:`ConfigurationError` now, at registration."""
    if not callable(handler):
        raise ConfigurationError(f"the handler for {kind!r} is not callable")
    call = getattr(handler, "__call__", None)  # noqa: B004 - a callable object's own method
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call):
        raise ConfigurationError(
            f"the handler for {kind!r} is an async def: memtree's worker runs handlers in "
            "threads and has no asyncio executor yet, so it would never be awaited. Write "
            "it as a plain def (run a coroutine inside it with asyncio.run(...))"
        )


def _session_opener(
    queue: Queue, session_factory: Callable[[], Session] | None = None
) -> Callable[[], Session]:
    """What builds ``ctx.session``: ``session_factory``, or a ``Session`` on the queue's engine.

    On SQLite the session is bound to a :func:`memtree.engine.handler_connection`, whose
    transaction begins at its first write, so a handler that reads and then waits holds
    no lock meanwhile. That holds for the default and for any ``sessionmaker`` bound to a
    SQLite engine (it is called with the connection as ``bind``); another callable's
    sessions begin as that callable set them up.
    """
    factory: Callable[[], Session] = (
        session_factory if session_factory is not None else sessionmaker()
    )
    if not isinstance(factory, sessionmaker):
        return factory
    bind = factory.kw.get("bind") or queue.engine
    if not isinstance(bind, Engine) or bind.dialect.name != "sqlite":
        return factory if session_factory is not None else sessionmaker(bind=bind)
    engine = configure_engine(bind)  # a no-op on the queue's own engine

    def open_session() -> Session:
        stack = ExitStack()
        conn = stack.enter_context(handler_connection(engine))
        try:
            session: Session = factory(bind=conn)
        except BaseException:
            stack.close()
            raise
        session.info[_RELEASE_CONNECTION] = stack.close
        return session

    return open_session


class Handlers(dict[str, Handler]):
    """A kind → handler mapping with a decorator to fill it::

    handlers = Handlers()

    @handlers.register("send_email")
    def send_email(ctx: JobContext) -> None: ...
    """

    def register(self, kind: str) -> Callable[[Handler], Handler]:
        check_kind(kind)

        def decorate(handler: Handler) -> Handler:
            _check_handler(kind, handler)
            if kind in self:
                raise ConfigurationError(f"a handler for {kind!r} is already registered")
            self[kind] = handler
            return handler

        return decorate


class _DatabaseFile:
    """The SQLite file behind an engine, known by its device and inode.

    A file deleted or replaced (``rm``, a restored backup moved into place) under a
    running process is invisible to SQLite: the connections already open go on reading
    and writing the old inode, new ones open whatever is at the path now. So the worker
    compares the path's identity with the one it recorded at start, before it settles or
    claims anything; a ``stat`` costs about a microsecond.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None

    @classmethod
    def of(cls, engine: Engine) -> _DatabaseFile | None:
        """The file of a SQLite engine; None for PostgreSQL, in-memory and URI databases."""
        path = sqlite_file(engine.url)
        return None if path is None else cls(path)

    def _stat(self) -> tuple[int, int] | None:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return None
        return status.st_dev, status.st_ino

    def change(self) -> str | None:
        """How the file changed since it was first seen (``deleted``, ``replaced by another
        file``), or None. A file that did not exist yet is recorded when it appears."""
        identity = self._stat()
        if self._identity is None:
            self._identity = identity
            return None
        if identity == self._identity:
            return None
        return "deleted" if identity is None else "replaced by another file"


def _fields(job: Job, duration_s: float | None = None) -> dict[str, Any]:
    """The structured fields of a job's log records."""
    fields: dict[str, Any] = {"job_id": job.id, "kind": job.kind, "attempt": job.attempts}
    if duration_s is not None:
        fields["duration_ms"] = int(duration_s * 1000)
    return fields


def _span_attributes(job: Job) -> dict[str, Any]:
    return {"memtree.job_id": job.id, "memtree.kind": job.kind, "memtree.attempt": job.attempts}


@dataclass(frozen=True, slots=True)
class _Completed:
    job: Job
    followups: list[NewJob]
    duration_s: float


@dataclass(slots=True)
class _Chain:
    """What a finishing job hands its thread: the job it claimed to run next, if any,
    and the gate permits held while it claimed."""

    follower: _Running | None = None
    reserved: list[Gate] = field(default_factory=list)


@dataclass(slots=True)
class _Running:
    job: Job
    context: JobContext
    gate: Gate | None
    traced: bool
    started: float = field(default_factory=time.monotonic)


class Worker:
    """Works a :class:`Queue` with ``handlers`` (kind → handler).

    - ``concurrency``: handler threads; the worker never holds more claims than this.
    - ``gates``: concurrency limits shared by kinds (the LLM gate by default; ``()`` for none).
    - ``lock_duration_ms``: the lease of a claim (the queue's by default), extended every
      ``heartbeat_interval_ms`` (a third of the lease by default) while a handler runs.
    - ``poll_interval_s``: how soon an idle worker notices work another process enqueued
      (0.25 s on SQLite; 1 s on PostgreSQL, where NOTIFY wakes it at once anyway).
    - ``shutdown_grace_s``: how long a stopping worker waits for running handlers.
    - ``recover_interval_s``, ``self_heal_interval_s``, ``retention_ms`` (``None`` keeps
      done rows), ``prune_interval_s``: maintenance.
    - ``self_heal_limit``: how many times self-heal revives one failed job (3 by default;
      0 turns self-heal off). A job failed after that many heals stays failed.
    - ``max_infrastructure_releases``: runs of one job in a row released without spending
      an attempt because the database could not be reached (:func:`is_infrastructure_error`);
      the next such run counts as a failure (10 by default; 0 counts every one).
    - ``session_factory``: builds ``ctx.session``; a ``Session`` on the queue's engine by default.
    """

    def __init__(
        self,
        queue: Queue,
        handlers: Mapping[str, Handler],
        *,
        concurrency: int = 4,
        gates: Iterable[Gate] = DEFAULT_GATES,
        lock_duration_ms: int | None = None,
        heartbeat_interval_ms: int | None = None,
        poll_interval_s: float | None = None,
        shutdown_grace_s: float = 30.0,
        recover_interval_s: float | None = None,
        self_heal_interval_s: float = 600.0,
        self_heal_limit: int = DEFAULT_SELF_HEAL_LIMIT,
        max_infrastructure_releases: int = DEFAULT_MAX_INFRASTRUCTURE_RELEASES,
        flush_stale_interval_s: float = 60.0,
        retention_ms: int | None = 7 * 24 * 60 * 60 * 1000,
        prune_interval_s: float = 600.0,
        session_factory: Callable[[], Session] | None = None,
        name: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if not isinstance(queue, Queue):
            raise ConfigurationError("Worker needs a memtree.Queue")
        if not isinstance(handlers, Mapping) or not handlers:
            raise ConfigurationError("Worker needs a non-empty mapping of kind -> handler")
        for kind, handler in handlers.items():
            try:
                check_kind(kind)
            except ValueError as exc:
                raise ConfigurationError(f"handler kind: {exc}") from None
            _check_handler(kind, handler)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be an int >= 1, not {concurrency!r}")
        if isinstance(self_heal_limit, bool) or not isinstance(self_heal_limit, int):
            raise ConfigurationError(f"self_heal_limit must be an int, not {self_heal_limit!r}")
        if self_heal_limit < 0:
            raise ConfigurationError(f"self_heal_limit must be >= 0, not {self_heal_limit}")
        self.self_heal_limit = self_heal_limit
        if (
            isinstance(max_infrastructure_releases, bool)
            or not isinstance(max_infrastructure_releases, int)
            or max_infrastructure_releases < 0
        ):
            raise ConfigurationError(
                "max_infrastructure_releases must be an int >= 0, "
                f"not {max_infrastructure_releases!r}"
            )
        self.max_infrastructure_releases = max_infrastructure_releases
        self.queue = queue
        self.handlers: dict[str, Handler] = dict(handlers)
        self.concurrency = concurrency
        # None asks for the default; an explicit 0 or a negative value is refused.
        self.lock_duration_ms = (
            queue.lock_duration_ms
            if lock_duration_ms is None
            else positive_int("lock_duration_ms", lock_duration_ms)
        )
        self.heartbeat_interval_ms = (
            max(self.lock_duration_ms // 3, 1)
            if heartbeat_interval_ms is None
            else positive_int("heartbeat_interval_ms", heartbeat_interval_ms)
        )
        if self.heartbeat_interval_ms >= self.lock_duration_ms:
            raise ConfigurationError("heartbeat_interval_ms must be shorter than the lease")
        on_pg = queue.dialect.notifies
        self.poll_interval_s = (
            (1.0 if on_pg else 0.25)
            if poll_interval_s is None
            else seconds("poll_interval_s", poll_interval_s)
        )
        self.shutdown_grace_s = seconds("shutdown_grace_s", shutdown_grace_s, allow_zero=True)
        self.intervals = {
            # At most half a lease, so a dead peer's jobs wait about a lease, not 30 s more.
            "recover": min(30.0, self.lock_duration_ms / 2000)
            if recover_interval_s is None
            else seconds("recover_interval_s", recover_interval_s),
            "self_heal": seconds("self_heal_interval_s", self_heal_interval_s),
            "flush_stale": seconds("flush_stale_interval_s", flush_stale_interval_s),
            "prune": seconds("prune_interval_s", prune_interval_s),
        }
        self.retention_ms = (
            None if retention_ms is None else positive_int("retention_ms", retention_ms)
        )
        self.metrics = metrics
        self.name = name or f"{os.uname().nodename}:{os.getpid()}"
        self._session_factory = _session_opener(queue, session_factory)

        self.gates = tuple(gates)
        self._gate_of: dict[str, Gate] = {}
        for gate in self.gates:
            for kind in gate.kinds:
                if kind in self._gate_of:
                    raise ConfigurationError(f"kind {kind!r} is in two gates")
                self._gate_of[kind] = gate
        order = {kind: i for i, kind in enumerate(queue.claim_order)}
        # Claim groups: one per gate (its handled kinds), then the ungated kinds.
        groups: list[tuple[Gate | None, tuple[str, ...]]] = []
        for gate in self.gates:
            kinds = tuple(k for k in gate.kinds if k in self.handlers)
            if kinds:
                groups.append((gate, kinds))
        ungated = tuple(k for k in self.handlers if k not in self._gate_of)
        if ungated:
            groups.append((None, ungated))
        groups.sort(key=lambda g: min(order.get(k, len(order)) for k in g[1]))
        self._groups = groups

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._running: dict[str, _Running] = {}
        self._gate_busy: dict[str, int] = {gate.name: 0 for gate in self.gates}
        self._completed: list[_Completed] = []
        self._completed_since = 0.0
        # Job id -> infrastructure releases in a row (see _released_for_infrastructure).
        self._infrastructure_releases: dict[str, int] = {}
        self._database_file = _DatabaseFile.of(queue.engine)
        self._database_lost: DatabaseFileChangedError | None = None
        # A busy worker claims once this many slots are free (see _claim_plan).
        self._claim_batch = max(1, concurrency // 4)
        self._tasks: queue_module.SimpleQueue[_Running | None] = queue_module.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._settled = 0
        self._upkeep = Upkeep(
            queue,
            recover_interval_s=self.intervals["recover"],
            self_heal_interval_s=self.intervals["self_heal"],
            prune_interval_s=self.intervals["prune"],
            periodic=[("flush_stale", self.intervals["flush_stale"], enqueue_flush_stale)]
            if JobKind.FLUSH_STALE in self.handlers
            else (),
            self_heal_limit=self_heal_limit,
            retention_ms=self.retention_ms,
            metrics=metrics,
        )
        self._next_heartbeat = 0.0
        self._next_cancel_check = 0.0
        self._listener: wakeup.Listener | None = None
        self._signals = 0

    # -- public ------------------------------------------------------------------------

    def run(self, *, install_signal_handlers: bool = True) -> None:
        """Work until :meth:`stop` or SIGINT/SIGTERM; then shut down gracefully.

        Raises :class:`DatabaseFileChangedError` once it stopped because its SQLite file
        was deleted or replaced."""
        restore = self._install_signals() if install_signal_handlers else {}
        try:
            self._start(listen=True)
            self._guarded(self.queue.purge_retired_jobs, "purge retired jobs")
            self._loop(until_idle=False)
        finally:
            self._shutdown()
            for signum, previous in restore.items():
                signal.signal(signum, previous)
        if self._database_lost is not None:
            raise self._database_lost

    def run_until_idle(self) -> int:
        """Work until no job is due and none is running; return how many jobs were settled.

        Can be called again and again (a test's drain); a stopped worker stays stopped.
        """
        before = self._settled
        self._start(listen=False)
        try:
            self._loop(until_idle=True)
        finally:
            if self._database_lost is None:
                self._flush_completed()
            wakeup.unsubscribe(self.queue.engine, self._wake)
            self._stop_threads()
        if self._database_lost is not None:
            raise self._database_lost
        return self._settled - before

    def stop(self) -> None:
        """Stop claiming; :meth:`run` returns once running handlers finish or the grace ends."""
        self._stopping.set()
        self._wake.set()

    @property
    def running_jobs(self) -> list[Job]:
        with self._lock:
            return [entry.job for entry in self._running.values()]

    # -- the loop ----------------------------------------------------------------------

    def _start(self, *, listen: bool) -> None:
        self._database_file_changed()  # records the file's identity the first time
        wakeup.subscribe(self.queue.engine, self._wake)
        while len(self._threads) < self.concurrency:
            thread = threading.Thread(
                target=self._serve, name=f"memtree-handler-{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        if listen and self.queue.dialect.notifies and self._listener is None:
            self._listener = wakeup.Listener(self.queue.engine, self._on_notify)
            self._listener.start()

    def _on_notify(self, kind: str) -> None:
        if kind in self.handlers:
            self._wake.set()

    def _loop(self, *, until_idle: bool) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            if self._database_file_changed():
                return
            self._heartbeat()
            self._check_cancels()
            if not until_idle:
                self._maintain()
            if self._exchange():
                continue
            with self._lock:
                busy = bool(self._running) or bool(self._completed)
                flush_in = (
                    self._completed_since + _FLUSH_DELAY_S - time.monotonic()
                    if self._completed
                    else None
                )
            timeout, due_now = self._idle_timeout()
            if until_idle and not busy and not due_now:
                return
            if flush_in is not None:
                timeout = max(min(timeout or flush_in, flush_in), 0.001)
            self._wake.wait(self.poll_interval_s if timeout is None else timeout)

    def _free_slots(self) -> int:
        with self._lock:
            return self.concurrency - len(self._running)

    def _claim_plan(self) -> tuple[int, list[tuple[Gate | None, int, tuple[str, ...]]]]:
        """How many jobs to claim, and per claim group its gate, cap and kinds.

        While handlers run, the worker waits until a quarter of its slots are free, so a
        busy worker claims in batches instead of one job per statement; an idle one claims
        at once, however few slots it has. A full gate has no cap left: its kinds are not
        claimed, and nothing spins. A gate's cap is held (counted busy) until
        :meth:`_release_plan`, so a handler thread claiming its successor meanwhile cannot
        take the same permits.
        """
        with self._lock:
            running = len(self._running)
            free = self.concurrency - running
            if free <= 0 or self._stopping.is_set() or (running and free < self._claim_batch):
                return 0, []
            plan = []
            for gate, kinds in self._groups:
                cap = free if gate is None else gate.limit - self._gate_busy[gate.name]
                if cap > 0:
                    plan.append((gate, cap, kinds))
                    if gate is not None:
                        self._gate_busy[gate.name] += cap
        return free, plan

    def _release_plan(self, plan: list[tuple[Gate | None, int, tuple[str, ...]]]) -> None:
        """Give back the gate caps :meth:`_claim_plan` held (claimed jobs hold their own)."""
        with self._lock:
            for gate, cap, _ in plan:
                if gate is not None:
                    self._gate_busy[gate.name] -= cap

    def _exchange(self) -> int:
        """Settle finished jobs and claim new ones in one transaction; how many were claimed."""
        limit, plan = self._claim_plan()
        with self._lock:
            flush = bool(self._completed) and (
                bool(plan)
                or not self._running
                or len(self._completed) >= self._claim_batch
                or time.monotonic() - self._completed_since >= _FLUSH_DELAY_S
                or self._stopping.is_set()
            )
            taken, self._completed = (self._completed, []) if flush else ([], self._completed)
        try:
            return self._settle_and_claim(limit, plan, taken)
        finally:
            self._release_plan(plan)

    def _settle_and_claim(
        self,
        limit: int,
        plan: list[tuple[Gate | None, int, tuple[str, ...]]],
        taken: list[_Completed],
    ) -> int:
        if not plan and not taken:
            return 0
        if self._database_file_changed():
            with self._lock:  # never settled: not into a file that is gone or another one
                self._completed[:0] = taken
            return 0
        result = self._guarded(
            lambda: self.queue.complete_and_claim(
                [(c.job, c.followups) for c in taken],
                [(cap, kinds) for _, cap, kinds in plan],
                limit,
                self.lock_duration_ms,
            ),
            "claim",
        )
        if result is None:
            with self._lock:  # the transaction rolled back: settle them next round
                self._completed[:0] = taken
                self._completed_since = time.monotonic()
            return 0
        outcome, batches = result
        self._finish_batch(taken, outcome)
        claimed = 0
        now_ms = self.queue.now_ms()
        traced = tracing.enabled()
        for (gate, _, _), jobs in zip(plan, batches, strict=True):
            for job in jobs:
                if self.metrics is not None:
                    self.metrics.on_claimed(job, now_ms)
                self._dispatch(job, gate, traced)
                claimed += 1
        return claimed

    def _claimable_kinds(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(
                kind
                for gate, kinds in self._groups
                if gate is None or self._gate_busy[gate.name] < gate.limit
                for kind in kinds
            )

    def _idle_timeout(self) -> tuple[float | None, bool]:
        """Seconds until something is due (a scheduled job, a heartbeat, maintenance), and
        whether a job this worker could claim is due already."""
        now = time.monotonic()
        deadlines = [self._next_heartbeat] if self.running_jobs else []
        upkeep_due = self._upkeep.next_due()
        if upkeep_due is not None:
            deadlines.append(upkeep_due)
        if self._free_slots() > 0:
            kinds = self._claimable_kinds()
            due_ms = self._guarded(lambda: self.queue.next_due_ms(kinds), "poll") if kinds else None
            if due_ms is not None:
                wait = (due_ms - self.queue.now_ms()) / 1000
                if wait <= 0:
                    # Due but not claimed yet: a gate just freed, another worker holds the
                    # row for a moment, or the database is busy. Look again shortly.
                    return min(self.poll_interval_s, 0.05), True
                deadlines.append(now + wait)
        if not deadlines:
            return None, False
        return max(min(min(deadlines) - now, self.poll_interval_s), 0.001), False

    # -- running a job -----------------------------------------------------------------

    def _dispatch(self, job: Job, gate: Gate | None, traced: bool) -> None:
        entry = _Running(job, JobContext(job, self.queue, self._session_factory), gate, traced)
        with self._lock:
            self._running[job.id] = entry
            if gate is not None:
                self._gate_busy[gate.name] += 1
            if len(self._running) == 1:
                self._next_heartbeat = time.monotonic() + self.heartbeat_interval_ms / 1000
        self._tasks.put(entry)

    def _serve(self) -> None:
        entry = self._tasks.get()
        while entry is not None:
            chain = _Chain()
            try:
                completed = self._execute(entry, chain)
            except Exception:  # never lose a handler thread
                log.exception("memtree worker failed to settle job %s", entry.job.id)
                completed = None
            with self._lock:
                self._running.pop(entry.job.id, None)
                if entry.gate is not None:
                    self._gate_busy[entry.gate.name] -= 1
                for gate in chain.reserved:
                    self._gate_busy[gate.name] -= 1
                follower = chain.follower
                if follower is not None:
                    self._running[follower.job.id] = follower
                    if follower.gate is not None:
                        self._gate_busy[follower.gate.name] += 1
                if completed is not None:
                    if not self._completed:
                        self._completed_since = time.monotonic()
                    self._completed.append(completed)
                # Wake the loop only when it has something to do: a gate permit or the
                # claim threshold freed, the last job finished, the first completion to
                # settle (it arms the flush timer), or a run the handler thread settled
                # without claiming its successor. Waking it for every job of a fast kind
                # costs more than the jobs.
                wake = (
                    (completed is None and follower is None)
                    or (
                        entry.gate is not None
                        and (follower is None or follower.gate is not entry.gate)
                    )
                    or not self._running
                    or len(self._completed) == 1
                    or self.concurrency - len(self._running) == self._claim_batch
                )
            if wake:
                self._wake.set()
            entry = follower if follower is not None else self._tasks.get()

    def _execute(self, entry: _Running, chain: _Chain) -> _Completed | None:
        """Run one job; a plain success is returned for the loop to settle in a batch,
        every other outcome is settled here (``None``). A success settled in the
        handler's session may claim this thread's next job in the same transaction
        (``chain``)."""
        job, ctx = entry.job, entry.context
        outcome: object
        with tracing.span(f"memtree.job {job.kind}", _span_attributes(job), record=entry.traced):
            try:
                outcome = self.handlers[job.kind](ctx)
            except Exception as exc:
                outcome = exc
        duration_s = time.monotonic() - entry.started
        if ctx._is_set("_lease_lost"):
            ctx._close(commit=False)
            self._finish(job, "lease_lost", False, duration_s, _fields(job, duration_s))
            return None
        if outcome is None and not ctx.uses_session:
            # Settled by the loop in a batch with others (see _exchange).
            return _Completed(job, ctx._followups, duration_s)
        fields = _fields(job, duration_s)
        if self._database_file_changed():
            ctx._close(commit=False)
            log.error("job %s not settled: the database file changed", job.id, extra=fields)
            return None
        if outcome is None:
            committed = self._commit(entry, fields, chain)
            if not isinstance(committed, BaseException):
                self._finish(job, "done", committed, duration_s, fields)
                return None
            outcome = committed  # the completion did not commit: this run failed
        ctx._close(commit=False)
        if isinstance(outcome, Defer):
            until = outcome.resolve(self.queue.now_ms())
            log.info("job %s deferred: %s", job.id, scrub(outcome.reason), extra=fields)
            settled = self._retrying(lambda: self.queue.mark_deferred(job, until, outcome.reason))
            self._finish(job, "deferred", settled, duration_s, fields)
            return None
        error = (
            outcome
            if isinstance(outcome, BaseException)
            else TypeError(f"handler returned {outcome!r}; expected None or memtree.Defer")
        )
        if self._released_for_infrastructure(job, error, duration_s, fields):
            return None
        log.warning("job %s failed: %s", job.id, scrub(settle.error_text(error)), extra=fields)
        settled = self._retrying(lambda: self.queue.mark_failed(job, error))
        self._finish(job, "failed", settled, duration_s, fields)
        return None

    def _commit(self, entry: _Running, fields: dict[str, Any], chain: _Chain) -> bool | Exception:
        """Settle ``done`` in the handler's own session: its writes, follow-ups and the
        completion commit together, or (lease lost, cancel requested) not at all. Returns
        whether it settled, or the error that kept it from committing.

        The same transaction claims this thread's next job (see :meth:`_claim_follower`), so
        a worker of transactional handlers pays one transaction per job, not a claim
        transaction and a completion transaction."""
        ctx = entry.context
        job = ctx.job
        try:
            now_ms = self.queue.now_ms()
            # The session's own connection and transaction, without the ORM's execution
            # path around each statement; the handler's pending objects flush at commit.
            conn = ctx.session.connection()
            settled = settle.mark_done(
                conn,
                job,
                ctx._followups,
                now_ms=now_ms,
                default_max_attempts=self.queue.max_attempts,
            )
            follower = self._claim_follower(conn, entry, chain, now_ms) if settled else None
            ctx._close(commit=settled)
        except Exception as exc:
            # The transaction is gone with the handler's writes: run the job again later.
            ctx._close(commit=False)
            label, _ = classify_error(exc)
            log.warning(
                "job %s: its completion did not commit (%s: %s)",
                job.id,
                label,
                scrub(str(exc)),
                extra=fields,
            )
            return exc
        chain.follower = follower
        if follower is not None and self.metrics is not None:
            self.metrics.on_claimed(follower.job, now_ms)
        if settled and ctx._followups:
            wakeup.signal(self.queue.engine)
        return settled

    def _claim_follower(
        self, conn: Connection, entry: _Running, chain: _Chain, now_ms: int
    ) -> _Running | None:
        """Claim, in the finishing job's session, the job its thread runs next.

        Only kinds this worker could claim anyway: the ungated ones, and those of each
        gate with a permit free (the finishing job's own permit counts as free). A permit
        of every other such gate is held for the moment of the claim (``chain.reserved``,
        given back by :meth:`_serve`), so the loop cannot hand it out twice."""
        with self._lock:
            if self._stopping.is_set():
                return None
            kinds: list[str] = []
            for gate, group in self._groups:
                if gate is not None and gate is not entry.gate:
                    if self._gate_busy[gate.name] >= gate.limit:
                        continue
                    self._gate_busy[gate.name] += 1
                    chain.reserved.append(gate)
                kinds.extend(group)
        claimed = store.claim(
            conn,
            now_ms=now_ms,
            limit=1,
            lock_duration_ms=self.lock_duration_ms,
            claim_order=self.queue.claim_order,
            kinds=tuple(kinds),
        )
        if not claimed:
            return None
        job = claimed[0]
        return _Running(
            job,
            JobContext(job, self.queue, self._session_factory),
            self._gate_of.get(job.kind),
            entry.traced,
        )

    def _released_for_infrastructure(
        self, job: Job, error: BaseException, duration_s: float, fields: dict[str, Any]
    ) -> bool:
        """Release a run that failed because the database could not be reached: ``ready``
        again after a backoff, its attempt given back. After ``max_infrastructure_releases``
        such runs of the job in a row, the next is left to count as a failure (False)."""
        if not is_infrastructure_error(error):
            return False
        with self._lock:
            count = self._infrastructure_releases.pop(job.id, 0) + 1
            if count > self.max_infrastructure_releases:
                return False
            self._infrastructure_releases[job.id] = count
            if len(self._infrastructure_releases) > _INFRASTRUCTURE_MEMORY:
                del self._infrastructure_releases[next(iter(self._infrastructure_releases))]
        delay_ms = backoff_ms(
            count, base_ms=INFRASTRUCTURE_RETRY_BASE_MS, cap_ms=INFRASTRUCTURE_RETRY_CAP_MS
        )
        until = store.saturating(self.queue.now_ms() + delay_ms)
        log.warning(
            "job %s: the database could not be reached (%s); released without spending an "
            "attempt, due again in %.1fs (release %d of at most %d in a row)",
            job.id,
            scrub(settle.error_text(error)),
            delay_ms / 1000,
            count,
            self.max_infrastructure_releases,
            extra=fields,
        )
        settled = self._retrying(lambda: self.queue.mark_released(job, until, error))
        self._finish(job, "released", settled, duration_s, fields)
        return True

    def _finish(
        self,
        job: Job,
        outcome: str,
        settled: bool | None,
        duration_s: float,
        fields: dict[str, Any],
    ) -> None:
        """Count a run. A settle that did not match may have met a cancel request: then
        the run ends ``cancelled``; otherwise the lease was lost and it is not settled."""
        if outcome != "released" and self._infrastructure_releases:
            with self._lock:
                self._infrastructure_releases.pop(job.id, None)
        if (
            settled is False
            and outcome != "lease_lost"
            and self._retrying(lambda: self.queue.mark_cancelled(job))
        ):
            outcome, settled = "cancelled", True
        if settled:
            with self._lock:
                self._settled += 1
            log.debug("job %s %s", job.id, outcome, extra=fields)
        elif settled is False:
            outcome = "lease_lost"
            log.warning("job %s: lease lost before it was settled", job.id, extra=fields)
        else:
            log.error(
                "job %s could not be settled; it runs again when its lease expires",
                job.id,
                extra=fields,
            )
            return
        if self.metrics is not None:
            self.metrics.on_finished(job, outcome, duration_s)

    def _flush_completed(self) -> None:
        """Settle every handler-finished job that wrote nothing of its own, in one batch."""
        with self._lock:
            batch, self._completed = self._completed, []
        if not batch:
            return
        outcome = self._retrying(
            lambda: self.queue.complete_and_claim([(c.job, c.followups) for c in batch], (), 0)
        )
        self._finish_batch(batch, None if outcome is None else outcome[0])

    def _finish_batch(self, batch: list[_Completed], outcome: SettledBatch | None) -> None:
        """Count the runs of a batched settle (``outcome``, or ``None`` when the database
        stayed away); a job whose row another session held locked is settled again later,
        the rest go through :meth:`_finish`."""
        settled = None if outcome is None else outcome.settled
        if outcome is not None and outcome.locked:
            locked = [c for c in batch if c.job.id in outcome.locked]
            with self._lock:
                self._completed[:0] = locked
                self._completed_since = time.monotonic() + _LOCKED_RETRY_S
            batch = [c for c in batch if c.job.id not in outcome.locked]
        matched = [c for c in batch if settled is not None and c.job.id in settled]
        with self._lock:
            self._settled += len(matched)
            if self._infrastructure_releases:
                for completed in matched:
                    self._infrastructure_releases.pop(completed.job.id, None)
        if log.isEnabledFor(logging.DEBUG):
            for completed in matched:
                fields = _fields(completed.job, completed.duration_s)
                log.debug("job %s done", completed.job.id, extra=fields)
        if self.metrics is not None:
            for completed in matched:
                self.metrics.on_finished(completed.job, "done", completed.duration_s)
        if len(matched) == len(batch):
            return
        for completed in batch:
            if settled is None or completed.job.id not in settled:
                job, duration_s = completed.job, completed.duration_s
                matches = None if settled is None else False
                self._finish(job, "done", matches, duration_s, _fields(job, duration_s))

    def _check_cancels(self) -> None:
        """Tell running handlers that were asked to stop (polled while jobs run)."""
        now = time.monotonic()
        if now < self._next_cancel_check:
            return
        self._next_cancel_check = now + min(self.poll_interval_s, 1.0)
        with self._lock:
            running = {job_id: entry.context for job_id, entry in self._running.items()}
        if not running:
            return
        requested = self._guarded(
            lambda: self.queue.cancel_requested(list(running)), "cancel check"
        )
        for job_id in requested or ():
            context = running[job_id]
            if not context.cancel_event.is_set():
                context.cancel_event.set()
                context.log.info("job %s was asked to stop", job_id)

    def _heartbeat(self) -> None:
        if time.monotonic() < self._next_heartbeat:
            return
        self._next_heartbeat = time.monotonic() + self.heartbeat_interval_ms / 1000
        with self._lock:
            held = [entry.job for entry in self._running.values()]
        if not held:
            return
        kept = self._guarded(
            lambda: self.queue.extend_leases(held, self.lock_duration_ms), "heartbeat"
        )
        if kept is None:
            return
        for job in held:
            if job.id not in kept:
                with self._lock:
                    entry = self._running.get(job.id)
                if entry is not None and not entry.context.lease_lost.is_set():
                    entry.context.lease_lost.set()
                    log.warning(
                        "job %s lost its lease while running; this worker will not settle it",
                        job.id,
                        extra={"job_id": job.id, "kind": job.kind, "attempt": job.attempts},
                    )

    def _database_file_changed(self) -> bool:
        """True once the SQLite file was deleted or replaced under this worker; the first
        to notice logs it and stops the worker (see :class:`_DatabaseFile`)."""
        if self._database_lost is not None:
            return True
        if self._database_file is None:
            return False
        change = self._database_file.change()
        if change is None:
            return False
        error = DatabaseFileChangedError(self._database_file.path, change)
        with self._lock:
            first = self._database_lost is None
            if first:
                self._database_lost = error
        if first:
            log.error("%s", error)
            self.stop()
        return True

    # -- maintenance -------------------------------------------------------------------

    def _maintain(self) -> None:
        self._upkeep.run_due(time.monotonic(), self._guarded)

    # -- errors ------------------------------------------------------------------------

    def _guarded(self, operation: Callable[[], Any], what: str) -> Any:
        """Run a database operation of the loop; on failure, log, back off, return None."""
        try:
            return operation()
        except (MemtreeError, sa_exc.SQLAlchemyError) as exc:
            if isinstance(exc, MemtreeError) and not isinstance(exc, DatabaseError):
                raise
            label, backoff_s = classify_error(exc)
            log.warning(
                "memtree %s failed (%s); retrying in %.1fs: %s",
                what,
                label,
                backoff_s,
                scrub(str(exc)),
            )
            self._stopping.wait(backoff_s)
            return None

    def _retrying(self, operation: Callable[[], Any], attempts: int = 5) -> Any:
        """A settle, retried through database errors; None if the database stayed away."""
        for _ in range(attempts):
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

    # -- shutdown ----------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}

        def handle(signum: int, _frame: object) -> None:
            self._signals += 1
            if self._signals > 1:
                log.warning("second signal: exiting now; running leases will be recovered")
                os._exit(128 + signum)
            log.info("signal %d: finishing running jobs, then stopping", signum)
            self.stop()

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handle)
        return previous

    def _shutdown(self) -> None:
        self._stopping.set()
        deadline = time.monotonic() + self.shutdown_grace_s
        # A worker whose file changed does not wait: nothing it runs can be settled now.
        while (
            (self.running_jobs or self._completed)
            and time.monotonic() < deadline
            and not self._database_file_changed()
        ):
            self._flush_completed()
            self._heartbeat()
            self._wake.wait(0.05)
            self._wake.clear()
        if not self._database_file_changed():
            self._flush_completed()
            if self._completed:
                log.error(
                    "shutdown grace over: %d finished jobs were not settled (another session "
                    "held their rows locked); they run again when their leases expire",
                    len(self._completed),
                )
        unfinished = self.running_jobs
        if self._database_lost is not None:
            # Their leases are in a file that is gone or replaced: nothing to release.
            log.error(
                "stopped; %d running jobs were left unsettled in the changed file",
                len(unfinished),
            )
        elif unfinished:
            # Only this worker's own leases: another worker's are not ours to release.
            released = self._guarded(
                lambda: self.queue.release_running_locks(unfinished), "release"
            )
            log.warning(
                "shutdown grace over: released %s of %d running jobs", released, len(unfinished)
            )
        wakeup.unsubscribe(self.queue.engine, self._wake)
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        self._stop_threads()

    def _stop_threads(self) -> None:
        """Let the handler threads exit once they finish what they run."""
        for _ in self._threads:
            self._tasks.put(None)
        self._threads = []
