"""The worker: claims the kinds it has handlers for, runs them, settles them.

:class:`Worker` holds the settings (validated here, when it is built) and puts three
parts together: the :class:`~memtree.worker.producer.Producer` (one loop thread: claims,
gates, heartbeat, cancel polling, upkeep, shutdown), an executor per way of running a
handler (:class:`~memtree.worker.executor.ThreadExecutor` for ``def`` handlers,
:class:`~memtree.worker.aio.AsyncExecutor` for ``async def`` ones), and the
:class:`~memtree.worker.completer.Completer`, which settles every run's outcome.

Completion is transactional. A handler that touches ``ctx.session`` has its writes,
its follow-up jobs and ``mark_done`` committed in that one session, fenced to its
lease; a handler that raises or defers has its session rolled back. A handler that
never touches the session is settled with others in one batched statement.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.orm import Session

from memtree import maintenance, store
from memtree.config import positive_int, seconds
from memtree.errors import ConfigurationError
from memtree.maintenance import Upkeep
from memtree.queue import Queue
from memtree.schedule import SCHEDULE_TICK_S, Schedule, Ticker
from memtree.types import DEFAULT_SELF_HEAL_LIMIT, Job, check_kind
from memtree.worker.aio import AsyncExecutor
from memtree.worker.completer import DEFAULT_MAX_INFRASTRUCTURE_RELEASES, Completer
from memtree.worker.context import (
    AsyncHandler,
    Gate,
    Handler,
    RateLimit,
    check_handler,
    is_async_handler,
)
from memtree.worker.executor import ThreadExecutor, session_opener
from memtree.worker.producer import Producer

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from memtree.metrics import Metrics

__all__ = ["Worker"]

log = logging.getLogger("memtree.worker")


class Worker:
    """Works a :class:`Queue` with ``handlers`` (kind → handler: a ``def``, run in a
    thread, or an ``async def``, run on an event loop).

    - ``concurrency``: jobs run at once; the worker never holds more claims than this.
    - ``gates``: concurrency limits shared by kinds (none by default): per process, or
      across every worker on the database (``Gate(..., scope="global")``, per payload
      ``key`` if given).
    - ``rate_limits``: at most so many starts of some kinds per window, across every
      worker on the database (:class:`memtree.RateLimit`).
    - ``lock_duration_ms``: the lease of a claim (the queue's by default), extended every
      ``heartbeat_interval_ms`` (a third of the lease by default) while a handler runs.
    - ``poll_interval_s``: how soon an idle worker notices work another process enqueued
      (0.25 s on SQLite; 1 s on PostgreSQL, where NOTIFY wakes it at once anyway).
    - ``shutdown_grace_s``: how long a stopping worker waits for running handlers.
    - ``recover_interval_s``, ``self_heal_interval_s``, ``retention_ms`` (``None`` keeps
      done rows), ``prune_interval_s``: maintenance.
    - ``self_heal_limit``: how many times self-heal revives one failed job (3 by default;
      0 turns self-heal off). A job failed after that many heals stays failed.
    - ``upkeep``: the application's own periodic tasks, ``(name, interval_s, task)``; the
      worker calls ``task(queue)`` every ``interval_s`` with its maintenance.
    - ``schedules``: periodic jobs (:class:`~memtree.Schedule`), ticked with the upkeep
      every ``schedule_tick_s`` (1 s; an interval schedule shorter than that, every
      interval). Each schedule's kind needs a handler here.
    - ``max_infrastructure_releases``: runs of one job in a row released without spending
      an attempt because the database could not be reached (:func:`is_infrastructure_error`);
      the next such run counts as a failure (10 by default; 0 counts every one).
    - ``session_factory``: builds ``ctx.session`` for ``def`` handlers; a ``Session`` on
      the queue's engine by default.
    - ``async_session_factory``: builds ``ctx.session`` for ``async def`` handlers; by
      default an ``AsyncSession`` on an async engine the worker opens on the queue's
      database (psycopg's async connection; aiosqlite on SQLite).
    """

    def __init__(
        self,
        queue: Queue,
        handlers: Mapping[str, Handler | AsyncHandler],
        *,
        concurrency: int = 4,
        gates: Iterable[Gate] = (),
        rate_limits: Iterable[RateLimit] = (),
        lock_duration_ms: int | None = None,
        heartbeat_interval_ms: int | None = None,
        poll_interval_s: float | None = None,
        shutdown_grace_s: float = 30.0,
        recover_interval_s: float | None = None,
        self_heal_interval_s: float = 600.0,
        self_heal_limit: int = DEFAULT_SELF_HEAL_LIMIT,
        max_infrastructure_releases: int = DEFAULT_MAX_INFRASTRUCTURE_RELEASES,
        retention_ms: int | None = 7 * 24 * 60 * 60 * 1000,
        prune_interval_s: float = 600.0,
        session_factory: Callable[[], Session] | None = None,
        async_session_factory: Callable[[], AsyncSession] | None = None,
        name: str | None = None,
        metrics: Metrics | None = None,
        upkeep: Iterable[tuple[str, float, Callable[[Queue], object]]] = (),
        schedules: Iterable[Schedule] = (),
        schedule_tick_s: float = SCHEDULE_TICK_S,
    ) -> None:
        if not isinstance(queue, Queue):
            raise ConfigurationError("Worker needs a memtree.Queue")
        if not isinstance(handlers, Mapping) or not handlers:
            raise ConfigurationError("Worker needs a non-empty mapping of kind -> handler")
        for kind, handler in handlers.items():
            try:
                check_kind(kind, queue.retired_kinds)
            except ValueError as exc:
                raise ConfigurationError(f"handler kind: {exc}") from None
            check_handler(kind, handler)
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
        self.handlers: dict[str, Handler | AsyncHandler] = dict(handlers)
        self.async_kinds = frozenset(k for k, h in self.handlers.items() if is_async_handler(h))
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
            "prune": seconds("prune_interval_s", prune_interval_s),
            "register": store.WORKER_BEAT_MS / 1000,
        }
        self.upkeep: dict[str, Callable[[Queue], object]] = {}
        for task_name, interval_s, task in upkeep:
            if task_name in self.intervals or not callable(task):
                raise ConfigurationError(f"upkeep {task_name!r} needs its own name and a callable")
            self.intervals[task_name] = seconds(f"upkeep {task_name!r} interval", interval_s)
            self.upkeep[task_name] = task
        self.schedule_tick_s = seconds("schedule_tick_s", schedule_tick_s)
        self.schedules = self._check_schedules(schedules)
        periodic: list[tuple[str, float, Callable[[Queue], object]]] = [
            ("register", self.intervals["register"], lambda queue: self.producer.beat(queue)),
            *((name, self.intervals[name], task) for name, task in self.upkeep.items()),
        ]
        for schedule in self.schedules:
            tick_s = self.schedule_tick_s
            if schedule.every_ms is not None:
                tick_s = min(tick_s, schedule.every_ms / 1000)
            periodic.append((f"schedule {schedule.name}", tick_s, Ticker(schedule, tick_s)))
        self.retention_ms = (
            None if retention_ms is None else positive_int("retention_ms", retention_ms)
        )
        self.upkeep_schedule = Upkeep(
            queue,
            recover_interval_s=self.intervals["recover"],
            self_heal_interval_s=self.intervals["self_heal"],
            prune_interval_s=self.intervals["prune"],
            periodic=periodic,
            self_heal_limit=self.self_heal_limit,
            retention_ms=self.retention_ms,
            metrics=metrics,
        )
        self.metrics = metrics
        self.name = name or f"{os.uname().nodename}:{os.getpid()}"
        #: This run's id: the row it keeps in ``mem_tree_workers``, and the start of its
        #: claims' lease tokens.
        self.id = uuid.uuid4().hex[:16]
        self.session_factory = session_opener(queue, session_factory)
        self._async_session_factory = async_session_factory

        self.gates = tuple(gates)
        self.rate_limits = tuple(rate_limits)
        for what, limits in (("gate", self.gates), ("rate limit", self.rate_limits)):
            seen: set[str] = set()
            names: set[str] = set()
            for limit in limits:
                if not isinstance(limit, Gate if what == "gate" else RateLimit):
                    raise ConfigurationError(f"not a {what}: {limit!r}")
                if limit.name in names:
                    raise ConfigurationError(f"two {what}s are named {limit.name!r}")
                names.add(limit.name)
                for kind in limit.kinds:
                    if kind in seen:
                        raise ConfigurationError(f"kind {kind!r} is in two {what}s")
                    seen.add(kind)
        self._stopping = threading.Event()
        self._signals = 0
        self._task: asyncio.Task[None] | None = None
        self.completer = Completer(
            queue,
            max_infrastructure_releases=self.max_infrastructure_releases,
            metrics=metrics,
        )
        self.producer = Producer(self, self.completer, self._stopping)
        sync_handlers = {
            k: cast(Handler, h) for k, h in self.handlers.items() if k not in self.async_kinds
        }
        async_handlers = {
            k: cast(AsyncHandler, h) for k, h in self.handlers.items() if k in self.async_kinds
        }
        if sync_handlers:
            self.producer.threads = ThreadExecutor(self.producer, sync_handlers)
        if async_handlers:
            self.producer.aio = AsyncExecutor(
                self.producer, async_handlers, async_session_factory, None
            )

    def _check_schedules(self, schedules: Iterable[Schedule]) -> tuple[Schedule, ...]:
        if isinstance(schedules, Schedule):
            raise ConfigurationError("schedules must be a collection of Schedule, not one")
        checked = tuple(schedules)
        names: set[str] = set()
        for schedule in checked:
            if not isinstance(schedule, Schedule):
                raise ConfigurationError(f"schedules holds {schedule!r}, not a memtree.Schedule")
            if schedule.name in names:
                raise ConfigurationError(f"two schedules are named {schedule.name!r}")
            names.add(schedule.name)
            # Refused rather than ticked for another worker: a schedule nobody here can run
            # is far more often a typo than a dedicated scheduler process (which can call
            # memtree.schedule.tick itself).
            if schedule.kind not in self.handlers:
                raise ConfigurationError(
                    f"schedule {schedule.name!r}: this worker has no handler for its kind "
                    f"{schedule.kind!r}"
                )
        return checked

    # -- public ------------------------------------------------------------------------

    def run(self, *, install_signal_handlers: bool = True) -> None:
        """Work until :meth:`stop` or SIGINT/SIGTERM; then shut down gracefully.

        Raises :class:`DatabaseFileChangedError` once it stopped because its SQLite file
        was deleted or replaced."""
        self._run(install_signal_handlers, loop=None)

    def _run(self, install_signal_handlers: bool, loop: asyncio.AbstractEventLoop | None) -> None:
        restore = self._install_signals() if install_signal_handlers else {}
        producer = self.producer
        try:
            self._start(listen=True, loop=loop)
            producer.guarded(lambda: maintenance.purge_retired(self.queue), "purge retired jobs")
            producer.loop(until_idle=False)
        finally:
            producer.shutdown(self.shutdown_grace_s)
            self._stop_executors()
            for signum, previous in restore.items():
                signal.signal(signum, previous)
        if producer.database_lost is not None:
            raise producer.database_lost

    async def run_async(self) -> None:
        """Work, inside the running event loop, until :meth:`stop` or until the task is
        cancelled; then shut down gracefully (the grace still applies).

        ``async def`` handlers run on this loop; the producer and ``def`` handlers run in
        threads of their own, so the loop never waits on the queue's bookkeeping."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def work() -> None:
            try:
                self._run(False, loop)
            except BaseException as exc:  # handed to the awaiting task
                loop.call_soon_threadsafe(_settle_future, done, exc)
            else:
                loop.call_soon_threadsafe(_settle_future, done, None)

        thread = threading.Thread(target=work, name=f"memtree-worker {self.name}", daemon=True)
        thread.start()
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            self.stop()
            await done
            raise

    async def __aenter__(self) -> Worker:
        """Start working in the background of the running event loop (a lifespan)."""
        self._task = asyncio.get_running_loop().create_task(self.run_async())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop, and wait for the graceful shutdown."""
        self.stop()
        task, self._task = self._task, None
        if task is not None:
            await task

    def run_until_idle(self) -> int:
        """Work until no job is due and none is running; return how many jobs were settled.

        Can be called again and again (a test's drain); a stopped worker stays stopped.
        """
        producer = self.producer
        before = self.completer.settled
        self._start(listen=False, loop=None)
        try:
            producer.loop(until_idle=True)
        finally:
            if producer.database_lost is None:
                producer.flush()
            producer.close()
            self._stop_executors()
        if producer.database_lost is not None:
            raise producer.database_lost
        return self.completer.settled - before

    def stop(self) -> None:
        """Stop claiming; :meth:`run` returns once running handlers finish or the grace ends."""
        self._stopping.set()
        self.producer.wake.set()

    def registration(self, started_at_ms: int) -> store.WorkerRow:
        """The row this worker keeps in ``mem_tree_workers``, for a run that started at
        ``started_at_ms`` (its first beat, on the database's clock)."""
        from memtree import __version__

        return store.WorkerRow(
            self.id,
            self.name,
            tuple(sorted(self.handlers)),
            self.concurrency,
            __version__,
            started_at_ms,
            started_at_ms,
        )

    @property
    def running_jobs(self) -> list[Job]:
        return self.producer.running_jobs

    # -- parts -------------------------------------------------------------------------

    def _start(self, *, listen: bool, loop: asyncio.AbstractEventLoop | None) -> None:
        producer = self.producer
        if producer.threads is not None:
            producer.threads.start(self.concurrency)
        if producer.aio is not None:
            producer.aio.start(loop)
        producer.start(listen=listen)

    def _stop_executors(self) -> None:
        producer = self.producer
        if producer.threads is not None:
            producer.threads.stop()
        if producer.aio is not None:
            producer.aio.stop()

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


def _settle_future(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
