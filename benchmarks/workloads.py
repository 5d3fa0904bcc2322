"""The five workloads of issue 5 and issue 13's fleet, each run on every selected system
that is installed."""

from __future__ import annotations

import contextlib
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from rich.console import Console
from sqlalchemy.orm import Session

import memtree
from benchmarks import dbs, proc, sys_floor, sys_memtree
from benchmarks.dbs import Databases, Target
from benchmarks.settings import (
    FLEET_EQUAL_CONCURRENCY,
    FLEET_GATED_PROCESSES,
    FLEET_GATES,
    FLEET_PROCESSES,
    GATE_NAME,
    HUEY_POLL_S,
    KIND,
    LATENCY_CONCURRENCY,
    LATENCY_KIND,
    PGQUEUER_BATCH,
    PROCRASTINATE_CONCURRENCY,
    TX_CONCURRENCY,
    TX_KIND,
    Sizes,
)

WORKLOADS = ("enqueue", "drain", "fleet", "latency", "backlog", "memory")


@dataclass(frozen=True)
class System:
    name: str
    backend: str  # "postgresql", "mariadb" or "sqlite"
    family: str  # memtree, floor, pgqueuer, procrastinate, huey
    label: str
    modules: tuple[str, ...] = ()  # what must be importable


SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System("memtree-pg", "postgresql", "memtree", "memtree (PostgreSQL, psycopg 3)"),
        System("floor-pg", "postgresql", "floor", "raw-SQL floor (psycopg 3)"),
        System("pgqueuer", "postgresql", "pgqueuer", "pgqueuer (asyncpg)", ("pgqueuer", "asyncpg")),
        System("procrastinate", "postgresql", "procrastinate", "procrastinate", ("procrastinate",)),
        System("memtree-sqlite", "sqlite", "memtree", "memtree (SQLite, WAL, NORMAL)"),
        # The same worker with async def handlers (the asyncio executor); drain only.
        System("memtree-pg-async", "postgresql", "memtree-async", "memtree, async handlers (PG)"),
        System(
            "memtree-sqlite-async", "sqlite", "memtree-async", "memtree, async handlers (SQLite)"
        ),
        System("floor-sqlite", "sqlite", "floor", "raw-SQL floor (sqlite3, WAL, NORMAL)"),
        System("huey", "sqlite", "huey", "huey SqliteHuey (fsync=False)", ("huey",)),
        System("huey-default", "sqlite", "huey", "huey SqliteHuey (defaults: FULL)", ("huey",)),
        # Issue 14: MariaDB (InnoDB, READ COMMITTED), through PyMySQL.
        System("memtree-mariadb", "mariadb", "memtree", "memtree (MariaDB, PyMySQL)", ("pymysql",)),
        System("floor-mariadb", "mariadb", "floor", "raw-SQL floor (PyMySQL)", ("pymysql",)),
    )
}
PEERS = ("pgqueuer", "procrastinate", "huey")


@dataclass
class Figure:
    """One measured number."""

    workload: str
    case: str
    system: str
    metric: str  # "jobs/s", "ms", "MiB", "%"
    value: float
    detail: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "case": self.case,
            "system": self.system,
            "metric": self.metric,
            "value": self.value,
            "detail": self.detail,
        }


@dataclass
class Run:
    sizes: Sizes
    databases: Databases
    systems: list[str]
    concurrency: int
    console: Console
    figures: list[Figure] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)

    def has(self, system: str) -> bool:
        return system in self.systems

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        self.console.log(
            f"[bold]{figure.workload}[/] {figure.case:<28} {figure.system:<15} "
            f"{_fmt(figure.value)} {figure.metric}"
        )

    @contextlib.contextmanager
    def target(self, system: str) -> Iterator[Target]:
        """A fresh database for ``system``, with its schema, dropped afterwards."""
        spec = SYSTEMS[system]
        if spec.backend == "postgresql":
            target = self.databases.pg(system)
        elif spec.backend == "mariadb":
            target = self.databases.mariadb(system)
        else:
            target = self.databases.sqlite(system)
        try:
            if spec.family in ("memtree", "memtree-async", "floor"):
                dbs.migrate_memtree(target)
            elif spec.family == "pgqueuer":
                from benchmarks import sys_pgqueuer

                sys_pgqueuer.install(target)
            elif spec.family == "procrastinate":
                from benchmarks import sys_procrastinate

                sys_procrastinate.install(target)
            yield target
        finally:
            self.databases.drop(target)

    def guarded(self, workload: str, case: str, system: str, work: Callable[[], None]) -> None:
        """Run one measurement; a failure is recorded and the run goes on."""
        try:
            work()
        except Exception as exc:
            self.record_failure(workload, case, system, exc)

    def record_failure(self, workload: str, case: str, system: str, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        self.errors.append(
            {
                "workload": workload,
                "case": case,
                "system": system,
                "error": message,
                "traceback": traceback.format_exc()[-4000:],
            }
        )
        self.console.log(f"[red]{workload} {case} {system} failed:[/] {message[:500]}")

    def interleaved(self, measurements: list[Measurement]) -> None:
        """Run ``measurements`` in rounds, each once a round, and record each one's best.

        This machine's speed drifts by tens of percent over minutes (a shared virtual
        machine, a disk whose fsyncs vary), so a system measured twice in a row and then
        its floor twice in a row could be compared across a drift. In rounds, every
        system of a comparison sees the same drift. A measurement that fails is recorded
        and leaves the later rounds.
        """
        runs: dict[int, list[float]] = {i: [] for i in range(len(measurements))}
        failed: set[int] = set()
        for round_ in range(max((m.runs or self.sizes.repeats for m in measurements), default=0)):
            for i, m in enumerate(measurements):
                if i in failed or round_ >= (m.runs or self.sizes.repeats):
                    continue
                try:
                    runs[i].append(m.measure())
                except Exception as exc:
                    failed.add(i)
                    self.record_failure(m.workload, m.case, m.system, exc)
        for i, m in enumerate(measurements):
            if i not in failed and runs[i]:
                best = max(runs[i])
                self.add(Figure(m.workload, m.case, m.system, m.metric, best, m.detail(runs[i])))


@dataclass
class Measurement:
    """One rate (higher is better) measured in :meth:`Run.interleaved` rounds: its best
    run is kept."""

    workload: str
    case: str
    system: str
    metric: str
    measure: Callable[[], float]
    detail: Callable[[list[float]], dict[str, Any]]
    runs: int | None = None  # None: the size's repeats


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1), linear between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# -- 1. enqueue ----------------------------------------------------------------------------


def _module(system: str) -> Any:
    family = SYSTEMS[system].family
    if family == "memtree":
        return sys_memtree
    if family == "floor":
        return sys_floor
    if family == "pgqueuer":
        from benchmarks import sys_pgqueuer

        return sys_pgqueuer
    if family == "procrastinate":
        from benchmarks import sys_procrastinate

        return sys_procrastinate
    from benchmarks import sys_huey

    return sys_huey


def _enqueue_single(run: Run, system: str) -> Measurement:
    jobs = run.sizes.enqueue_single
    module = _module(system)

    def measure() -> float:
        with run.target(system) as target:
            return float(jobs / module.enqueue_single(target, jobs))

    return Measurement(
        "enqueue", "single", system, "jobs/s", measure, lambda runs: {"runs": runs, "jobs": jobs}
    )


def _enqueue_batched(run: Run, system: str) -> Measurement:
    jobs, batch = run.sizes.enqueue_batched, run.sizes.enqueue_batch
    module = _module(system)

    def measure() -> float:
        with run.target(system) as target:
            return float(jobs / module.enqueue_batched(target, jobs, batch))

    return Measurement(
        "enqueue",
        "batched",
        system,
        "jobs/s",
        measure,
        lambda runs: {"runs": runs, "jobs": jobs, "batch": batch},
    )


def enqueue(run: Run) -> None:
    measurements = []
    for system in run.systems:
        if system == "huey-default":
            continue  # huey's default durability shows in the drain; enqueue is at its fastest
        measurements.append(_enqueue_single(run, system))
        if hasattr(_module(system), "enqueue_batched"):
            measurements.append(_enqueue_batched(run, system))
    run.interleaved(measurements)


# -- 2. drain ------------------------------------------------------------------------------


def _throughput(results: list[dict[str, Any]], expected: int) -> float:
    count = sum(int(r["count"]) for r in results)
    if count != expected:
        raise RuntimeError(f"{count} jobs were worked, not {expected}")
    elapsed = float(max(r["end"] for r in results) - min(r["start"] for r in results))
    return expected / elapsed


def _drain_sql(
    run: Run,
    system: str,
    processes: int,
    transactional: bool,
    *,
    fleet: tuple[str, int, int | None] | None = None,
    workload: str = "drain",
    concurrency: int | None = None,
) -> Measurement:
    """memtree's worker, or the floor, over jobs filled with raw SQL; in the fleet
    workload (``workload="fleet"``) its own job count and repeats, and memtree's workers
    may go through a global gate (``fleet``: case, limit, key values)."""
    family = SYSTEMS[system].family
    jobs = run.sizes.drain_tx if transactional else run.sizes.drain
    if workload == "fleet":
        jobs = run.sizes.fleet_drain
    batch = TX_CONCURRENCY[SYSTEMS[system].backend] if transactional else run.concurrency
    if concurrency is not None:
        batch = concurrency
    keys = fleet[2] if fleet is not None else None

    def measure() -> float:
        with run.target(system) as target:
            dbs.fill(target, jobs, kind=TX_KIND if transactional else KIND, keys=keys)
            dbs.analyze(target)
            spec: dict[str, Any] = {
                "backend": target.backend,
                "url": target.url,
                "transactional": transactional,
            }
            if family in ("memtree", "memtree-async"):
                role, spec["concurrency"] = "memtree-drain", batch
                spec["executor"] = "asyncio" if family == "memtree-async" else "threads"
                if workload == "fleet":
                    role = "memtree-fleet-drain"  # Worker.run(), stopped once drained
                if fleet is not None:
                    spec["gate"] = {"limit": fleet[1], "key": "key" if keys else None}
            else:
                role, spec["batch"] = "floor-drain", batch
            rate = _throughput(proc.run_together(role, [spec] * processes, timeout=1800), jobs)
            done = dbs.count_status(target, "done")
            if done != jobs:
                raise RuntimeError(f"{done} jobs are done, not {jobs}")
            if transactional and dbs.count_effects(target) != jobs:
                raise RuntimeError("a transactional drain wrote the wrong number of rows")
            return rate

    def detail(runs: list[float]) -> dict[str, Any]:
        described: dict[str, Any] = {"runs": runs, "jobs": jobs, "processes": processes}
        described["claim_batch" if family == "floor" else "concurrency"] = batch
        if workload == "fleet":
            described["gate"] = (
                None
                if fleet is None
                else f"Gate({GATE_NAME!r}, {fleet[1]}, [{KIND!r}], scope='global'"
                + (", key='key')" if keys else ")")
            )
            described["key_values"] = keys
        return described

    case = "tx-1p" if transactional else f"noop-{processes}p"
    if fleet is not None:
        case = fleet[0]
    if concurrency is not None:
        case += f"-c{concurrency}"
    runs = run.sizes.fleet_repeats if workload == "fleet" else None
    return Measurement(workload, case, system, "jobs/s", measure, detail, runs=runs)


def _drain_pgqueuer(run: Run, processes: int) -> Measurement:
    from benchmarks import sys_pgqueuer

    jobs = run.sizes.drain

    def measure() -> float:
        with run.target("pgqueuer") as target:
            sys_pgqueuer.enqueue_batched(target, jobs, 1000)
            spec = {"url": target.url, "batch": PGQUEUER_BATCH}
            return _throughput(
                proc.run_together("pgqueuer-drain", [spec] * processes, timeout=1800), jobs
            )

    def detail(runs: list[float]) -> dict[str, Any]:
        return {"runs": runs, "jobs": jobs, "processes": processes, "batch_size": PGQUEUER_BATCH}

    return Measurement("drain", f"noop-{processes}p", "pgqueuer", "jobs/s", measure, detail)


def _drain_procrastinate(run: Run) -> Measurement:
    from benchmarks import sys_procrastinate

    jobs = run.sizes.drain_procrastinate

    def measure() -> float:
        with run.target("procrastinate") as target:
            sys_procrastinate.enqueue_batched(target, jobs, 1000)
            spec = {"url": target.url, "concurrency": PROCRASTINATE_CONCURRENCY}
            return _throughput(proc.run_together("procrastinate-drain", [spec], timeout=1800), jobs)

    def detail(runs: list[float]) -> dict[str, Any]:
        return {
            "runs": runs,
            "jobs": jobs,
            "processes": 1,
            "concurrency": PROCRASTINATE_CONCURRENCY,
        }

    # Slow and steady: one run.
    return Measurement("drain", "noop-1p", "procrastinate", "jobs/s", measure, detail, runs=1)


def _drain_huey(run: Run, system: str) -> Measurement:
    from benchmarks import sys_huey

    jobs = run.sizes.drain
    fsync = False if system == "huey" else None

    def measure() -> float:
        with run.target(system) as target:
            sys_huey.fill(target, jobs, fsync=fsync)
            spec = {"path": target.path, "count": jobs, "fsync": fsync}
            return _throughput(proc.run_together("huey-drain", [spec], timeout=1800), jobs)

    def detail(runs: list[float]) -> dict[str, Any]:
        return {
            "runs": runs,
            "jobs": jobs,
            "processes": 1,
            "workers": 1,
            "fsync": fsync,
            "poll_s": HUEY_POLL_S,
        }

    # huey's defaults are measured once, for reference; its fastest setting is the peer.
    runs = None if system == "huey" else 1
    return Measurement("drain", "noop-1p", system, "jobs/s", measure, detail, runs=runs)


def drain(run: Run) -> None:
    measurements = []
    for system in run.systems:
        family = SYSTEMS[system].family
        if family in ("memtree", "floor"):
            measurements += [_drain_sql(run, system, processes, False) for processes in (1, 2)]
            measurements.append(_drain_sql(run, system, 1, True))
        elif family == "memtree-async":
            measurements.append(_drain_sql(run, system, 1, False))
            measurements.append(_drain_sql(run, system, 1, True))
        elif family == "pgqueuer":
            measurements += [_drain_pgqueuer(run, processes) for processes in (1, 2)]
        elif family == "procrastinate":
            measurements.append(_drain_procrastinate(run))
        elif family == "huey":
            measurements.append(_drain_huey(run, system))
    run.interleaved(measurements)


# -- 2b. fleet (issue 13) ------------------------------------------------------------------


def fleet(run: Run) -> None:
    """PostgreSQL no-op drains across worker processes: memtree and the floor at 1, 2 and
    4 processes (connections), and memtree's 4 processes through a global gate (at limit
    64, and partitioned over 1,000 keys), all interleaved in the same rounds."""
    measurements = []
    for system in run.systems:
        spec = SYSTEMS[system]
        if spec.backend != "postgresql" or spec.family not in ("memtree", "floor"):
            continue
        measurements += [
            _drain_sql(run, system, processes, False, workload="fleet")
            for processes in FLEET_PROCESSES
        ]
        if spec.family == "memtree":
            measurements += [
                _drain_sql(run, system, FLEET_GATED_PROCESSES, False, fleet=g, workload="fleet")
                for g in FLEET_GATES
            ]
            # The same gate when the fleet's slots are as many as its permits (4 x 16 =
            # 64): the gate then costs only its own work, not the in-flight bound.
            gate = FLEET_GATES[0]
            measurements += [
                _drain_sql(
                    run,
                    system,
                    FLEET_GATED_PROCESSES,
                    False,
                    fleet=fleet_gate,
                    workload="fleet",
                    concurrency=FLEET_EQUAL_CONCURRENCY,
                )
                for fleet_gate in (None, gate)
            ]
    run.interleaved(measurements)


# -- 3. latency ----------------------------------------------------------------------------

LATENCY_WARMUP = 10


def _paced(
    enqueue_one: Callable[[int], None], count: int, rate: float, first: int = 0
) -> dict[int, float]:
    """Enqueue ``count`` jobs one at a time at ``rate`` a second; commit times by seq."""
    committed: dict[int, float] = {}
    interval = 1.0 / rate
    next_at = time.monotonic()
    for seq in range(first, first + count):
        next_at += interval
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        enqueue_one(seq)
        committed[seq] = time.time()
    return committed


def _collect(child: proc.Child, wanted: set[int], timeout: float) -> dict[int, float]:
    started: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while not wanted.issubset(started):
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sorted(wanted - set(started))[:10]
            raise RuntimeError(f"jobs never started: {missing}")
        line = child.readline(left)
        if line.startswith("DONE "):
            _, seq, at = line.split()
            started[int(seq)] = float(at)
    return started


def _latency_figures(
    run: Run, system: str, committed: dict[int, float], started: dict[int, float], how: str
) -> None:
    latencies = [(started[seq] - committed[seq]) * 1000 for seq in committed]
    detail = {
        "jobs": len(latencies),
        "rate_per_s": run.sizes.latency_rate_per_s,
        "mean_ms": statistics.fmean(latencies),
        "max_ms": max(latencies),
        "min_ms": min(latencies),
        "worker": how,
    }
    run.add(Figure("latency", "p50", system, "ms", percentile(latencies, 0.5), detail))
    run.add(Figure("latency", "p99", system, "ms", percentile(latencies, 0.99), detail))


class _MemtreeProducer:
    """memtree's everyday enqueue from the harness: a Session transaction per job."""

    def __init__(self, target: Target) -> None:
        self.engine = sys_memtree.engine_for(target)

    def enqueue(self, seq: int) -> None:
        with Session(self.engine) as session, session.begin():
            memtree.enqueue(session, memtree.NewJob(LATENCY_KIND, {"seq": seq}))

    def close(self) -> None:
        self.engine.dispose()


def _latency_other_process(run: Run, system: str) -> None:
    """A worker idling in its own process; the harness commits one job at a time."""
    family = SYSTEMS[system].family
    role = f"{family}-latency-worker"
    producer_of: Callable[[Target], Any]
    if family == "memtree":
        producer_of = _MemtreeProducer
        how = f"Worker.run() in another process, concurrency {LATENCY_CONCURRENCY}"
    elif family == "pgqueuer":
        from benchmarks import sys_pgqueuer

        producer_of = sys_pgqueuer.Producer
        how = f"QueueManager.run() in another process, batch_size {PGQUEUER_BATCH}"
    elif family == "procrastinate":
        from benchmarks import sys_procrastinate

        producer_of = sys_procrastinate.Producer
        how = "run_worker_async() in another process, LISTEN/NOTIFY on"
    else:
        from benchmarks import sys_huey

        producer_of = sys_huey.Producer
        how = f"consumer in another process, polling every {HUEY_POLL_S * 1000:.0f} ms"
    sizes = run.sizes
    with run.target(system) as target:
        spec = {
            "backend": target.backend,
            "url": target.url,
            "path": target.path if not target.is_server else None,
            "concurrency": LATENCY_CONCURRENCY,
            "batch": PGQUEUER_BATCH,
        }
        child = proc.Child(role, spec)
        producer = None
        try:
            child.expect("READY", 120)
            producer = producer_of(target)
            time.sleep(0.5)
            _paced(producer.enqueue, LATENCY_WARMUP, sizes.latency_rate_per_s)
            _collect(child, set(range(LATENCY_WARMUP)), 30)
            committed = _paced(
                producer.enqueue, sizes.latency_jobs, sizes.latency_rate_per_s, LATENCY_WARMUP
            )
            started = _collect(child, set(committed), 60)
            child.send("STOP")
        finally:
            if producer is not None:
                producer.close()
            child.close()
    _latency_figures(run, system, committed, started, how)


def _latency_in_process(run: Run, system: str) -> None:
    """SQLite: the worker and the producer in one process."""
    sizes = run.sizes
    with run.target(system) as target:
        spec = {
            "backend": target.backend,
            "url": target.url,
            "concurrency": LATENCY_CONCURRENCY,
            "warmup": LATENCY_WARMUP,
            "jobs": sizes.latency_jobs,
            "rate": sizes.latency_rate_per_s,
        }
        (result,) = proc.run_together("memtree-latency-inprocess", [spec], timeout=600)
    committed = {int(k): v for k, v in result["committed"].items() if int(k) >= LATENCY_WARMUP}
    started = {int(k): v for k, v in result["started"].items()}
    how = f"Worker.run() in the producer's process, concurrency {LATENCY_CONCURRENCY}"
    _latency_figures(run, system, committed, started, how)


def latency(run: Run) -> None:
    for system in run.systems:
        if system == "memtree-sqlite":
            run.guarded("latency", "p50", system, partial(_latency_in_process, run, system))
        elif system in ("memtree-pg", "pgqueuer", "procrastinate", "huey"):
            run.guarded("latency", "p50", system, partial(_latency_other_process, run, system))


# -- 4. backlog ----------------------------------------------------------------------------

BACKLOG_WARMUP = 3


def _backlog_claimers(
    run: Run, stack: contextlib.ExitStack, system: str, scenario: str, done: int, ready: int
) -> list[tuple[str, int, int, Any]]:
    """Fill one database for ``system`` in ``scenario``; its claimers, one per variant
    (the worker's claim of its own kinds and ``claim_batch`` of all kinds for memtree, the
    raw claim for the floor), as ``(case, done rows, ready rows, claimer)``."""
    sizes = run.sizes
    batch = sizes.backlog_batch or run.concurrency
    memtree_family = SYSTEMS[system].family == "memtree"
    variants: list[tuple[str, list[str] | None]] = (
        [("worker", [KIND]), ("all-kinds", None)] if memtree_family else [("raw", [KIND])]
    )
    waiting = max(ready, (sizes.backlog_claims + BACKLOG_WARMUP) * batch * len(variants))
    target = stack.enter_context(run.target(system))
    dbs.fill(target, done, kind=KIND, status="done", start_ms=dbs.now_ms() - 10**7)
    dbs.fill(target, waiting, kind=KIND)
    dbs.analyze(target)
    claimers = []
    for name, kinds in variants:
        claimer: Any = (
            sys_memtree.Claimer(target, kinds) if memtree_family else sys_floor.Claimer(target)
        )
        stack.callback(claimer.close)
        claimers.append((f"{scenario}/{name}", done, waiting, claimer))
    return claimers


def _backlog_backend(run: Run, systems: list[str]) -> None:
    """Claim costs of every scenario of ``systems`` (one backend), measured in rounds.

    Every database is filled first; then each round makes one claim in each of them, so
    that the machine's drift over the minutes of a run weighs on every scenario alike and
    the ratios to the empty table compare claims made side by side.
    """
    sizes = run.sizes
    batch = sizes.backlog_batch or run.concurrency
    scenarios: list[tuple[str, int, int]] = [("empty", 0, 0)]
    scenarios += [(f"done-{done}", done, 0) for done in sizes.backlog_done]
    scenarios.append((f"ready-{sizes.backlog_ready}", 0, sizes.backlog_ready))
    with contextlib.ExitStack() as stack:
        claimers: list[tuple[str, str, int, int, Any]] = []
        for system in systems:
            for scenario, done, ready in scenarios:
                try:
                    for case, rows, waiting, claimer in _backlog_claimers(
                        run, stack, system, scenario, done, ready
                    ):
                        claimers.append((system, case, rows, waiting, claimer))
                except Exception as exc:
                    run.record_failure("backlog", scenario, system, exc)
        costs: dict[int, list[float]] = {i: [] for i in range(len(claimers))}
        failed: set[int] = set()
        for round_ in range(BACKLOG_WARMUP + sizes.backlog_claims):
            for i, (system, case, _, _, claimer) in enumerate(claimers):
                if i in failed:
                    continue
                try:
                    elapsed = claimer.claim(batch)
                except Exception as exc:
                    failed.add(i)
                    run.record_failure("backlog", case, system, exc)
                    continue
                if round_ >= BACKLOG_WARMUP:
                    costs[i].append(elapsed * 1000)
        for i, (system, case, done, waiting, _) in enumerate(claimers):
            if i in failed:
                continue
            ms = costs[i]
            detail = {
                "claims": len(ms),
                "batch": batch,
                "done_rows": done,
                "ready_rows": waiting,
                "mean_ms": statistics.fmean(ms),
                "p95_ms": percentile(ms, 0.95),
                "interleaved_with": len(claimers),
            }
            run.add(Figure("backlog", case, system, "ms", statistics.median(ms), detail))


def backlog(run: Run) -> None:
    for backend in ("postgresql", "mariadb", "sqlite"):
        systems = [
            system
            for system in run.systems
            if SYSTEMS[system].backend == backend and SYSTEMS[system].family in ("memtree", "floor")
        ]
        if systems:
            _backlog_backend(run, systems)


# -- 5. memory -----------------------------------------------------------------------------


def _memory(run: Run, system: str) -> None:
    sizes = run.sizes
    with run.target(system) as target:
        dbs.fill(target, sizes.memory_jobs, kind=KIND)
        dbs.analyze(target)
        spec = {
            "backend": target.backend,
            "url": target.url,
            "concurrency": run.concurrency,
            "sample_every": sizes.memory_first_sample,
        }
        (result,) = proc.run_together("memtree-memory", [spec], timeout=1800)
    if result["count"] != sizes.memory_jobs:
        raise RuntimeError(f"{result['count']} jobs worked, not {sizes.memory_jobs}")
    samples = {n: rss for n, rss in result["samples"]}
    first = samples[sizes.memory_first_sample]
    last = samples.get(sizes.memory_jobs, result["end_rss"])
    detail = {
        "jobs": sizes.memory_jobs,
        "concurrency": run.concurrency,
        "samples_mib": [[n, rss / 2**20] for n, rss in result["samples"]],
        "start_rss_mib": result["start_rss"] / 2**20,
        "jobs_per_s": sizes.memory_jobs / (result["end"] - result["start"]),
        "first_sample_at": sizes.memory_first_sample,
    }
    run.add(Figure("memory", "rss-first", system, "MiB", first / 2**20, detail))
    run.add(Figure("memory", "rss-last", system, "MiB", last / 2**20, detail))
    run.add(Figure("memory", "growth", system, "%", (last / first - 1) * 100, detail))


def memory(run: Run) -> None:
    for system in run.systems:
        if SYSTEMS[system].family == "memtree":
            run.guarded("memory", "rss", system, partial(_memory, run, system))


RUNNERS: dict[str, Callable[[Run], None]] = {
    "enqueue": enqueue,
    "drain": drain,
    "fleet": fleet,
    "latency": latency,
    "backlog": backlog,
    "memory": memory,
}
