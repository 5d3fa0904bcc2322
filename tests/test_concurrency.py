"""Many claimers at once: every job claimed exactly once, no deadlock, no 'database is locked'."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import memtree
from memtree import DatabaseError, JobStatus, NewJob, Queue

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_processes_of_four_threads_claim_every_job_exactly_once(
    db_url: str, wall_queue: Queue, tmp_path: Path
) -> None:
    total = 2000
    wall_queue.enqueue_many([NewJob("work", {"i": i}) for i in range(total)])
    outputs = [tmp_path / f"claims-{n}.txt" for n in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.claimers", db_url, "4", str(out)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outputs
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    lines = [line for out in outputs for line in out.read_text().splitlines() if line]
    ids = [line.split()[0] for line in lines]
    assert len(ids) == total, "every job settled"
    assert len(set(ids)) == total, "no job was settled twice"
    assert all(out.read_text() for out in outputs), "both processes did work"
    assert wall_queue.count_by_status(JobStatus.DONE) == total
    assert wall_queue.count_by_status(JobStatus.RUNNING) == 0


def test_concurrent_enqueues_of_one_key_give_one_row_and_no_error(
    wall_queue: Queue, engine: Engine
) -> None:
    results: dict[str, str | None] = {}
    with Session(engine) as first:
        results["first"] = memtree.enqueue(first, NewJob("k", dedupe_key="same"))

        def second() -> None:
            with Session(engine) as other, other.begin():
                results["second"] = memtree.enqueue(other, NewJob("k", dedupe_key="same"))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive(), "the second enqueue waits for the first transaction"
        first.commit()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert results["first"] is not None
    assert results["second"] is None
    assert wall_queue.count_total() == 1


def test_threads_claiming_at_once_never_share_a_job(wall_queue: Queue) -> None:
    wall_queue.enqueue_many([NewJob("t", {"i": i}) for i in range(400)])
    seen: list[str] = []
    lock = threading.Lock()

    def claimer() -> None:
        while batch := wall_queue.claim_batch(7):
            with lock:
                seen.extend(job.id for job in batch)

    threads = [threading.Thread(target=claimer) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(seen) == 400 and len(set(seen)) == 400


def test_a_sqlite_transaction_holds_the_write_lock_from_its_begin(db_url: str) -> None:
    """BEGIN IMMEDIATE: a transaction that reads first cannot fail when it then writes,
    and one that cannot get the lock within the busy timeout fails as memtree's error."""
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's write lock")
    path = db_url.removeprefix("sqlite:///")
    engine = memtree.create_engine(db_url, sqlite_busy_timeout_ms=50)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        with engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT 1")).scalar()
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(DatabaseError, match="locked"), Queue(engine).transaction():
            pass
        other.execute("ROLLBACK")
    finally:
        other.close()
        engine.dispose()
