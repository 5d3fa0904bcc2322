"""Six worker processes on one database, SIGKILLed and restarted while they run gated,
keyed and rate-limited jobs; on PostgreSQL two of them run with clocks 10 minutes off.

Every run leaves its claim, start and end in ``fleet_runs`` on the database's clock (see
:mod:`tests.fleet.fleet_app`); a run whose process was killed ends when it was killed.
From those rows: the runs of a global gate never overlap more than its limit at any
instant, per key for the keyed gate; the claims in any window never exceed the rate
limit; every job ends done, so no permit outlived the lease of a killed worker.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from sqlalchemy import Engine, select, text

import memtree
from memtree import JobStatus, NewJob
from tests.fleet import fleet_app
from tests.fleet.procs import kill, launch, stop

WORKERS = 6
LLM_LIMIT = 2
SEAL_LIMIT = 1
RATE = {"limit": 8, "window_s": 1.0}
TEN_MINUTES_MS = 10 * 60 * 1000

CONFIG = {
    "kinds": {"llm": 0.15, "seal": 0.1, "call": 0.0, "fast": 0.0},
    "gates": [
        {"name": "llm", "limit": LLM_LIMIT, "kinds": ["llm"], "scope": "global"},
        {"name": "seal", "limit": SEAL_LIMIT, "kinds": ["seal"], "scope": "global", "key": "key"},
    ],
    "rate_limits": [{"name": "calls", "kinds": ["call"], **RATE}],
    "lease_ms": 2000,
    "concurrency": 4,
    "recover_interval_s": 0.5,
    "poll_interval_s": 0.2,
}


def _db_now_ms(engine: Engine) -> int:
    clock = fleet_app.DATABASE_CLOCKS.get(engine.dialect.name)
    if clock is not None:
        with engine.connect() as conn:
            return int(conn.execute(text(clock)).scalar_one())
    return time.time_ns() // 1_000_000


def _peak(intervals: list[tuple[int, int]]) -> int:
    """The most intervals ``[start, end)`` open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in events:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


def _most_in_a_window(times: list[int], window_ms: int) -> int:
    times = sorted(times)
    most = 0
    first = 0
    for last, t in enumerate(times):
        while times[first] <= t - window_ms:
            first += 1
        most = max(most, last - first + 1)
    return most


def test_six_workers_killed_and_restarted_keep_every_limit(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    queue = memtree.Queue(engine)
    queue.migrate()
    fleet_app.metadata.create_all(engine)
    jobs = (
        [NewJob("llm", {"n": i}) for i in range(40)]
        + [NewJob("seal", {"key": f"tree-{i % 6}", "n": i}) for i in range(48)]
        + [NewJob("call", {"n": i}) for i in range(96)]
        + [NewJob("fast", {"n": i}) for i in range(100)]
    )
    random.Random(13).shuffle(jobs)
    queue.enqueue_many(jobs)
    skews = [0] * WORKERS
    if engine.dialect.name != "sqlite":  # the database has a clock of its own
        skews[1], skews[2] = TEN_MINUTES_MS, -TEN_MINUTES_MS
    config = {**CONFIG, "url": db_url}
    workers = [launch({**config, "skew_ms": skews[i]}, tmp_path) for i in range(WORKERS)]
    killed_at: dict[int, int] = {}
    rng = random.Random(7)
    kills = 0
    deadline = time.monotonic() + 90
    try:
        next_kill = time.monotonic() + 1.0
        while queue.count_by_status(JobStatus.DONE) < len(jobs):
            assert time.monotonic() < deadline, "the fleet did not finish its jobs"
            if time.monotonic() >= next_kill:
                index = rng.randrange(WORKERS)
                victim = workers[index]
                kill(victim)
                killed_at[victim.pid] = _db_now_ms(engine)
                kills += 1
                workers[index] = launch({**config, "skew_ms": skews[index]}, tmp_path)
                next_kill = time.monotonic() + rng.uniform(0.4, 1.0)
            time.sleep(0.05)
    finally:
        codes = [stop(worker) for worker in workers]
    assert codes == [0] * WORKERS
    assert kills >= 3
    assert queue.count_by_status(JobStatus.DONE) == len(jobs)
    assert queue.count_by_status(JobStatus.RUNNING) == 0

    runs = fleet_app.runs.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                runs.kind, runs.partition_key, runs.pid, runs.claim_ms, runs.start_ms, runs.end_ms
            )
        ).all()
    unfinished = [row for row in rows if row.end_ms is None]
    assert {row.pid for row in unfinished} <= set(killed_at), "a run ended without its end"

    def interval(row) -> tuple[int, int]:  # type: ignore[no-untyped-def]
        return row.start_ms, row.end_ms if row.end_ms is not None else killed_at[row.pid]

    llm = [interval(row) for row in rows if row.kind == "llm"]
    assert len(llm) >= 40
    assert _peak(llm) <= LLM_LIMIT
    assert _peak(llm) == LLM_LIMIT, "the gate never filled: the test proves nothing"
    for key in {row.partition_key for row in rows if row.kind == "seal"}:
        seals = [interval(row) for row in rows if row.kind == "seal" and row.partition_key == key]
        assert _peak(seals) <= SEAL_LIMIT, key
    seal_all = [interval(row) for row in rows if row.kind == "seal"]
    assert _peak(seal_all) > SEAL_LIMIT, "keys never ran side by side"
    calls = [row.claim_ms for row in rows if row.kind == "call"]
    assert len(calls) >= 96
    assert _most_in_a_window(calls, int(RATE["window_s"] * 1000)) <= RATE["limit"]
    # 96 calls at 8 a second take at least eleven windows.
    assert max(calls) - min(calls) >= 11 * 1000
    # Every permit of a killed worker came back once its lease ran out: all jobs ended
    # done, each run's claim time is on the database's clock whatever its worker's.
    assert all(abs(row.claim_ms - row.start_ms) < 60_000 for row in rows)
