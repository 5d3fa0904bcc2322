"""Chaos: worker processes of the real ``memtree worker`` command killed, frozen and cut off
from the database while they work, on SQLite (a WAL file) and PostgreSQL.

At the default size the whole directory takes a couple of minutes for both databases. The
long run is the same tests with bigger numbers (see ``docs/reliability.md``)::

    MEMTREE_CHAOS_JOBS=5000 MEMTREE_CHAOS_SECONDS=120 MEMTREE_CHAOS_REAL_BACKOFF=1 \\
        .venv/bin/pytest tests/chaos -s -k "sigkill or terminated"

Each run prints its figures (``-s`` shows them) and appends them to
``$MEMTREE_CHAOS_REPORT`` when that is set.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import Engine, text

from memtree import Job, JobStatus, NewJob, Queue
from memtree.worker import Handlers, Worker
from tests.chaos import chaos_app
from tests.chaos.harness import (
    JOBS,
    LEASE_MS,
    REAL_BACKOFF,
    SECONDS,
    Figures,
    Monkey,
    RetryExpediter,
    WorkerPool,
    check_final_state,
    check_recoveries,
    count_log_lines,
    kind_of_database,
    now_ms,
    precondition,
    status_counts,
    trickle,
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


@pytest.fixture
def app(wall_queue: Queue) -> Queue:
    """A migrated queue on the wall clock, with the chaos app's domain table."""
    chaos_app.metadata.create_all(wall_queue.engine)
    return wall_queue


def seed() -> int:
    value = os.environ.get("MEMTREE_CHAOS_SEED")
    return int(value) if value else random.SystemRandom().randrange(2**32)


def drain_timeout_s() -> float:
    """How long the last jobs may take once the trickle ends: the backlog at a slow 20 jobs
    a second, plus, with the real backoff, a first and second retry (60 s + 120 s)."""
    return 60 + JOBS / 20 + (200 if REAL_BACKOFF else 0)


def effects_of(engine: Engine, job_id: str) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        return [
            (row[0], row[1])
            for row in conn.execute(
                text("SELECT lease_token, pid FROM chaos_effects WHERE job_id = :id"),
                {"id": job_id},
            )
        ]


# -- (a) and (b): SIGKILL a random worker every 0.5-1.5 s ----------------------------------


def run_sigkill_chaos(
    db_url: str,
    app: Queue,
    tmp_path: Path,
    *,
    mode: str,
    scenario: str,
    executor: str = "threads",
) -> Figures:
    engine = app.engine
    figures = Figures(scenario, kind_of_database(db_url), jobs=JOBS)
    figures.extra["seed"] = run_seed = seed()
    pool = WorkerPool(db_url, tmp_path / "chaos", mode=mode, executor=executor)
    monkey = Monkey(pool, engine, random.Random(run_seed))
    expediter = RetryExpediter(engine) if mode == "flaky" and not REAL_BACKOFF else None
    started = time.monotonic()
    pool.start_all()
    try:
        monkey.start()
        if expediter is not None:
            expediter.start()
        ids = [job_id for batch in trickle(app, JOBS, SECONDS) for job_id in batch]
        assert len(ids) == JOBS

        def all_done() -> bool:
            assert not pool.unexpected_exits(), pool.unexpected_exits()
            assert monkey.error is None, monkey.error
            return status_counts(engine)["done"] == JOBS

        # The monkey goes on until the end: jobs its last kills left running are recovered
        # by the workers it restarts, as in the rest of the run.
        wait_for(all_done, drain_timeout_s(), "every job done", interval=0.25)
        monkey.stop()
        if expediter is not None:
            expediter.stop()
            figures.retries_expedited = expediter.expedited
        assert not pool.unexpected_exits(), pool.unexpected_exits()
        codes = pool.stop_all()
        assert set(codes.values()) == {0}, f"a worker did not stop cleanly: {codes}"
    finally:
        monkey.stopping.set()
        if expediter is not None:
            expediter.stopping.set()
        pool.kill_all()
    figures.seconds = round(time.monotonic() - started, 1)
    figures.processes_killed = monkey.kills
    figures.restarts = pool.restarts
    try:
        check_final_state(engine, ids, figures)
        check_recoveries(pool, monkey.orphans, figures)
        count_log_lines(pool.logs(), figures)
    finally:
        figures.report()
    assert figures.processes_killed >= 3, "the run was too short to kill anything"
    return figures


def test_sigkill_chaos_loses_nothing_and_commits_each_effect_once(
    db_url: str, app: Queue, tmp_path: Path, executor: str
) -> None:
    """(a) 3 workers, a random one SIGKILLed and restarted every 0.5-1.5 s while jobs
    trickle in: every job done, each domain row exactly once, recovery bounded by the lease.
    Run with the handlers as ``def`` (threads) and as ``async def`` (the event loop)."""
    figures = run_sigkill_chaos(
        db_url, app, tmp_path, mode="plain", scenario=f"sigkill/{executor}", executor=executor
    )
    assert figures.rolled_back_writes == 0


def test_sigkill_chaos_with_transient_failures_and_deferrals(
    db_url: str, app: Queue, tmp_path: Path
) -> None:
    """(b) the same, with 20% of jobs failing their first attempt and 10% deferring: their
    writes roll back every time, and every job still ends done exactly once."""
    figures = run_sigkill_chaos(db_url, app, tmp_path, mode="flaky", scenario="sigkill+flaky")
    # About 20% of first attempts fail and every deferring job defers at least once (its
    # window starts at its first run); a few of those runs are killed before they write.
    assert figures.extra["failed_runs"] >= JOBS * 0.1, "the failing runs happened"
    assert figures.extra["deferred_runs"] >= JOBS * 0.02, "the deferring runs happened"
    # Each failing or deferring run wrote a row first and logged its ending; a SIGKILL
    # can land between the two (a write logged, its ending not), at most once per kill.
    endings = figures.extra["failed_runs"] + figures.extra["deferred_runs"]
    assert endings <= figures.rolled_back_writes <= endings + figures.processes_killed, (
        "every failing or deferring run wrote a row first (and none of them committed)"
    )


# -- (c) every connection terminated --------------------------------------------------------


class Terminator(threading.Thread):
    """Every 1-2 s, ``pg_terminate_backend`` (MySQL: ``KILL CONNECTION``) on every other
    connection to the test database."""

    def __init__(self, url: str, rng: random.Random) -> None:
        super().__init__(name="chaos-terminator", daemon=True)
        self.engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
        self.rng = rng
        self.stopping = threading.Event()
        self.rounds = 0
        self.terminated = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.wait(self.rng.uniform(1.0, 2.0)):
                with self.engine.connect() as conn:
                    killed = self.terminate(conn)
                self.rounds += 1
                self.terminated += int(killed)
        except BaseException as exc:
            self.error = exc
        finally:
            self.engine.dispose()

    def terminate(self, conn: sqlalchemy.Connection) -> int:
        if conn.dialect.name == "postgresql":
            return int(
                conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalar_one()
            )
        others = conn.execute(
            text(
                "SELECT id FROM information_schema.processlist"
                " WHERE db = DATABASE() AND id <> CONNECTION_ID()"
            )
        ).scalars()
        killed = 0
        for session in list(others):
            try:
                conn.execute(text(f"KILL CONNECTION {int(session)}"))
                killed += 1
            except sqlalchemy.exc.DBAPIError:  # it ended meanwhile
                pass
        return killed

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        if self.error is not None:
            raise self.error


def test_workers_reconnect_when_every_connection_is_terminated(
    db_url: str, app: Queue, tmp_path: Path
) -> None:
    """(c) every connection of the test database is terminated every 1-2 s mid-run (the
    shared server itself is never restarted): workers reconnect and nothing is lost."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite has no connections to terminate")
    engine = app.engine
    figures = Figures("terminate-connections", kind_of_database(db_url), jobs=JOBS)
    figures.extra["seed"] = run_seed = seed()
    pool = WorkerPool(db_url, tmp_path / "chaos", mode="write-first")
    terminator = Terminator(db_url, random.Random(run_seed))
    expediter = RetryExpediter(engine) if not REAL_BACKOFF else None
    started = time.monotonic()
    pool.start_all()
    try:
        wait_for(lambda: all(w.is_up() for w in pool.everyone), 60, "workers up")
        terminator.start()
        if expediter is not None:
            expediter.start()
        ids = [job_id for batch in trickle(app, JOBS, SECONDS) for job_id in batch]

        def all_done() -> bool:
            assert not pool.unexpected_exits(), pool.unexpected_exits()
            try:
                return status_counts(engine)["done"] == JOBS
            except sqlalchemy.exc.OperationalError:
                return False  # our own connection was terminated too

        # Keep terminating until at least 3 rounds hit a run in progress.
        wait_for(lambda: terminator.rounds >= 3, 60, "three rounds of terminations")
        terminator.stop()
        wait_for(all_done, drain_timeout_s(), "every job done", interval=0.25)
        if expediter is not None:
            expediter.stop()
            figures.retries_expedited = expediter.expedited
        assert not pool.unexpected_exits(), pool.unexpected_exits()
        codes = pool.stop_all()
        assert set(codes.values()) == {0}, f"a worker did not stop cleanly: {codes}"
    finally:
        terminator.stopping.set()
        if expediter is not None:
            expediter.stopping.set()
        pool.kill_all()
    figures.seconds = round(time.monotonic() - started, 1)
    figures.connections_terminated = terminator.terminated
    figures.extra["termination_rounds"] = terminator.rounds
    try:
        check_final_state(engine, ids, figures)
        check_recoveries(pool, [], figures)
        count_log_lines(pool.logs(), figures)
    finally:
        figures.report()
    assert figures.connections_terminated >= 3 * 3, "the workers' connections were terminated"
    if app.dialect.notifies:  # MySQL has no LISTEN: its workers poll
        assert figures.extra["listener_reconnects"] >= 3, "the workers' listeners reconnected"
    assert figures.database_errors_logged > 0, "terminations hit transactions in flight"


# -- (d) a hanging handler and a frozen worker -----------------------------------------------


def hang_job(hang_s: float, attempts: tuple[int, ...] = (1,)) -> NewJob:
    return NewJob("hang", {"hang_s": hang_s, "hang_attempts": list(attempts)}, max_attempts=20)


def starts_of(pool: WorkerPool, job_id: str) -> list[dict[str, Any]]:
    return [e for e in pool.events() if e["e"] == "start" and e["job"] == job_id]


def current(queue: Queue, job_id: str) -> Job:
    job = queue.get_job(job_id)
    assert job is not None, f"{job_id} vanished"
    return job


def test_a_handler_hanging_past_its_lease_keeps_it_while_its_process_lives(
    db_url: str, app: Queue, tmp_path: Path
) -> None:
    """(d) a handler runs 2.5 leases; its worker's heartbeat keeps the lease although the test
    tries to recover it every 100 ms and the other worker is SIGKILLed and restarted."""
    pool = WorkerPool(db_url, tmp_path / "chaos", size=2)
    pool.start_all()
    recovered = 0
    try:
        wait_for(lambda: all(w.is_up() for w in pool.everyone), 60, "workers up")
        job_id = app.enqueue(hang_job(2.5 * LEASE_MS / 1000)) or ""
        wait_for(lambda: bool(starts_of(pool, job_id)), 30, "the hanging job started")
        runner = int(starts_of(pool, job_id)[0]["pid"])
        first_lease_end = int(starts_of(pool, job_id)[0]["started"]) + LEASE_MS
        other = next(w.slot for w in pool.everyone if w.pid != runner)
        latest_lease_end = first_lease_end
        restarted = False
        deadline = time.monotonic() + 60
        while (job := app.get_job(job_id)) is not None and job.status is JobStatus.RUNNING:
            assert time.monotonic() < deadline, "the hanging job never finished"
            recovered += app.recover_stale_locks()
            latest_lease_end = max(latest_lease_end, job.locked_until_ms or 0)
            if not restarted and now_ms() > first_lease_end:
                pool.kill(other)  # a restarted worker recovers expired leases at once
                pool.start(other)
                restarted = True
            time.sleep(0.1)  # the adversary's cadence
        assert not pool.unexpected_exits(), pool.unexpected_exits()
        assert set(pool.stop_all().values()) == {0}
    finally:
        pool.kill_all()
    job = app.get_job(job_id)
    assert job is not None and job.status is JobStatus.DONE
    assert recovered == 0, "a lease its live worker kept extending was recovered"
    assert job.attempts == 1 and len(starts_of(pool, job_id)) == 1, "it ran once"
    assert latest_lease_end > first_lease_end, "the heartbeat pushed the lease forward"
    assert restarted
    assert effects_of(app.engine, job_id) == [(job.lease_token, runner)]


def holds_no_lock(db_url: str) -> bool:
    """True when no other process is inside a transaction of the test database (so a
    process frozen now holds no lock that would stop everyone else)."""
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            conn.close()
    engine = sqlalchemy.create_engine(db_url, isolation_level="AUTOCOMMIT")
    busy_sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND state <> 'idle'"
    )
    if engine.dialect.name in ("mysql", "mariadb"):
        busy_sql = (  # open transactions of this database's sessions (not other tests')
            "SELECT count(*) FROM information_schema.innodb_trx t"
            " JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id"
            " WHERE p.db = DATABASE() AND t.trx_mysql_thread_id <> CONNECTION_ID()"
        )
    try:
        with engine.connect() as conn:
            busy = conn.execute(text(busy_sql)).scalar_one()
        return busy == 0
    finally:
        engine.dispose()


def freeze(process_id: int, db_url: str) -> None:
    """SIGSTOP a process at a moment it holds no database lock.

    A process frozen inside a transaction keeps its locks: on SQLite every other writer
    waits for it, on PostgreSQL its rows stay locked (see docs/reliability.md). That is a
    limit of freezing, not what this test is about, so it freezes between transactions.
    """
    for _ in range(200):
        os.kill(process_id, signal.SIGSTOP)
        if holds_no_lock(db_url):
            return
        os.kill(process_id, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("could not freeze the worker between two transactions")


def test_a_frozen_workers_job_is_recovered_and_its_late_settle_refused(
    db_url: str, app: Queue, tmp_path: Path
) -> None:
    """(d) worker A is SIGSTOPped mid-job; after its lease another worker B recovers the job
    and completes it; when A is SIGCONTed, its run is not settled: its domain row, already
    written in its transaction, never commits, and B's does."""
    pool = WorkerPool(db_url, tmp_path / "chaos", size=2)
    a = pool.start(0)
    try:
        wait_for(a.is_up, 60, "worker A up")
        job_id = app.enqueue(hang_job(1.0)) or ""
        wait_for(lambda: bool(starts_of(pool, job_id)), 30, "A started the job")
        freeze(a.pid, db_url)
        frozen_at = time.monotonic()
        claim = app.get_job(job_id)
        assert claim is not None and claim.status is JobStatus.RUNNING
        wait_for(
            lambda: (current(app, job_id).locked_until_ms or 0) < now_ms(),
            30,
            "A's lease to expire",
        )
        b = pool.start(1)  # B recovers expired leases when it starts, then claims the job
        wait_for(lambda: current(app, job_id).status is JobStatus.DONE, 60, "B completed it")
        done = app.get_job(job_id)
        assert done is not None and done.attempts == 2 and done.lease_token != claim.lease_token
        assert a.process.poll() is None, "A is frozen, not dead"
        os.kill(a.pid, signal.SIGCONT)
        frozen_s = time.monotonic() - frozen_at
        wait_for(
            lambda: any(e["e"] == "wrote" and e["pid"] == a.pid for e in pool.events()),
            30,
            "A's handler to write its row after waking",
        )
        refusals = ("lease lost before it was settled", "lost its lease")
        wait_for(lambda: any(r in a.log() for r in refusals), 30, "A to give the run up")
        # A lives on and works: a job enqueued now is done by A or B.
        later = app.enqueue(hang_job(0.0)) or ""
        wait_for(lambda: current(app, later).status is JobStatus.DONE, 60, "A and B work on")
        assert not pool.unexpected_exits(), pool.unexpected_exits()
        assert set(pool.stop_all().values()) == {0}
    finally:
        for worker in pool.everyone:
            if worker.process.poll() is None:
                os.kill(worker.pid, signal.SIGCONT)
        pool.kill_all()
    assert effects_of(app.engine, job_id) == [(done.lease_token, b.pid)], "only B's row"
    assert app.get_job(job_id) == done, "A's wake-up changed nothing"
    how = "settle fenced" if refusals[0] in a.log() else "heartbeat found the lease gone"
    print(f"\nfrozen worker: {frozen_s:.1f} s frozen; its late run refused ({how})")


# -- findings: recovery by live workers --------------------------------------------------------


def test_a_live_worker_takes_over_a_killed_peers_job_within_a_few_leases(
    db_url: str, app: Queue, tmp_path: Path
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("the maintenance schedule is the same on every database")
    pool = WorkerPool(db_url, tmp_path / "chaos", size=2)
    a = pool.start(0)
    try:
        precondition(a.is_up, "worker A up", timeout=60)
        job_id = app.enqueue(hang_job(60.0)) or ""
        precondition(lambda: bool(starts_of(pool, job_id)), "A started the job")
        b = pool.start(1)
        precondition(b.is_up, "worker B up", timeout=60)
        pool.kill(0)
        killed_at = time.monotonic()
        # B is alive the whole time: allow it two leases after A's death.
        wait_for(
            lambda: len(starts_of(pool, job_id)) > 1,
            2 * LEASE_MS / 1000 + 2,
            "B to take the job over",
        )
        print(f"\ntaken over after {time.monotonic() - killed_at:.1f} s")
    finally:
        pool.kill_all()


def test_a_worker_keeps_working_while_a_frozen_peer_holds_a_row_lock(
    db_url: str, app: Queue
) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite has no row locks (its file lock is another test's)")
    handlers = Handlers()
    handlers.register("quick")(lambda ctx: None)
    worker = Worker(app, handlers, recover_interval_s=0.2, poll_interval_s=0.1)
    thread = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False})
    frozen = sqlalchemy.create_engine(app.engine.url)
    watcher = sqlalchemy.create_engine(app.engine.url, isolation_level="AUTOCOMMIT")

    mysql = app.engine.dialect.name in ("mysql", "mariadb")
    blocked_by = (
        "SELECT count(*) FROM information_schema.innodb_lock_waits w"
        " JOIN information_schema.innodb_trx b ON b.trx_id = w.blocking_trx_id"
        " WHERE b.trx_mysql_thread_id = :holder"
        if mysql
        else "SELECT count(*) FROM pg_stat_activity"
        " WHERE CAST(:holder AS integer) = ANY(pg_blocking_pids(pid))"
    )

    def waits_for(holder: int) -> bool:
        with watcher.connect() as conn:
            waiting = conn.execute(text(blocked_by), {"holder": holder}).scalar_one()
        return bool(waiting)

    try:
        thread.start()
        with frozen.connect() as conn:
            # A peer's expired claim, its row locked by a transaction that does not end: a
            # worker frozen in the middle of its heartbeat, or a connection that hangs.
            conn.execute(
                text(
                    "INSERT INTO mem_tree_jobs (id, kind, payload_json, status, attempts, "
                    "max_attempts, available_at_ms, locked_until_ms, created_at_ms, "
                    "lease_token) VALUES ('job:peer', 'elsewhere', 'null', 'running', 1, 5, "
                    ":past, :past, :past, 'peer')"
                ),
                {"past": now_ms() - 60_000},
            )
            conn.commit()
            conn.execute(text("SELECT id FROM mem_tree_jobs WHERE id = 'job:peer' FOR UPDATE"))
            holder = conn.execute(
                text("SELECT CONNECTION_ID()" if mysql else "SELECT pg_backend_pid()")
            ).scalar_one()
            # Today the worker's recovery is soon stuck behind the lock; a worker that skips
            # locked rows never is, so after five recovery passes the test goes on anyway.
            locked_at = time.monotonic()
            wait_for(
                lambda: waits_for(holder) or time.monotonic() > locked_at + 5 * 0.2,
                30,
                "the worker's recovery to reach the peer's row",
            )
            job_id = app.enqueue(NewJob("quick")) or ""
            try:
                wait_for(
                    lambda: current(app, job_id).status is JobStatus.DONE,
                    5,
                    "a new job done while the peer is frozen",
                )
            finally:
                conn.rollback()
    finally:
        worker.stop()
        thread.join(timeout=60)
        frozen.dispose()
        watcher.dispose()
