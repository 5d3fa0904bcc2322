"""procrastinate (from PyPI) on PostgreSQL: its psycopg 3 connector, async no-op tasks and
an async worker with ``concurrency`` slots, otherwise its defaults."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from benchmarks import proc
from benchmarks.dbs import Target
from benchmarks.settings import KIND, LATENCY_KIND

QUEUE = "bench"


def make_app(url: str, on_latency: Any = None) -> Any:
    """An App on ``url`` with the benchmark's two tasks registered under fixed names."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name=KIND, queue=QUEUE)
    async def noop(i: int) -> None:
        return None

    @app.task(name=LATENCY_KIND, queue=QUEUE)
    async def latency(seq: int) -> None:
        if on_latency is not None:
            on_latency(seq, time.time())

    return app


def install(target: Target) -> None:
    app = make_app(target.url)
    with app.open():
        app.schema_manager.apply_schema()


def _task(app: Any, name: str) -> Any:
    return app.tasks[name]


def enqueue_single(target: Target, count: int, warmup: int = 20) -> float:
    """``task.defer()`` per job (each its own transaction)."""
    app = make_app(target.url)
    with app.open():
        task = _task(app, KIND)
        for i in range(-warmup, count):
            if i == 0:
                start = time.perf_counter()
            task.defer(i=i)
        return time.perf_counter() - start


def enqueue_batched(target: Target, count: int, batch: int) -> float:
    """``task.batch_defer()``, ``batch`` jobs a call."""
    app = make_app(target.url)
    with app.open():
        task = _task(app, KIND)
        start = time.perf_counter()
        for offset in range(0, count, batch):
            task.batch_defer(*({"i": i} for i in range(offset, min(offset + batch, count))))
        return time.perf_counter() - start


def clear(target: Target) -> None:
    import psycopg

    with psycopg.connect(target.url, autocommit=True) as conn:
        conn.execute("TRUNCATE procrastinate_jobs CASCADE")


def drain_child(spec: dict[str, Any]) -> None:
    """``run_worker_async(wait=False)``: works until it has caught up with the queue."""

    async def go() -> dict[str, Any]:
        app = make_app(spec["url"])
        async with app.open_async():
            await asyncio.get_running_loop().run_in_executor(None, proc.ready_and_wait)
            start = time.time()
            await app.run_worker_async(
                queues=[QUEUE],
                concurrency=spec["concurrency"],
                wait=False,
                install_signal_handlers=False,
            )
            end = time.time()
            count = await app.connector.execute_query_one_async(
                "SELECT count(*) AS n FROM procrastinate_jobs WHERE status = 'succeeded'"
            )
        return {"count": int(count["n"]), "start": start, "end": end}

    proc.result(asyncio.run(go()))


def latency_worker_child(spec: dict[str, Any]) -> None:
    """An idle worker (LISTEN/NOTIFY on) in its own process, reporting each job's start."""

    async def go() -> None:
        app = make_app(spec["url"], on_latency=lambda seq, t: proc.say(f"DONE {seq} {t!r}"))
        async with app.open_async():
            loop = asyncio.get_running_loop()
            worker = asyncio.create_task(
                app.run_worker_async(
                    queues=[QUEUE],
                    concurrency=spec["concurrency"],
                    wait=True,
                    install_signal_handlers=False,
                )
            )
            proc.on_stop(lambda: loop.call_soon_threadsafe(worker.cancel))
            loop.call_later(0.5, proc.say, "READY")
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    asyncio.run(go())


class Producer:
    """Defers latency jobs one at a time from the harness (sync API, psycopg)."""

    def __init__(self, target: Target) -> None:
        self.app = make_app(target.url)
        self.app.open()
        self.task = _task(self.app, LATENCY_KIND)

    def enqueue(self, seq: int) -> None:
        self.task.defer(seq=seq)

    def close(self) -> None:
        self.app.close()
