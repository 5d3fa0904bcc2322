"""One handler body, run by either executor: the threaded one (``def``) or asyncio's.

A body is a function of the job's context. It may be a plain function (its handler is
a ``def``, or an ``async def`` that calls it), or a generator that yields the steps that
differ between the two: touching ``ctx.session``, waiting, sleeping, calling blocking
code. :func:`handler` turns a body into the handler the executor under test runs::

    def body(ctx):
        yield add(Effect(job_id=ctx.job.id))
        assert (yield wait(resume, 30))

    handlers.register("slow")(handler(executor, body))
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EXECUTORS = ("threads", "asyncio")


class Step:
    def sync(self, ctx: Any) -> Any:
        raise NotImplementedError

    async def aio(self, ctx: Any) -> Any:
        raise NotImplementedError


@dataclass
class add(Step):
    obj: object

    def sync(self, ctx: Any) -> Any:
        ctx.session.add(self.obj)

    async def aio(self, ctx: Any) -> Any:
        ctx.session.add(self.obj)


@dataclass
class flush(Step):
    def sync(self, ctx: Any) -> Any:
        ctx.session.flush()

    async def aio(self, ctx: Any) -> Any:
        await ctx.session.flush()


@dataclass
class execute(Step):
    statement: Any

    def sync(self, ctx: Any) -> Any:
        # Buffered, as AsyncSession.execute's result is: an unread cursor would hold
        # SQLite's read lock in a rollback journal.
        return ctx.session.execute(self.statement).freeze()()

    async def aio(self, ctx: Any) -> Any:
        return await ctx.session.execute(self.statement)


@dataclass
class sleep(Step):
    seconds: float

    def sync(self, ctx: Any) -> Any:
        time.sleep(self.seconds)

    async def aio(self, ctx: Any) -> Any:
        await asyncio.sleep(self.seconds)


@dataclass
class wait(Step):
    """Wait for a test's ``threading.Event``; the loop stays free meanwhile."""

    event: threading.Event
    timeout: float

    def sync(self, ctx: Any) -> Any:
        return self.event.wait(self.timeout)

    async def aio(self, ctx: Any) -> Any:
        deadline = time.monotonic() + self.timeout
        while not self.event.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.event.is_set()


@dataclass
class wait_cancelled(Step):
    """Wait for ``ctx.cancel_event`` as a handler of that kind would."""

    timeout: float

    def sync(self, ctx: Any) -> Any:
        return ctx.cancel_event.wait(self.timeout)

    async def aio(self, ctx: Any) -> Any:
        try:
            await asyncio.wait_for(ctx.cancel_event.wait(), self.timeout)
        except TimeoutError:
            return False
        return True


@dataclass
class call(Step):
    """Call blocking code (the test's own queue, say): in a thread under asyncio."""

    function: Callable[[], Any]

    def sync(self, ctx: Any) -> Any:
        return self.function()

    async def aio(self, ctx: Any) -> Any:
        return await asyncio.to_thread(self.function)


@dataclass
class in_session(Step):
    """Call ``function(session)`` with the handler's sync ``Session`` (under asyncio, the
    one behind its ``AsyncSession``, in the same transaction)."""

    function: Callable[[Any], Any]

    def sync(self, ctx: Any) -> Any:
        return self.function(ctx.session)

    async def aio(self, ctx: Any) -> Any:
        return await ctx.session.run_sync(self.function)


def handler(executor: str, body: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The handler that runs ``body`` on ``executor`` ("threads" or "asyncio")."""
    if executor == "threads":

        def run(ctx: Any) -> Any:
            result = body(ctx)
            if not inspect.isgenerator(result):
                return result
            value = None
            while True:
                try:
                    step = result.send(value)
                except StopIteration as stop:
                    return stop.value
                value = step.sync(ctx)

        return run
    if executor == "asyncio":

        async def run_async(ctx: Any) -> Any:
            result = body(ctx)
            if not inspect.isgenerator(result):
                return result
            value = None
            while True:
                try:
                    step = result.send(value)
                except StopIteration as stop:
                    return stop.value
                value = await step.aio(ctx)

        return run_async
    raise ValueError(executor)
