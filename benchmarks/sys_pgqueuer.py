"""pgqueuer (from PyPI) on PostgreSQL, at its fastest configuration: the asyncpg driver,
a large dequeue batch, no concurrency cap, uvloop, async no-op entrypoints."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from benchmarks import proc
from benchmarks.dbs import Target
from benchmarks.settings import KIND, LATENCY_KIND

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop comes with pgqueuer's dependencies
        return asyncio.new_event_loop()


def _run(factory: Callable[[], Awaitable[T]]) -> T:
    loop = _new_loop()
    try:
        return loop.run_until_complete(factory())
    finally:
        loop.close()


async def _queries(url: str) -> Any:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(url)
    return conn, Queries(AsyncpgDriver(conn))


def install(target: Target) -> None:
    async def go() -> None:
        conn, queries = await _queries(target.url)
        try:
            await queries.install()
        finally:
            await conn.close()

    _run(go)


def _payload(i: int) -> bytes:
    return b'{"i": %d}' % i


def enqueue_single(target: Target, count: int, warmup: int = 20) -> float:
    """One ``queries.enqueue`` (one statement, autocommitted) per job."""

    async def go() -> float:
        conn, queries = await _queries(target.url)
        try:
            for i in range(-warmup, count):
                if i == 0:
                    start = time.perf_counter()
                await queries.enqueue(KIND, _payload(i))
            return time.perf_counter() - start
        finally:
            await conn.close()

    return _run(go)


def enqueue_batched(target: Target, count: int, batch: int, kind: str = KIND) -> float:
    """``queries.enqueue`` with lists, ``batch`` jobs a statement."""

    async def go() -> float:
        conn, queries = await _queries(target.url)
        try:
            start = time.perf_counter()
            for offset in range(0, count, batch):
                size = min(batch, count - offset)
                await queries.enqueue(
                    [kind] * size, [_payload(offset + i) for i in range(size)], [0] * size
                )
            return time.perf_counter() - start
        finally:
            await conn.close()

    return _run(go)


def clear(target: Target) -> None:
    async def go() -> None:
        conn, queries = await _queries(target.url)
        try:
            await queries.clear_queue()
            await queries.clear_queue_log()
            await queries.clear_statistics_log()
        finally:
            await conn.close()

    _run(go)


def drain_child(spec: dict[str, Any]) -> None:
    """``QueueManager.run(mode=drain)`` over a queue filled beforehand."""
    from pgqueuer.qm import QueueManager
    from pgqueuer.types import QueueExecutionMode

    async def go() -> dict[str, Any]:
        conn, queries = await _queries(spec["url"])
        qm = QueueManager(queries)
        done = 0

        @qm.entrypoint(KIND)
        async def noop(job: Any) -> None:
            nonlocal done
            done += 1

        await asyncio.get_running_loop().run_in_executor(None, proc.ready_and_wait)
        start = time.time()
        await qm.run(
            batch_size=spec["batch"],
            mode=QueueExecutionMode.drain,
            dequeue_timeout=timedelta(milliseconds=50),
        )
        end = time.time()
        await conn.close()
        return {"count": done, "start": start, "end": end}

    proc.result(_run(go))


def latency_worker_child(spec: dict[str, Any]) -> None:
    """An idle ``QueueManager.run()`` in its own process, reporting each job's start."""
    from pgqueuer.qm import QueueManager

    async def go() -> None:
        conn, queries = await _queries(spec["url"])
        qm = QueueManager(queries)

        @qm.entrypoint(LATENCY_KIND)
        async def record(job: Any) -> None:
            started = time.time()
            proc.say(f"DONE {json.loads(job.payload)['seq']} {started!r}")

        loop = asyncio.get_running_loop()
        proc.on_stop(lambda: loop.call_soon_threadsafe(qm.shutdown.set))
        loop.call_later(0.5, proc.say, "READY")
        await qm.run(batch_size=spec["batch"])
        await conn.close()

    _run(go)


class Producer:
    """Enqueues latency jobs one at a time from the harness, on one asyncpg connection."""

    def __init__(self, target: Target) -> None:
        self.loop = _new_loop()
        self.conn, self.queries = self.loop.run_until_complete(_queries(target.url))

    def enqueue(self, seq: int) -> None:
        self.loop.run_until_complete(self.queries.enqueue(LATENCY_KIND, b'{"seq": %d}' % seq))

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()
