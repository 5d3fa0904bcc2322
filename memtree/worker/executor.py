"""The thread executor: runs plain ``def`` handlers in the worker's handler threads.

An executor runs one handler and returns its outcome (:mod:`memtree.worker.outcome`);
the one thing it settles itself is a run whose handler wrote through ``ctx.session``:
that run's writes, follow-ups and completion commit in the handler's own transaction,
which also claims the thread's next job (the producer's gates permitting), so a worker
of transactional handlers pays one transaction per job.
"""

from __future__ import annotations

import logging
import queue as queue_module
import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from memtree import settle, store, tracing, wakeup
from memtree.engine import configure_engine, handler_connection
from memtree.queue import Queue
from memtree.worker.completer import Finished, log_uncommitted
from memtree.worker.context import Defer, Handler, JobContext
from memtree.worker.outcome import (
    Chain,
    Committed,
    Deferred,
    Done,
    Failed,
    LeaseLost,
    Outcome,
    Run,
    Unsettled,
)

if TYPE_CHECKING:
    from memtree.worker.producer import Producer

__all__ = ["ThreadExecutor", "session_opener", "span_attributes"]

log = logging.getLogger("memtree.worker")

#: ``Session.info`` key: closes the handler connection a session was bound to.
_RELEASE_CONNECTION = "memtree.release_connection"


def span_attributes(run: Run) -> dict[str, Any]:
    job = run.job
    return {"memtree.job_id": job.id, "memtree.kind": job.kind, "memtree.attempt": job.attempts}


def session_opener(
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


def close_session(ctx: JobContext, *, commit: bool) -> None:
    """Commit or roll back ``ctx.session`` (if the handler opened it), then close it."""
    session = ctx._session
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


def outcome_of(result: object) -> Outcome:
    """The outcome of a handler that returned ``result`` (or raised it) without settling."""
    if isinstance(result, Defer):
        return Deferred(result)
    if isinstance(result, BaseException):
        return Failed(result)
    return Failed(TypeError(f"handler returned {result!r}; expected None or memtree.Defer"))


class ThreadExecutor:
    """Runs sync handlers in ``concurrency`` daemon threads, fed by the producer."""

    def __init__(self, producer: Producer, handlers: dict[str, Handler]) -> None:
        self.producer = producer
        self.handlers = handlers
        self.queue = producer.queue
        self._tasks: queue_module.SimpleQueue[Run | None] = queue_module.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self, concurrency: int) -> None:
        while len(self._threads) < concurrency:
            thread = threading.Thread(
                target=self._serve, name=f"memtree-handler-{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def submit(self, run: Run) -> None:
        self._tasks.put(run)

    def stop(self) -> None:
        """Let the handler threads exit once they finish what they run."""
        for _ in self._threads:
            self._tasks.put(None)
        self._threads = []

    def _serve(self) -> None:
        run = self._tasks.get()
        while run is not None:
            chain = Chain()
            finished: Finished | None = None
            try:
                outcome = self.execute(run, chain)
                if isinstance(outcome, Done):
                    finished = Finished(run.job, outcome.followups, run.duration_s())
                else:
                    self.producer.completer.complete(run, outcome, run.duration_s())
            except Exception:  # never lose a handler thread
                log.exception("memtree worker failed to settle job %s", run.job.id)
            self.producer.finished(run, finished, chain)
            follower = chain.follower
            run = follower if follower is not None else self._tasks.get()

    def execute(self, run: Run, chain: Chain) -> Outcome:
        """Run one job's handler and say how it ended; a success written through the
        handler's session is committed here (and may claim the thread's next job into
        ``chain``)."""
        job, ctx = run.job, run.context
        result: object
        with tracing.span(f"memtree.job {job.kind}", span_attributes(run), record=run.traced):
            try:
                result = self.handlers[job.kind](ctx)
            except Exception as exc:
                result = exc
        if ctx._lost:
            close_session(ctx, commit=False)
            return LeaseLost()
        if result is None and not ctx.uses_session:
            return Done(tuple(ctx._followups))
        if self.producer.database_file_changed():
            close_session(ctx, commit=False)
            return Unsettled("the database file changed")
        if result is None:
            run.settling = True
            committed = self._commit(run, chain)
            if not isinstance(committed, BaseException):
                return Committed(committed)
            result = committed  # the completion did not commit: this run failed
        close_session(ctx, commit=False)
        return outcome_of(result)

    def _commit(self, run: Run, chain: Chain) -> bool | Exception:
        """Settle ``done`` in the handler's own session: its writes, follow-ups and the
        completion commit together, or (lease lost, cancel requested) not at all. Returns
        whether it settled, or the error that kept it from committing."""
        ctx = run.context
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
            follower = self._claim_follower(conn, run, chain, now_ms) if settled else None
            close_session(ctx, commit=settled)
        except Exception as exc:
            # The transaction is gone with the handler's writes: run the job again later.
            close_session(ctx, commit=False)
            log_uncommitted(run, exc)
            return exc
        chain.follower = follower
        if follower is not None:
            self.producer.claimed(follower.job, now_ms)
        if settled and ctx._followups:
            wakeup.signal(self.queue.engine)
        return settled

    def _claim_follower(self, conn: Connection, run: Run, chain: Chain, now_ms: int) -> Run | None:
        """Claim, in the finishing job's session, the job its thread runs next: of the
        sync kinds the producer lets it have now (see :meth:`Producer.follower_kinds`)."""
        kinds = self.producer.follower_kinds(run, chain)
        if not kinds:
            return None
        claimed = store.claim(
            conn,
            now_ms=now_ms,
            limit=1,
            lock_duration_ms=self.producer.lock_duration_ms,
            claim_order=self.queue.claim_order,
            kinds=kinds,
            claimant=self.producer.worker.id,
        )
        if not claimed:
            return None
        return self.producer.new_run(claimed[0], run.traced)
