"""Sizes of a full run and of a smoke run, and the knobs every system shares."""

from __future__ import annotations

import os
from dataclasses import dataclass

#: The server every PostgreSQL system runs on; each system gets its own database on it.
PG_ADMIN_URL = os.environ.get(
    "MEMTREE_BENCH_PG_URL",
    os.environ.get("MEMTREE_TEST_PG_URL", "postgresql://root@127.0.0.1:5432/postgres"),
)

#: The MariaDB server of the MariaDB systems (issue 14); each gets its own database on it.
MARIADB_ADMIN_URL = os.environ.get(
    "MEMTREE_BENCH_MARIADB_URL",
    os.environ.get("MEMTREE_TEST_MYSQL_URL", "mariadb+pymysql://root@127.0.0.1:3306/"),
)

#: The kind every benchmark job has: not in memtree's claim order, not gated.
KIND = "bench_noop"
#: The fleet workload's global gate over ``KIND`` (memtree.Gate(GATE_NAME, ...)).
GATE_NAME = "bench"
#: The fleet workload's gated drains: ``(case, limit, key values)``; ``None`` key values
#: is a plain global gate, otherwise each job's payload ``key`` field cycles over that
#: many values and the gate's limit holds per value (``Gate(..., key="key")``).
FLEET_GATES: tuple[tuple[str, int, int | None], ...] = (
    ("gate64-4p", 64, None),
    ("keyed1000x1-4p", 1, 1000),
    ("keyed1000x4-4p", 4, 1000),
)
#: Worker processes of the fleet workload's gated drains (memtree and floor ungated also
#: at 1, 2 and 4 processes: ``FLEET_PROCESSES``).
FLEET_GATED_PROCESSES = 4
#: Slots per worker in the fleet's equal-capacity drains: 4 x 16 = the gate's 64 permits.
FLEET_EQUAL_CONCURRENCY = 16
FLEET_PROCESSES = (1, 2, 4)

#: The kind the transactional-completion drain uses.
TX_KIND = "bench_tx"
#: The kind the latency workload uses.
LATENCY_KIND = "bench_latency"

#: memtree's worker concurrency when configured for throughput (no-op drain). The worker
#: never claims more than its free slots, so this is also its largest claim, and the
#: raw floor claims at the same batch size.
DRAIN_CONCURRENCY = 128
#: Concurrency of the transactional drain (each running handler holds a connection and
#: commits once per job), the best of 1/2/4/8/16 measured here: on PostgreSQL commits
#: overlap, on SQLite writers queue for one lock, so one thread is fastest. The floor
#: claims at the same batch size. MariaDB (a server whose commits overlap too) takes
#: PostgreSQL's 4.
TX_CONCURRENCY = {"postgresql": 4, "mariadb": 4, "sqlite": 1}
#: Worker threads of the latency workload's idle worker.
LATENCY_CONCURRENCY = 4

#: pgqueuer at its fastest: asyncpg, a large dequeue batch and unbounded concurrency.
PGQUEUER_BATCH = 1000
#: procrastinate's async worker concurrency (its no-op task is a coroutine).
PROCRASTINATE_CONCURRENCY = 32
#: huey at its fastest: one thread worker, polling every 5 ms when idle, fsync=False.
HUEY_POLL_S = 0.005

#: Rows per enqueue_many batch.
ENQUEUE_BATCH = 1000


@dataclass(frozen=True)
class Sizes:
    """How much work each workload does."""

    name: str
    enqueue_single: int
    enqueue_batched: int
    enqueue_batch: int
    drain: int
    drain_procrastinate: int
    drain_tx: int
    latency_jobs: int
    latency_rate_per_s: float
    backlog_done: tuple[int, ...]
    backlog_ready: int
    backlog_claims: int
    #: Jobs per measured claim; None means the drain's largest claim (its concurrency).
    backlog_batch: int | None
    memory_jobs: int
    memory_first_sample: int
    repeats: int
    #: Jobs per drain of the fleet workload (issue 13: gates and processes, PostgreSQL).
    fleet_drain: int
    fleet_repeats: int


FULL = Sizes(
    name="full",
    enqueue_single=2_000,
    enqueue_batched=50_000,
    enqueue_batch=ENQUEUE_BATCH,
    drain=50_000,
    drain_procrastinate=10_000,
    drain_tx=20_000,
    latency_jobs=600,
    latency_rate_per_s=50.0,
    backlog_done=(100_000, 1_000_000),
    backlog_ready=100_000,
    backlog_claims=200,
    backlog_batch=None,
    memory_jobs=200_000,
    memory_first_sample=20_000,
    repeats=2,
    fleet_drain=30_000,
    fleet_repeats=3,
)

SMOKE = Sizes(
    name="smoke",
    enqueue_single=100,
    enqueue_batched=400,
    enqueue_batch=100,
    drain=300,
    drain_procrastinate=100,
    drain_tx=100,
    latency_jobs=15,
    latency_rate_per_s=50.0,
    backlog_done=(1_000,),
    backlog_ready=1_000,
    backlog_claims=10,
    backlog_batch=32,
    memory_jobs=400,
    memory_first_sample=40,
    repeats=1,
    fleet_drain=300,
    fleet_repeats=1,
)
