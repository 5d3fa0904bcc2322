"""Workers whose wall clocks are 10 minutes off, on one PostgreSQL database.

memtree takes its time from the database's clock, so a worker whose own clock runs fast
does not take over the live leases of others at its recovery pass, and one whose clock
runs slow still claims due jobs at once. Each worker is a process of its own with its
``time.time`` moved (see :mod:`tests.fleet.fleet_worker`). On SQLite every process shares
the host's clock, so there is nothing to skew there.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

import memtree
from memtree import NewJob
from tests.fleet import fleet_app
from tests.fleet.procs import launch, stop

TEN_MINUTES_MS = 10 * 60 * 1000


@pytest.fixture
def fleet_db(engine: Engine, db_url: str) -> str:
    if engine.dialect.name == "sqlite":
        pytest.skip("every SQLite process shares the host's clock: nothing to skew")
    memtree.Queue(engine).migrate()
    fleet_app.metadata.create_all(engine)
    return db_url


def _wait_for(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _starts(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(select(fleet_app.runs.c.job_id)).scalars())


def test_a_worker_ten_minutes_fast_does_not_take_over_live_leases(
    engine: Engine, fleet_db: str, tmp_path: Path
) -> None:
    queue = memtree.Queue(engine)
    ids = [queue.enqueue(NewJob("work", {"seconds": 4.0})) for _ in range(4)]
    base = {"url": fleet_db, "kinds": {"work": 4.0}, "lease_ms": 3000, "concurrency": 4}
    steady = launch({**base, "skew_ms": 0}, tmp_path)
    try:
        _wait_for(lambda: sum(_starts(engine).values()) == 4, 20, "the steady worker's starts")
        # A fast worker recovers every 0.1 s; with its own clock it would find every
        # lease 10 minutes stale at once, recover them and run them a second time.
        fast = launch({**base, "skew_ms": TEN_MINUTES_MS, "recover_interval_s": 0.1}, tmp_path)
        try:
            _wait_for(
                lambda: queue.count_by_status(memtree.JobStatus.DONE) == 4, 30, "the jobs to end"
            )
        finally:
            assert stop(fast) == 0
    finally:
        assert stop(steady) == 0
    assert _starts(engine) == Counter({job_id: 1 for job_id in ids})
    for job_id in ids:
        job = queue.get_job(str(job_id))
        assert job is not None and job.attempts == 1


def test_a_worker_ten_minutes_slow_claims_due_jobs_at_once(
    engine: Engine, fleet_db: str, tmp_path: Path
) -> None:
    queue = memtree.Queue(engine)
    queue.enqueue_many([NewJob("work") for _ in range(50)])
    slow = launch({"url": fleet_db, "kinds": {"work": 0}, "skew_ms": -TEN_MINUTES_MS}, tmp_path)
    try:
        _wait_for(lambda: queue.count_by_status(memtree.JobStatus.DONE) == 50, 20, "50 jobs done")
    finally:
        assert stop(slow) == 0
    with engine.connect() as conn:
        late = conn.execute(
            select(func.max(fleet_app.runs.c.claim_ms - fleet_app.runs.c.start_ms))
        ).scalar_one()
    # The claim times are the database's, not the slow clock's (10 minutes behind).
    assert abs(int(late)) < 60_000


def test_a_job_enqueued_with_a_delay_on_a_skewed_host_is_due_on_the_databases_clock(
    engine: Engine, fleet_db: str
) -> None:
    clock = memtree.clock.clock_for(engine)
    queue = memtree.Queue(engine)
    job_id = queue.enqueue(NewJob("work", delay_ms=60_000))
    job = queue.get_job(str(job_id))
    assert job is not None
    assert abs(job.available_at_ms - (clock.now_ms() + 60_000)) < 5_000
