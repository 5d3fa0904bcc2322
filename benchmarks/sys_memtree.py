"""memtree, through its public API, on PostgreSQL (psycopg 3), MariaDB (PyMySQL) and SQLite
(file, WAL)."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from sqlalchemy import BigInteger, Column, Engine, Integer, MetaData, Table, Text, insert
from sqlalchemy.orm import Session

import memtree
from benchmarks import proc
from benchmarks.dbs import Target
from benchmarks.settings import GATE_NAME, KIND, LATENCY_KIND, TX_KIND
from memtree import NewJob, Queue
from memtree.worker import AsyncJobContext, Handlers, JobContext, Worker

_metadata = MetaData()
#: The domain table a transactional handler writes one row into (created by the harness).
effects = Table(
    "bench_effects",
    _metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("job_id", Text, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
)
EFFECT_INSERT = insert(effects)


def engine_for(target: Target) -> Engine:
    return memtree.create_engine(target.url)


# -- enqueue (in the harness process) ------------------------------------------------------


def enqueue_single(target: Target, count: int, warmup: int = 20) -> float:
    """Seconds for ``count`` jobs, each in its own Session transaction, the everyday way."""
    engine = engine_for(target)
    try:
        for i in range(-warmup, count):
            if i == 0:
                start = time.perf_counter()
            with Session(engine) as session, session.begin():
                memtree.enqueue(session, NewJob(KIND, {"i": i}))
        return time.perf_counter() - start
    finally:
        engine.dispose()


def enqueue_batched(target: Target, count: int, batch: int) -> float:
    """Seconds for ``count`` jobs through ``queue.enqueue_many``, ``batch`` a transaction."""
    engine = engine_for(target)
    queue = Queue(engine)
    try:
        queue.enqueue_many([NewJob(KIND, {"i": -1})])  # connect, check the schema
        start = time.perf_counter()
        for offset in range(0, count, batch):
            queue.enqueue_many(
                NewJob(KIND, {"i": i}) for i in range(offset, min(offset + batch, count))
            )
        return time.perf_counter() - start
    finally:
        engine.dispose()


# -- claim cost (backlog workload, in the harness process) ---------------------------------


class Claimer:
    """``queue.claim_batch`` of a full batch, one claim (and transaction) at a time."""

    def __init__(self, target: Target, kinds: list[str] | None) -> None:
        self.engine = engine_for(target)
        self.queue = Queue(self.engine)
        self.kinds = kinds

    def claim(self, batch: int) -> float:
        """Seconds for one claim of ``batch`` jobs (which must all be there)."""
        start = time.perf_counter()
        claimed = self.queue.claim_batch(batch, kinds=self.kinds)
        elapsed = time.perf_counter() - start
        if len(claimed) != batch:
            raise RuntimeError(f"a claim returned {len(claimed)} jobs, not {batch}")
        return elapsed

    def close(self) -> None:
        self.engine.dispose()


# -- child processes -----------------------------------------------------------------------


def _gates(spec: dict[str, Any]) -> list[memtree.Gate]:
    """The fleet workload's global gate over the no-op kind (``spec["gate"]``: its limit
    and its key field, or None), or none."""
    gate = spec.get("gate")
    if gate is None:
        return []
    return [memtree.Gate(GATE_NAME, gate["limit"], [KIND], scope="global", key=gate["key"])]


def drain_child(spec: dict[str, Any]) -> None:
    """One worker process: ``Worker.run_until_idle()`` over a queue filled beforehand."""
    target = Target(spec["backend"], spec["url"])
    engine = engine_for(target)
    queue = Queue(engine)
    handlers = Handlers()
    if spec.get("executor") == "asyncio":
        if spec["transactional"]:

            @handlers.register(TX_KIND)
            async def write_one_row_async(ctx: AsyncJobContext) -> None:
                await ctx.session.execute(
                    EFFECT_INSERT, {"job_id": ctx.job.id, "created_at_ms": time.time_ns() // 10**6}
                )

        else:

            @handlers.register(KIND)
            async def noop_async(ctx: AsyncJobContext) -> None:
                return None

    elif spec["transactional"]:

        @handlers.register(TX_KIND)
        def write_one_row(ctx: JobContext) -> None:
            ctx.session.execute(
                EFFECT_INSERT, {"job_id": ctx.job.id, "created_at_ms": time.time_ns() // 10**6}
            )

    else:

        @handlers.register(KIND)
        def noop(ctx: JobContext) -> None:
            return None

    worker = Worker(queue, handlers, concurrency=spec["concurrency"], gates=_gates(spec))
    with queue.transaction():
        pass  # connect and check the schema before the clock starts
    proc.ready_and_wait()
    start = time.time()
    settled = worker.run_until_idle()
    end = time.time()
    engine.dispose()
    proc.result({"count": settled, "start": start, "end": end})


#: How often a fleet worker process looks whether the table is drained.
FLEET_DONE_POLL_S = 0.01


def fleet_drain_child(spec: dict[str, Any]) -> None:
    """One of a fleet's worker processes: ``Worker.run()`` (LISTEN/NOTIFY on, as deployed)
    over a queue filled beforehand, stopped once no job of the table is ready or running.

    Not ``run_until_idle()``: a worker whose global gate is full returns from it at once
    when the other processes hold every permit, so a gated fleet would end as one
    process. The end is the first look (every ``FLEET_DONE_POLL_S``) that finds the table
    drained; the count is the handler calls of this process.
    """
    import psycopg

    from benchmarks.dbs import _libpq

    engine = engine_for(Target(spec["backend"], spec["url"]))
    queue = Queue(engine)
    handlers = Handlers()
    counter = itertools.count()
    handled = 0

    @handlers.register(KIND)
    def noop(ctx: JobContext) -> None:
        nonlocal handled
        handled = next(counter) + 1

    worker = Worker(queue, handlers, concurrency=spec["concurrency"], gates=_gates(spec))
    with queue.transaction():
        pass  # connect and check the schema before the clock starts
    look = psycopg.connect(_libpq(spec["url"]), autocommit=True)
    proc.ready_and_wait()
    start = time.time()
    thread = threading.Thread(
        target=worker.run, kwargs={"install_signal_handlers": False}, daemon=True
    )
    thread.start()
    left = "SELECT EXISTS (SELECT 1 FROM mem_tree_jobs WHERE status IN ('ready', 'running'))"
    while True:
        time.sleep(FLEET_DONE_POLL_S)
        row = look.execute(left).fetchone()
        if row is not None and not row[0]:
            break
    end = time.time()
    worker.stop()
    thread.join(60)
    look.close()
    engine.dispose()
    proc.result({"count": handled, "start": start, "end": end})


def latency_worker_child(spec: dict[str, Any]) -> None:
    """An idle ``Worker.run()`` in its own process, reporting each job's start time."""
    target = Target(spec["backend"], spec["url"])
    engine = engine_for(target)
    queue = Queue(engine)
    handlers = Handlers()

    @handlers.register(LATENCY_KIND)
    def record(ctx: JobContext) -> None:
        started = time.time()
        proc.say(f"DONE {ctx.payload['seq']} {started!r}")

    worker = Worker(queue, handlers, concurrency=spec["concurrency"], gates=())
    with queue.transaction():
        pass
    proc.on_stop(worker.stop)
    proc.say("READY")
    worker.run(install_signal_handlers=False)
    engine.dispose()


def latency_inprocess_child(spec: dict[str, Any]) -> None:
    """SQLite: the worker and the producer in one process (its wake-up is in-process).

    The producer commits one job at a time at a steady rate; the result holds each
    job's commit time and its handler's start time.
    """
    target = Target(spec["backend"], spec["url"])
    engine = engine_for(target)
    queue = Queue(engine)
    handlers = Handlers()
    started: dict[int, float] = {}
    all_done = threading.Event()
    total = spec["warmup"] + spec["jobs"]

    @handlers.register(LATENCY_KIND)
    def record(ctx: JobContext) -> None:
        now = time.time()
        started[ctx.payload["seq"]] = now
        if len(started) >= total:
            all_done.set()

    worker = Worker(queue, handlers, concurrency=spec["concurrency"], gates=())
    thread = threading.Thread(
        target=worker.run, kwargs={"install_signal_handlers": False}, daemon=True
    )
    thread.start()
    time.sleep(0.5)
    proc.ready_and_wait()
    committed: dict[int, float] = {}
    interval = 1.0 / spec["rate"]
    next_at = time.monotonic()
    for seq in range(total):
        next_at += interval
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        with Session(engine) as session, session.begin():
            memtree.enqueue(session, NewJob(LATENCY_KIND, {"seq": seq}))
        committed[seq] = time.time()
    all_done.wait(30)
    worker.stop()
    thread.join(30)
    engine.dispose()
    proc.result(
        {
            "committed": {str(k): v for k, v in committed.items()},
            "started": {str(k): v for k, v in started.items()},
        }
    )


def memory_child(spec: dict[str, Any]) -> None:
    """RSS of a throughput-configured worker as it works through ``jobs`` no-op jobs."""
    target = Target(spec["backend"], spec["url"])
    engine = engine_for(target)
    queue = Queue(engine)
    handlers = Handlers()
    counter = itertools.count(1)
    step = spec["sample_every"]
    samples: list[tuple[int, int]] = []

    @handlers.register(KIND)
    def noop(ctx: JobContext) -> None:
        n = next(counter)
        if n % step == 0:
            samples.append((n, proc.rss_bytes()))

    worker = Worker(queue, handlers, concurrency=spec["concurrency"], gates=())
    with queue.transaction():
        pass
    proc.ready_and_wait()
    start_rss = proc.rss_bytes()
    start = time.time()
    settled = worker.run_until_idle()
    end = time.time()
    end_rss = proc.rss_bytes()
    engine.dispose()
    proc.result(
        {
            "count": settled,
            "start": start,
            "end": end,
            "start_rss": start_rss,
            "end_rss": end_rss,
            "samples": sorted(samples),
        }
    )
