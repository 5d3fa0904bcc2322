"""huey (from PyPI): ``SqliteHuey`` on a SQLite file (WAL), at its fastest configuration:
one thread worker, ``fsync=False`` (synchronous=OFF, the fastest setting huey offers),
no result storage for a task returning None, polling every 5 ms when idle."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from benchmarks import proc
from benchmarks.dbs import Target
from benchmarks.settings import HUEY_POLL_S, KIND, LATENCY_KIND


@dataclass
class App:
    huey: Any
    noop: Any
    latency: Any


def make_huey(
    path: str, *, fsync: bool | None = False, on_noop: Any = None, on_latency: Any = None
) -> App:
    """A SqliteHuey on ``path`` with the benchmark's two tasks under fixed names.

    ``fsync=False`` is huey's fastest setting (synchronous=OFF); ``None`` is its default
    (SQLite's own, synchronous=FULL).
    """
    from huey import SqliteHuey

    huey = SqliteHuey("bench", filename=path, fsync=fsync, journal_mode="wal")

    def noop(i: int) -> None:
        if on_noop is not None:
            on_noop()

    def latency(seq: int) -> None:
        if on_latency is not None:
            on_latency(seq, time.time())

    return App(huey, huey.task(name=KIND)(noop), huey.task(name=LATENCY_KIND)(latency))


def enqueue_single(target: Target, count: int, warmup: int = 20) -> float:
    """One task call (one INSERT, its own transaction) per job."""
    app = make_huey(target.path)
    for i in range(-warmup, count):
        if i == 0:
            start = time.perf_counter()
        app.noop(i)
    elapsed = time.perf_counter() - start
    app.huey.storage.close()
    return elapsed


def fill(target: Target, count: int, fsync: bool | None = False) -> None:
    """Enqueue ``count`` no-op tasks (before a drain; not timed)."""
    app = make_huey(target.path, fsync=fsync)
    for i in range(count):
        app.noop(i)
    app.huey.storage.close()


def _consumer(huey: Any) -> Any:
    return huey.create_consumer(
        workers=1,
        worker_type="thread",
        periodic=False,
        initial_delay=HUEY_POLL_S,
        backoff=1.0,
        max_delay=HUEY_POLL_S,
        check_worker_health=False,
    )


def drain_child(spec: dict[str, Any]) -> None:
    """One consumer (one thread worker) until it has run ``count`` tasks."""
    lock = threading.Lock()
    done = 0
    finished = threading.Event()
    total = spec["count"]

    def count_one() -> None:
        nonlocal done
        with lock:
            done += 1
            if done >= total:
                finished.set()

    consumer = _consumer(make_huey(spec["path"], fsync=spec["fsync"], on_noop=count_one).huey)
    proc.ready_and_wait()
    start = time.time()
    consumer.start()
    finished.wait(600)
    end = time.time()
    consumer.stop(graceful=True)
    proc.result({"count": done, "start": start, "end": end})


def latency_worker_child(spec: dict[str, Any]) -> None:
    """An idle consumer in its own process, reporting each task's start."""
    stop = threading.Event()
    app = make_huey(spec["path"], on_latency=lambda seq, t: proc.say(f"DONE {seq} {t!r}"))
    consumer = _consumer(app.huey)
    consumer.start()
    proc.on_stop(stop.set)
    proc.say("READY")
    stop.wait()
    consumer.stop(graceful=True)


class Producer:
    """Enqueues latency tasks one at a time from the harness."""

    def __init__(self, target: Target) -> None:
        self.app = make_huey(target.path)

    def enqueue(self, seq: int) -> None:
        self.app.latency(seq)

    def close(self) -> None:
        self.app.huey.storage.close()
