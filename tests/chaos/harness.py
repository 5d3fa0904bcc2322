"""The chaos harness: worker processes through the real ``memtree worker`` command, a monkey
that SIGKILLs and restarts them, a trickle of jobs, and the checks and figures of a run.

Sizes come from the environment, so the same tests run short in CI and long by hand:

- ``MEMTREE_CHAOS_JOBS`` (default 600): jobs per scenario and database.
- ``MEMTREE_CHAOS_SECONDS`` (default 6): how long the jobs trickle in while workers die.
- ``MEMTREE_CHAOS_REAL_BACKOFF=1``: keep memtree's real retry backoff (60 s, 120 s, ...)
  instead of pulling retries forward (see :class:`RetryExpediter`).
- ``MEMTREE_CHAOS_REPORT=PATH``: append each run's figures to PATH as JSON lines.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

import memtree
from memtree import DatabaseError, NewJob, Queue

ROOT = Path(__file__).resolve().parents[2]
MEMTREE = Path(sys.executable).parent / "memtree"
APP = "tests.chaos.chaos_app:handlers"

LEASE_MS = 2000
LEASE = "2s"
KILL_EVERY_S = (0.5, 1.5)
#: A job left by a killed worker must be claimed again within its lease, plus half a
#: lease (the surviving workers' recovery interval), plus this slack for a loaded 2-core
#: machine (the long run's worst recovery was 2.8 s against this 6 s bound). A recovery
#: that waited for the 30 s maintenance pass instead of the lease would fail it.
RECOVERY_SLACK_MS = 3000


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


JOBS = env_int("MEMTREE_CHAOS_JOBS", 600)
SECONDS = env_float("MEMTREE_CHAOS_SECONDS", 6.0)
REAL_BACKOFF = os.environ.get("MEMTREE_CHAOS_REAL_BACKOFF", "") == "1"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class PreconditionError(Exception):
    """A test's setup did not come about: never mistaken for the failure an xfail expects."""


def precondition(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    try:
        wait_for(predicate, timeout, what)
    except AssertionError as exc:
        raise PreconditionError(str(exc)) from None


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:.0f} s: {what}")
        time.sleep(interval)


# -- worker processes -----------------------------------------------------------------------


@dataclass
class WorkerProcess:
    slot: int
    seq: int
    process: subprocess.Popen[bytes]
    log_path: Path
    #: The local TCP ports of its connections when it was killed (how MySQL's process
    #: list names a client).
    ports: frozenset[int] = frozenset()

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def is_up(self) -> bool:
        """The CLI prints its banner once the schema is checked, just before it works."""
        return "memtree worker" in self.log()


class WorkerPool:
    """``size`` slots, each running one ``memtree worker`` process at a time."""

    def __init__(
        self,
        url: str,
        workdir: Path,
        *,
        size: int = 3,
        mode: str = "plain",
        concurrency: int = 4,
        lease: str = LEASE,
        executor: str = "threads",
    ) -> None:
        self.url = url
        self.executor = executor
        self.workdir = workdir
        self.size = size
        self.mode = mode
        self.concurrency = concurrency
        self.lease = lease
        self.slots: list[WorkerProcess | None] = [None] * size
        self.everyone: list[WorkerProcess] = []
        self.killed: set[int] = set()
        self.restarts = 0
        self._seq = 0
        self._lock = threading.Lock()
        workdir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [
            str(MEMTREE),
            "--database-url",
            self.url,
            "worker",
            "--app",
            APP,
            "--concurrency",
            str(self.concurrency),
            "--lease",
            self.lease,
            "--no-gates",
            "--shutdown-grace",
            "10",
            "--log-level",
            "INFO",
        ]

    def start(self, slot: int) -> WorkerProcess:
        with self._lock:
            self._seq += 1
            seq = self._seq
            if self.slots[slot] is not None:
                self.restarts += 1
        env = {k: v for k, v in os.environ.items() if k != "MEMTREE_DATABASE_URL"}
        # libpq names the worker's PostgreSQL sessions after its slot's sequence number, so
        # that the monkey can see when the server has ended a killed worker's sessions.
        env.update(
            CHAOS_LOG_DIR=str(self.workdir),
            CHAOS_MODE=self.mode,
            CHAOS_EXECUTOR=self.executor,
            PGAPPNAME=session_name(seq),
        )
        log_path = self.workdir / f"worker-{seq}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                self.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        worker = WorkerProcess(slot, seq, process, log_path)
        with self._lock:
            self.slots[slot] = worker
            self.everyone.append(worker)
        return worker

    def start_all(self) -> None:
        for slot in range(self.size):
            self.start(slot)

    def worker(self, slot: int) -> WorkerProcess:
        worker = self.slots[slot]
        assert worker is not None
        return worker

    def kill(self, slot: int) -> WorkerProcess:
        """SIGKILL the slot's process and reap it."""
        worker = self.worker(slot)
        self.killed.add(worker.pid)
        worker.ports = tcp_ports(worker.pid)
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(timeout=30)
        return worker

    def unexpected_exits(self) -> list[str]:
        """Processes that exited although nobody killed or stopped them, with their logs."""
        return [
            f"worker {w.seq} (pid {w.pid}) exited {w.process.returncode}:\n{w.log()[-3000:]}"
            for w in self.everyone
            if w.pid not in self.killed and w.process.poll() is not None
        ]

    def stop_all(self, timeout: float = 60) -> dict[int, int]:
        """SIGTERM every live worker once it is up; their exit codes by pid (0 is a clean
        stop). A worker that is still starting has no SIGTERM handler yet."""
        live = [w for w in self.slots if w is not None and w.process.poll() is None]
        wait_for(lambda: all(w.is_up() for w in live), 60, "restarted workers up")
        for worker in live:
            worker.process.send_signal(signal.SIGTERM)
        codes = {}
        for worker in live:
            try:
                codes[worker.pid] = worker.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                codes[worker.pid] = worker.process.wait()
        return codes

    def kill_all(self) -> None:
        for worker in self.everyone:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()

    def logs(self) -> str:
        return "\n".join(w.log() for w in self.everyone)

    def events(self) -> list[dict[str, Any]]:
        """Every line the handlers wrote to the claim logs, from every process."""
        found = []
        for path in sorted(self.workdir.glob("claims-*.jsonl")):
            for line in path.read_text().splitlines():
                if line.endswith("}"):  # a SIGKILL can cut the very last line short
                    found.append(json.loads(line))
        return found

    def tokens_of(self, pid: int) -> set[str]:
        path = self.workdir / f"claims-{pid}.jsonl"
        if not path.exists():
            return set()
        tokens = set()
        for line in path.read_text().splitlines():
            if line.endswith("}"):
                event = json.loads(line)
                if event["e"] == "start" and event["token"]:
                    tokens.add(event["token"])
        return tokens


@dataclass(frozen=True)
class Orphan:
    """A job that was running under a worker at the moment it was SIGKILLed."""

    job_id: str
    token: str
    locked_until_ms: int
    killed_at_ms: int
    pid: int


def running_rows(engine: Engine) -> dict[str, tuple[str | None, int | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, lease_token, locked_until_ms FROM mem_tree_jobs "
                "WHERE status = 'running'"
            )
        ).all()
    return {row[0]: (row[1], row[2]) for row in rows}


def tcp_ports(pid: int) -> frozenset[int]:
    """The local ports of process ``pid``'s TCP sockets (Linux: its socket inodes found in
    /proc/net/tcp)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    except OSError:
        return frozenset()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return frozenset(ports)


def session_name(seq: int) -> str:
    """The ``application_name`` of worker ``seq``'s PostgreSQL sessions."""
    return f"memtree-chaos-{seq}"


def wait_sessions_ended(engine: Engine, worker: WorkerProcess) -> None:
    """Wait until the server has ended a killed worker's sessions (not on SQLite).

    A COMMIT the worker sent just before its SIGKILL is still carried out by its backend,
    which notices the dead client only afterwards: until the backend is gone, a row the
    worker was settling can still read ``running`` under its lease although the worker
    finished it. (A SQLite worker's commit happens in its own process: nothing is left in
    flight once the process is reaped.)
    """
    if engine.dialect.name in ("mysql", "mariadb"):
        # MySQL names a session by its client's address: the killed worker's ports.
        def gone() -> bool:
            with engine.connect() as conn:
                hosts = conn.execute(text("SELECT host FROM information_schema.processlist"))
                return not any(
                    str(host).rsplit(":", 1)[-1] in {str(p) for p in worker.ports}
                    for (host,) in hosts
                )

        wait_for(gone, 30, f"the sessions of killed worker {worker.seq} ended", interval=0.01)
        return
    if engine.dialect.name != "postgresql":
        return

    def ended() -> bool:
        with engine.connect() as conn:
            return not conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                {"name": session_name(worker.seq)},
            ).scalar_one()

    wait_for(ended, 30, f"the sessions of killed worker {worker.seq} ended", interval=0.01)


class Monkey(threading.Thread):
    """Every 0.5-1.5 s: SIGKILL a random worker, note the jobs it left running, restart it."""

    def __init__(self, pool: WorkerPool, engine: Engine, rng: random.Random) -> None:
        super().__init__(name="chaos-monkey", daemon=True)
        self.pool = pool
        self.engine = engine
        self.rng = rng
        self.stopping = threading.Event()
        self.kills = 0
        self.orphans: list[Orphan] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.wait(self.rng.uniform(*KILL_EVERY_S)):
                slot = self.rng.randrange(self.pool.size)
                victim = self.pool.kill(slot)
                killed_at = now_ms()
                self.kills += 1
                self.pool.start(slot)
                wait_sessions_ended(self.engine, victim)
                mine = self.pool.tokens_of(victim.pid)
                for job_id, (token, until) in running_rows(self.engine).items():
                    if token in mine and until is not None:
                        self.orphans.append(Orphan(job_id, token, until, killed_at, victim.pid))
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)
        if self.error is not None:
            raise self.error


class RetryExpediter(threading.Thread):
    """Pulls retry backoffs forward, as another program writing the table would.

    memtree's first retry waits 60 s and the CLI has no option to shorten it, so a
    CI-sized run would spend minutes waiting. Every 0.25 s this moves ``ready`` rows due
    more than 5 s from now to now; it never touches a running row, a status, an attempt
    or a lease, and deferrals (at most 0.3 s) are below its threshold. Off with
    ``MEMTREE_CHAOS_REAL_BACKOFF=1``, which the long run uses.
    """

    def __init__(self, engine: Engine) -> None:
        super().__init__(name="chaos-expediter", daemon=True)
        self.engine = engine
        self.stopping = threading.Event()
        self.expedited = 0

    def run(self) -> None:
        while not self.stopping.wait(0.25):
            try:
                with self.engine.begin() as conn:
                    now = now_ms()
                    result = conn.execute(
                        text(
                            "UPDATE mem_tree_jobs SET available_at_ms = :now "
                            "WHERE status = 'ready' AND available_at_ms > :later"
                        ),
                        {"now": now, "later": now + 5000},
                    )
                    self.expedited += result.rowcount
            except Exception:  # the database may be away (connections terminated)
                continue

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)


# -- jobs -----------------------------------------------------------------------------------


def keys_present(engine: Engine, keys: list[str]) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT dedupe_key, id FROM mem_tree_jobs WHERE dedupe_key IN :keys").bindparams(
                _expanding("keys")
            ),
            {"keys": keys},
        ).all()
    return {row[0]: row[1] for row in rows}


def _expanding(name: str) -> Any:
    from sqlalchemy import bindparam

    return bindparam(name, expanding=True)


def enqueue_batch(queue: Queue, jobs: list[NewJob]) -> list[str]:
    """Enqueue one batch, surviving dropped connections without enqueueing anything twice:
    every job has a key of its own, so after an error the batch either is all there (it
    committed) or not at all."""
    keys = [job.dedupe_key or "" for job in jobs]
    for _ in range(100):
        try:
            ids = queue.enqueue_many(jobs)
            assert all(ids), "a chaos job's own key was already active"
            return [i for i in ids if i]
        except DatabaseError:
            time.sleep(0.2)
            try:
                present = keys_present(queue.engine, keys)
            except Exception:
                continue
            if present:
                assert len(present) == len(keys), "an enqueue committed half a batch"
                return [present[key] for key in keys]
    raise AssertionError("could not enqueue a batch in 100 tries")


def trickle(
    queue: Queue, total: int, seconds: float, kind: str = "chaos", max_attempts: int = 20
) -> Iterator[list[str]]:
    """Enqueue ``total`` jobs in batches spread over ``seconds``; yields each batch's ids.

    ``max_attempts`` is generous because a SIGKILL spends the attempt of every job its
    worker was running: 20 keeps an unlucky job from failing ``stale_lock_exhausted``.
    """
    batches = max(1, int(seconds / 0.1))
    started = time.monotonic()
    sent = 0
    for n in range(batches):
        upto = total * (n + 1) // batches
        jobs = [
            NewJob(kind, {"i": i}, dedupe_key=f"{kind}:{i}", max_attempts=max_attempts)
            for i in range(sent, upto)
        ]
        sent = upto
        if jobs:
            yield enqueue_batch(queue, jobs)
        pause = started + seconds * (n + 1) / batches - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # the trickle's own rhythm, not a wait for a condition


def status_counts(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT status, count(*) FROM mem_tree_jobs GROUP BY status"))
        return Counter({status: int(n) for status, n in rows})


# -- the checks and figures of a run --------------------------------------------------------


@dataclass
class Figures:
    scenario: str
    database: str
    jobs: int = 0
    seconds: float = 0.0
    processes_killed: int = 0
    restarts: int = 0
    orphaned_jobs: int = 0
    max_recovery_s: float = 0.0
    median_recovery_s: float = 0.0
    handler_runs: int = 0
    jobs_run_more_than_once: int = 0
    rolled_back_writes: int = 0
    retries_expedited: int = 0
    connections_terminated: int = 0
    leases_lost_while_alive: int = 0
    database_errors_logged: int = 0
    rows_lost: int = 0
    duplicate_rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> None:
        data = {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra
        line = json.dumps(data)
        print(f"\nchaos figures: {line}")
        path = os.environ.get("MEMTREE_CHAOS_REPORT")
        if path:
            with open(path, "a") as handle:
                handle.write(line + "\n")


def check_final_state(engine: Engine, job_ids: list[str], figures: Figures) -> None:
    """Every job done, nothing ready or running, and each job's domain row exactly once:
    the row of the claim that completed it."""
    counts = status_counts(engine)
    assert counts == Counter({"done": len(job_ids)}), f"not all done: {dict(counts)}"
    with engine.connect() as conn:
        jobs = {
            row[0]: (row[1], row[2])
            for row in conn.execute(text("SELECT id, lease_token, attempts FROM mem_tree_jobs"))
        }
        effect_rows = conn.execute(
            text("SELECT job_id, lease_token, attempt, outcome FROM chaos_effects")
        ).all()
    assert set(jobs) == set(job_ids)
    per_job = Counter(row[0] for row in effect_rows)
    figures.rows_lost = sum(1 for job_id in job_ids if per_job[job_id] == 0)
    figures.duplicate_rows = sum(n - 1 for n in per_job.values() if n > 1)
    assert figures.rows_lost == 0, "a done job without its domain row"
    assert figures.duplicate_rows == 0, "a job's domain row committed twice"
    assert set(per_job) <= set(job_ids), "a domain row of no job"
    for job_id, token, attempt, outcome in effect_rows:
        assert outcome == "done", f"the write of a failed or deferred run committed: {job_id}"
        assert (token, attempt) == jobs[job_id], (
            f"{job_id}: the committed row is not from the claim that completed the job"
        )


def check_recoveries(pool: WorkerPool, orphans: list[Orphan], figures: Figures) -> None:
    """Each job a SIGKILL left running was claimed again only after its lease expired, and
    within the lease plus the monkey's longest pause and a restart."""
    claims: dict[str, list[dict[str, Any]]] = defaultdict(list)
    events = pool.events()
    for event in events:
        if event["e"] == "start":
            claims[event["job"]].append(event)
    figures.handler_runs = sum(len(c) for c in claims.values())
    figures.jobs_run_more_than_once = sum(
        1 for c in claims.values() if len({e["token"] for e in c}) > 1
    )
    figures.rolled_back_writes = sum(
        1 for e in events if e["e"] == "wrote" and e.get("outcome") != "done"
    )
    figures.extra["failed_runs"] = sum(1 for e in events if e["e"] == "fail")
    figures.extra["deferred_runs"] = sum(1 for e in events if e["e"] == "defer")
    recoveries: list[float] = []
    past_lease: list[float] = []  # from the lease's end to the next claim
    for orphan in orphans:
        later = [
            e
            for e in claims[orphan.job_id]
            if e["token"] != orphan.token and e["started"] >= orphan.killed_at_ms
        ]
        assert later, f"{orphan.job_id}, left running by pid {orphan.pid}, was never run again"
        again = min(later, key=lambda e: e["started"])
        assert again["started"] > orphan.locked_until_ms, (
            f"{orphan.job_id} was claimed again before its lease expired"
        )
        recoveries.append((again["started"] - orphan.killed_at_ms) / 1000)
        past_lease.append((again["started"] - orphan.locked_until_ms) / 1000)
    figures.orphaned_jobs = len(orphans)
    if recoveries:
        figures.max_recovery_s = round(max(recoveries), 3)
        figures.median_recovery_s = round(statistics.median(recoveries), 3)
        figures.extra["max_claimed_after_lease_end_s"] = round(max(past_lease), 3)
        bound_s = (LEASE_MS + LEASE_MS / 2 + RECOVERY_SLACK_MS) / 1000
        assert max(recoveries) <= bound_s, (
            f"a job left by a killed worker took {max(recoveries):.1f} s to recover "
            f"(bound {bound_s:.1f} s)"
        )


def count_log_lines(logs: str, figures: Figures) -> None:
    figures.leases_lost_while_alive = logs.count("lost its lease") + logs.count(
        "lease lost before it was settled"
    )
    figures.database_errors_logged = logs.count(" failed (") + logs.count("did not commit")
    figures.extra["completions_not_committed"] = logs.count("did not commit")
    figures.extra["listener_reconnects"] = logs.count("listener lost its connection")
    assert "Traceback" not in logs, logs[logs.index("Traceback") - 2000 :][:6000]


def make_engine(url: str) -> Engine:
    return memtree.create_engine(url)


def kind_of_database(url: str) -> str:
    if url.startswith("sqlite"):
        return "sqlite"
    return "mariadb" if url.startswith(("mariadb", "mysql")) else "postgresql"
