"""The asyncio executor: runs ``async def`` handlers as tasks on an event loop.

The loop is the application's own when the worker runs inside it (``async with
worker`` or ``await worker.run_async()``), or one the executor starts in a thread of its
own when the worker runs with :meth:`Worker.run`. Either way the producer stays in its
thread, so claims, heartbeats and batched settles never wait on the application's loop,
and the loop never waits on them.

A handler's ``ctx.session`` is an ``AsyncSession`` on an async driver (psycopg's async
connection on PostgreSQL, aiosqlite on SQLite) and its transaction is the job's
settlement, as for a thread: its writes, follow-ups and ``done`` commit together, fenced
to the claim, or not at all. Other outcomes go to the completer, whose single settles
run in the loop's default thread pool so the loop is never blocked.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

from memtree import settle, tracing, wakeup
from memtree.engine import async_engine_for, async_handler_session
from memtree.worker.completer import Finished, log_uncommitted
from memtree.worker.context import AsyncHandler, AsyncJobContext
from memtree.worker.executor import outcome_of, span_attributes
from memtree.worker.outcome import (
    Committed,
    Done,
    LeaseLost,
    Outcome,
    Run,
    Unsettled,
    settles_in_the_database,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

    from memtree.types import Job
    from memtree.worker.producer import Producer

__all__ = ["AsyncExecutor"]

log = logging.getLogger("memtree.worker")


class AsyncExecutor:
    """Runs async handlers on one event loop, fed by the producer's thread."""

    def __init__(
        self,
        producer: Producer,
        handlers: dict[str, AsyncHandler],
        session_factory: Callable[[], AsyncSession] | None,
        engine: AsyncEngine | None,
    ) -> None:
        self.producer = producer
        self.handlers = handlers
        self.queue = producer.queue
        self._session_factory = session_factory
        self._engine = engine
        self._owns_engine = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Job id -> its task; touched only on the loop.
        self._tasks: dict[str, asyncio.Task[None]] = {}

    # -- the loop ----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Run on ``loop`` (the application's), or start a loop in a thread of its own."""
        if self.loop is not None:
            return
        on_its_own_loop = loop is None
        if loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._thread = threading.Thread(target=serve, name="memtree-asyncio", daemon=True)
            self._thread.start()
            ready.wait()
        self.loop = loop
        if self._session_factory is None:
            shared = self.queue.async_engine
            if self._engine is None and shared is not None and _shareable(shared, on_its_own_loop):
                self._engine = shared  # the application's own pool
            if self._engine is None:
                self._engine = async_engine_for(self.queue.engine)
                self._owns_engine = True
            engine = self._engine
            self._session_factory = lambda: async_handler_session(engine)

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coroutine`` on the loop from the producer's thread and wait for it."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        """Cancel the runs still going (their leases were released by the producer), close
        the engine this executor made, and stop its own loop."""
        loop = self.loop
        if loop is None:
            return
        self.cancel_running(5.0)
        if self._owns_engine and self._engine is not None and not loop.is_closed():
            engine, self._engine = self._engine, None
            try:
                self._call(engine.dispose())
            except Exception:  # closing is best effort: the process may be ending
                log.debug("closing the async engine failed", exc_info=True)
        if self._thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=5)
            loop.close()
            self._thread = None
        self.loop = None

    # -- runs --------------------------------------------------------------------------

    def context(self, job: Job) -> AsyncJobContext:
        assert self.loop is not None and self._session_factory is not None
        return AsyncJobContext(job, self.queue, self._session_factory, self.loop)

    def submit(self, runs: list[Run]) -> None:
        """Start ``runs`` on the loop: one hand-over for a claimed batch, not one per job."""
        assert self.loop is not None
        if runs:
            self.loop.call_soon_threadsafe(self._spawn, runs)

    def _spawn(self, runs: list[Run]) -> None:
        for run in runs:
            task = asyncio.ensure_future(self._serve_run(run))
            self._tasks[run.job.id] = task
            task.add_done_callback(partial(self._forget, run.job.id))

    def _forget(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(job_id) is task:
            del self._tasks[job_id]

    def cancel_running(self, wait_s: float) -> None:
        """Cancel the runs still going (the grace is over) and wait up to ``wait_s`` for
        them to roll back: on SQLite a run that wrote holds the write lock until then,
        and the producer's release of their leases needs it."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return

        async def cancel_all() -> None:
            tasks = [task for task in self._tasks.values() if not task.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=wait_s)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(wait_s + 1)
        except Exception:  # the loop is gone or stuck: the leases are released anyway
            log.warning("async runs did not finish cancelling", exc_info=True)

    async def _serve_run(self, run: Run) -> None:
        finished: Finished | None = None
        try:
            outcome = await self.execute(run)
            if isinstance(outcome, Done):
                finished = Finished(run.job, outcome.followups, run.duration_s())
            elif settles_in_the_database(outcome):
                # A fenced settle may wait on a row lock: never on the loop.
                await asyncio.to_thread(
                    self.producer.completer.complete, run, outcome, run.duration_s()
                )
            else:
                self.producer.completer.complete(run, outcome, run.duration_s())
        except asyncio.CancelledError:
            # Shutdown after the grace: the producer released this lease already.
            await _close(run.context, commit=False)
            raise
        except Exception:
            log.exception("memtree worker failed to settle job %s", run.job.id)
        self.producer.finished(run, finished)

    async def execute(self, run: Run) -> Outcome:
        """Run one job's async handler and say how it ended; a success written through its
        ``AsyncSession`` is committed here, with the completion."""
        job = run.job
        ctx = run.context
        assert isinstance(ctx, AsyncJobContext)
        result: object
        with tracing.span(f"memtree.job {job.kind}", span_attributes(run), record=run.traced):
            try:
                result = await self.handlers[job.kind](ctx)
            except Exception as exc:
                result = exc
        if ctx._lost:
            await _close(ctx, commit=False)
            return LeaseLost()
        if result is None and not ctx.uses_session:
            return Done(tuple(ctx._followups))
        if self.producer.database_file_changed():
            await _close(ctx, commit=False)
            return Unsettled("the database file changed")
        if result is None:
            run.settling = True
            committed = await self._commit(run, ctx)
            if not isinstance(committed, BaseException):
                return Committed(committed)
            result = committed
        await _close(ctx, commit=False)
        return outcome_of(result)

    async def _commit(self, run: Run, ctx: AsyncJobContext) -> bool | Exception:
        job = ctx.job
        queue = self.queue
        try:
            now_ms = queue.now_ms()
            session = ctx.session
            settled = await session.run_sync(
                lambda sync: settle.mark_done(
                    sync.connection(),
                    job,
                    ctx._followups,
                    now_ms=now_ms,
                    default_max_attempts=queue.max_attempts,
                )
            )
            await _close(ctx, commit=settled)
        except Exception as exc:
            await _close(ctx, commit=False)
            log_uncommitted(run, exc)
            return exc
        if settled and ctx._followups:
            wakeup.signal(queue.engine)
        return settled


async def _close(ctx: Any, *, commit: bool) -> None:
    """Commit or roll back the handler's ``AsyncSession`` (if it opened one), then close it."""
    session = ctx._async_session
    if session is None:
        return
    ctx._async_session = None
    try:
        if commit:
            await session.commit()
        else:
            await session.rollback()
    finally:
        await session.close()


def _shareable(engine: AsyncEngine, on_its_own_loop: bool) -> bool:
    """Whether handlers' sessions may come from the application's own async engine: not
    on SQLite (its handlers need connections that begin at the first write), and not from
    a loop of the worker's own where the driver binds each connection to the loop that
    made it (aiomysql): the application's loop would get them back from the pool."""
    name = engine.dialect.name
    if name == "sqlite":
        return False
    return name == "postgresql" or not on_its_own_loop
