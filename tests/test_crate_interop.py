"""memtree and the original crate on one SQLite file at the same time.

The crate (tinycortex 0.1.1) runs in a second process, ``tests/crate_worker.py``: its
own SQL, its own connection set-up (journal TRUNCATE, synchronous FULL, 15 s busy
timeout), its claim -> run -> settle loop, recovery and enqueues. memtree runs a
:class:`memtree.Worker` on an engine that keeps the file's rollback journal
(``sqlite_journal_mode=None``). Run just these with
``pytest tests/test_crate_interop.py``; docs/sharing.md says what holds and the limits.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

import memtree
import memtree.tree
from memtree import ConfigurationError, JobStatus, NewJob
from memtree.worker import Handlers, JobContext, Worker
from tests import tinycortex
from tests.crate_worker import KIND
from tests.test_worker import Running, wait_for

pytestmark = pytest.mark.sqlite

ROOT = Path(__file__).resolve().parent.parent
CRATE_JOBS = 150
MEMTREE_JOBS = 150


def test_memtree_and_the_crate_drain_one_rollback_journal_file_together(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both enqueue and both work; every job runs exactly once, neither side fails on a
    busy database, and the file stays in a rollback journal."""
    path = tmp_path / "chunks.db"
    tinycortex.connect(str(path)).close()  # the crate made the file: its table, TRUNCATE
    engine = memtree.create_engine(f"sqlite:///{path}", sqlite_journal_mode=None)
    queue = memtree.tree.queue(engine)
    queue.migrate()  # adopts the crate's table
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE effects (job_id TEXT PRIMARY KEY)"))

    runs: Counter[str] = Counter()
    runs_lock = threading.Lock()
    handlers = Handlers()

    @handlers.register(KIND)
    def append_buffer(ctx: JobContext) -> None:
        with runs_lock:
            runs[ctx.job.id] += 1
        if ctx.payload["n"] % 2:  # half settle in the handler's session, half in batches
            ctx.session.execute(
                text("INSERT INTO effects (job_id) VALUES (:id)"), {"id": ctx.job.id}
            )

    crate_runs = tmp_path / "crate_runs.txt"
    crate = subprocess.Popen(
        [sys.executable, "-m", "tests.crate_worker", str(path), str(crate_runs), str(CRATE_JOBS)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        worker = Worker(queue, handlers, concurrency=4, gates=())
        with caplog.at_level(logging.WARNING, logger="memtree"), Running(worker):
            for n in range(MEMTREE_JOBS):
                queue.enqueue(NewJob(KIND, {"side": "memtree", "n": n}))
                time.sleep(0.002)
            wait_for(
                lambda: queue.count_by_status(JobStatus.DONE) == CRATE_JOBS + MEMTREE_JOBS,
                timeout=120,
            )
        _, crate_errors = crate.communicate(timeout=60)
    finally:
        if crate.poll() is None:
            crate.kill()
            crate.wait()
        engine.dispose()

    assert crate.returncode == 0, f"the crate failed: {crate_errors}"
    assert crate_errors == ""
    assert [r.getMessage() for r in caplog.records] == [], "memtree logged trouble"
    by_crate = Counter(crate_runs.read_text().split())
    with sqlite3.connect(path) as check:
        ids = {row[0] for row in check.execute("SELECT id FROM mem_tree_jobs")}
        statuses = dict(check.execute("SELECT status, count(*) FROM mem_tree_jobs GROUP BY 1"))
        effects = {row[0] for row in check.execute("SELECT job_id FROM effects")}
        journal_mode = check.execute("PRAGMA journal_mode").fetchone()[0]
    assert len(ids) == CRATE_JOBS + MEMTREE_JOBS
    assert statuses == {"done": CRATE_JOBS + MEMTREE_JOBS}
    both = runs + by_crate
    assert set(both) == ids and set(both.values()) == {1}, "a job ran twice or never"
    assert runs and by_crate, f"memtree ran {len(runs)}, the crate {len(by_crate)}"
    assert effects <= set(runs) and effects, "the handler's session writes"
    assert journal_mode.lower() != "wal" and not Path(f"{path}-wal").exists()


def test_memtree_asked_for_wal_next_to_a_crate_transaction_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    """The failure the docs warn about: WAL cannot be set while the crate writes, and
    memtree says what to do instead of a bare "database is locked"."""
    path = tmp_path / "chunks.db"
    crate = tinycortex.connect(str(path))
    try:
        crate.execute("BEGIN IMMEDIATE")  # a producer's enqueue_tx, in flight
        crate.execute(tinycortex.ENQUEUE, ("job:x", KIND, "{}", None, 5, 1, 1))
        engine = memtree.create_engine(
            f"sqlite:///{path}", sqlite_journal_mode="WAL", sqlite_busy_timeout_ms=100
        )
        with pytest.raises(ConfigurationError, match="sqlite_journal_mode=None"):
            engine.connect()
        engine.dispose()
        crate.execute("COMMIT")
    finally:
        crate.close()


def test_memtree_asked_for_wal_takes_an_idle_crate_file_and_locks_the_crate_out(
    tmp_path: Path,
) -> None:
    """Between the crate's statements its connection holds no lock, so nothing stops an
    explicit WAL from converting the file; the crate's next connection then cannot set
    its TRUNCATE mode while memtree has the file open."""
    path = tmp_path / "chunks.db"
    crate = tinycortex.connect(str(path))
    engine = memtree.create_engine(f"sqlite:///{path}", sqlite_journal_mode="WAL")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                tinycortex.connect(str(path))
    finally:
        engine.dispose()
        crate.close()


@pytest.mark.parametrize("crate_writing", [False, True], ids=["crate-idle", "crate-writing"])
def test_memtrees_default_keeps_the_crates_rollback_journal(
    tmp_path: Path, crate_writing: bool
) -> None:
    """The default (``AUTO``) sets WAL only on a file that holds no queue yet: on the
    crate's file, idle or mid-transaction, memtree keeps the crate's rollback journal,
    and the crate can still open new connections while memtree has the file open."""
    path = tmp_path / "chunks.db"
    crate = tinycortex.connect(str(path))
    if crate_writing:
        crate.execute("BEGIN IMMEDIATE")
        crate.execute(tinycortex.ENQUEUE, ("job:x", KIND, "{}", None, 5, 1, 1))
    engine = memtree.create_engine(f"sqlite:///{path}")
    try:
        # A raw connection: memtree's set-up runs when it opens, and no BEGIN IMMEDIATE
        # waits here for the crate's transaction.
        raw = engine.raw_connection()
        assert raw.cursor().execute("PRAGMA journal_mode").fetchone()[0] != "wal"
        assert raw.cursor().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        if crate_writing:
            crate.execute("COMMIT")
        tinycortex.connect(str(path)).close()  # the crate's next start works
        raw.close()
        assert not Path(f"{path}-wal").exists()
    finally:
        engine.dispose()
        crate.close()


def test_memtrees_default_sets_wal_on_a_file_without_a_queue(tmp_path: Path) -> None:
    plain = sqlite3.connect(tmp_path / "app.db")
    plain.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY)")
    plain.close()
    engine = memtree.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    finally:
        engine.dispose()
