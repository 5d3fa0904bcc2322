"""``python -m benchmarks.decompose``: where a SQLite job's time goes, layer by layer.

The full run compares memtree with the raw-SQL floor; this takes the difference apart
on one SQLite file (WAL, ``synchronous=NORMAL``, as memtree and the floor run it), so
that ``docs/benchmarks.md`` can say which part of it is the SQL memtree runs, which is
SQLAlchemy, and which is memtree's own Python, with measured figures rather than
guesses. Each step does the same work as the one above it plus one layer:

no-op drain (claims of 128, the settle of a batch and the claim of the next in one
transaction):

1. the floor: its claim and a ``VALUES`` settle, through ``sqlite3``;
2. memtree's own claim and settle statements (compiled by SQLAlchemy, fenced, returning
   every column), run through ``sqlite3`` alone;
3. ``Queue.complete_and_claim`` in a loop: the same statements through SQLAlchemy, with
   a ``Job`` per row, and no handler threads;
4. ``Worker.run_until_idle`` with 128 handler threads and a no-op handler;

one commit per job (a domain row and the job's settle):

5. ``BEGIN IMMEDIATE``, an ``INSERT`` and an ``UPDATE``, ``COMMIT`` through ``sqlite3``;
6. the same two statements in a SQLAlchemy ``Session`` (``text()``), no memtree;
7. the worker at concurrency 1, its handler writing its row through ``ctx.session``;

single enqueue:

8. ``BEGIN IMMEDIATE``, ``INSERT``, ``COMMIT`` through ``sqlite3``;
9. the same ``INSERT`` in a SQLAlchemy ``Session`` (``text()``), no memtree;
10. ``memtree.enqueue`` in a ``Session``.

Every step runs ``--repeat`` times (3 by default) and reports its best, in microseconds
per job; ``--jobs`` sets the size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import memtree
from benchmarks.settings import DRAIN_CONCURRENCY, KIND, TX_KIND
from benchmarks.sys_floor import SQLITE_CLAIM, _sqlite_settle_many
from memtree import NewJob, Queue, settle, store
from memtree.dialects import dialect_for
from memtree.worker import Handlers, JobContext, Worker

BATCH = DRAIN_CONCURRENCY
EFFECTS = "CREATE TABLE bench_effects (id INTEGER PRIMARY KEY, job_id TEXT NOT NULL)"
EFFECT_INSERT = "INSERT INTO bench_effects (job_id) VALUES (:job_id)"
SETTLE_ONE = (
    "UPDATE mem_tree_jobs SET status = 'done', completed_at_ms = :now, locked_until_ms = NULL"
    " WHERE id = :id AND lease_token = :token AND status = 'running'"
)
INSERT = (
    "INSERT INTO mem_tree_jobs (id, kind, payload_json, status, attempts, max_attempts,"
    " available_at_ms, created_at_ms) VALUES (:id, :kind, :payload, 'ready', 0, 5, :now, :now)"
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Fixture:
    """A migrated SQLite file filled with ``jobs`` ready jobs of ``kind``, copied afresh
    for every measurement (the filled file is built once)."""

    def __init__(self, directory: Path, jobs: int) -> None:
        self.directory = directory
        self.template = directory / "template.db"
        engine = memtree.create_engine(f"sqlite:///{self.template}")
        Queue(engine).migrate()
        engine.dispose()
        self.jobs = jobs
        self._filled: dict[str, Path] = {}

    def fresh(self, kind: str | None) -> Path:
        """A copy of the template, holding ``jobs`` jobs of ``kind`` (none for ``None``)."""
        source = self.template
        if kind is not None:
            if kind not in self._filled:
                filled = self.directory / f"filled-{kind}.db"
                shutil.copy(self.template, filled)
                lite = sqlite3.connect(filled)
                now = now_ms()
                lite.executemany(
                    "INSERT INTO mem_tree_jobs (id, kind, payload_json, status, attempts,"
                    " max_attempts, available_at_ms, created_at_ms)"
                    " VALUES (?, ?, ?, 'ready', 0, 5, ?, ?)",
                    (
                        (f"job:{uuid.uuid4()}", kind, json.dumps({"i": i}), now, now)
                        for i in range(self.jobs)
                    ),
                )
                lite.execute(EFFECTS)
                lite.commit()
                lite.close()
                self._filled[kind] = filled
            source = self._filled[kind]
        target = self.directory / f"run-{uuid.uuid4().hex}.db"
        shutil.copy(source, target)
        if kind is None:
            lite = sqlite3.connect(target)
            lite.execute(EFFECTS)
            lite.commit()
            lite.close()
        return target


def connect(path: Path) -> sqlite3.Connection:
    lite = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    lite.execute("PRAGMA journal_mode = WAL")
    lite.execute("PRAGMA synchronous = NORMAL")
    return lite


def engine_for(path: Path) -> Engine:
    return memtree.create_engine(f"sqlite:///{path}")


# -- the no-op drain ----------------------------------------------------------------------


def floor_drain(path: Path) -> int:
    lite = connect(path)
    rows: list[Any] = []
    done = 0
    while True:
        lite.execute("BEGIN IMMEDIATE")
        now = now_ms()
        if rows:
            params: list[Any] = [now]
            for row in rows:
                params.extend((row[0], row[3]))
            lite.execute(_sqlite_settle_many(len(rows)), params)
        rows = lite.execute(
            SQLITE_CLAIM,
            {
                "now": now,
                "until": now + 300_000,
                "token": uuid.uuid4().hex,
                "kind": KIND,
                "limit": BATCH,
            },
        ).fetchall()
        lite.execute("COMMIT")
        if not rows:
            lite.close()
            return done
        done += len(rows)


def memtree_statements_drain(path: Path) -> int:
    """memtree's claim and batched settle, exactly as SQLAlchemy compiles them, on sqlite3."""
    engine = engine_for(path)
    claim_compiled = store._claim_statement("sqlite", (), (), (KIND,)).compile(
        dialect=engine.dialect
    )
    settle_compiled = settle._held_statements("sqlite")["done"].compile(dialect=engine.dialect)
    engine.dispose()
    claim_sql, claim_order = str(claim_compiled), tuple(claim_compiled.positiontup or ())
    settle_sql, settle_order = str(settle_compiled), tuple(settle_compiled.positiontup or ())
    dialect = dialect_for("sqlite")
    lite = connect(path)
    rows: list[Any] = []
    done = 0
    while True:
        lite.execute("BEGIN IMMEDIATE")
        now = now_ms()
        if rows:
            values = {
                "now": now,
                **dialect.claims_params([(row[0], row[15], row[5], row[11]) for row in rows]),
            }
            params = settle_compiled.construct_params(values)
            lite.execute(settle_sql, [params[name] for name in settle_order]).fetchall()
        values = {"now": now, "until": now + 300_000, "token": uuid.uuid4().hex, "limit": BATCH}
        params = claim_compiled.construct_params(values)
        rows = lite.execute(claim_sql, [params[name] for name in claim_order]).fetchall()
        lite.execute("COMMIT")
        if not rows:
            lite.close()
            return done
        done += len(rows)


def queue_drain(path: Path) -> int:
    engine = engine_for(path)
    queue = Queue(engine)
    claimed: list[Any] = []
    done = 0
    while True:
        _, batches = queue.complete_and_claim(
            [(job, ()) for job in claimed], [(BATCH, (KIND,))], BATCH
        )
        claimed = batches[0]
        if not claimed:
            engine.dispose()
            return done
        done += len(claimed)


def worker_drain(path: Path) -> int:
    engine = engine_for(path)
    handlers = Handlers()
    handlers.register(KIND)(lambda ctx: None)
    settled = Worker(Queue(engine), handlers, concurrency=BATCH, gates=()).run_until_idle()
    engine.dispose()
    return settled


# -- one commit per job -------------------------------------------------------------------


def raw_transactions(path: Path, count: int) -> int:
    lite = connect(path)
    for i in range(count):
        lite.execute("BEGIN IMMEDIATE")
        lite.execute(EFFECT_INSERT, {"job_id": f"j{i}"})
        lite.execute(SETTLE_ONE, {"now": now_ms(), "id": f"j{i}", "token": "t"})
        lite.execute("COMMIT")
    lite.close()
    return count


def session_transactions(path: Path, count: int) -> int:
    engine = engine_for(path)
    effect, settle_one = text(EFFECT_INSERT), text(SETTLE_ONE)
    for i in range(count):
        with Session(engine) as session:
            session.execute(effect, {"job_id": f"j{i}"})
            session.execute(settle_one, {"now": now_ms(), "id": f"j{i}", "token": "t"})
            session.commit()
    engine.dispose()
    return count


def worker_transactional_drain(path: Path) -> int:
    engine = engine_for(path)
    effect = text(EFFECT_INSERT)
    handlers = Handlers()

    @handlers.register(TX_KIND)
    def write(ctx: JobContext) -> None:
        ctx.session.execute(effect, {"job_id": ctx.job.id})

    settled = Worker(Queue(engine), handlers, concurrency=1, gates=()).run_until_idle()
    engine.dispose()
    return settled


# -- single enqueue -----------------------------------------------------------------------


def _insert_params(i: int) -> dict[str, Any]:
    return {"id": f"job:{uuid.uuid4()}", "kind": KIND, "payload": f'{{"i":{i}}}', "now": now_ms()}


def raw_enqueues(path: Path, count: int) -> int:
    lite = connect(path)
    for i in range(count):
        lite.execute("BEGIN IMMEDIATE")
        lite.execute(INSERT, _insert_params(i))
        lite.execute("COMMIT")
    lite.close()
    return count


def session_enqueues(path: Path, count: int) -> int:
    engine = engine_for(path)
    insert = text(INSERT)
    for i in range(count):
        with Session(engine) as session:
            session.execute(insert, _insert_params(i))
            session.commit()
    engine.dispose()
    return count


def memtree_enqueues(path: Path, count: int) -> int:
    engine = engine_for(path)
    for i in range(count):
        with Session(engine) as session, session.begin():
            memtree.enqueue(session, NewJob(KIND, {"i": i}))
    engine.dispose()
    return count


Step = tuple[str, str, str | None, Callable[[Path], int]]


def steps(jobs: int, transactions: int) -> list[Step]:
    """(group, label, kind to fill, measurement) in order; each group's first is its base."""
    return [
        ("no-op drain", "1. floor: claim + VALUES settle, sqlite3", KIND, floor_drain),
        ("no-op drain", "2. memtree's statements, sqlite3", KIND, memtree_statements_drain),
        ("no-op drain", "3. Queue.complete_and_claim, no threads", KIND, queue_drain),
        ("no-op drain", "4. Worker, 128 threads, no-op handler", KIND, worker_drain),
        (
            "commit per job",
            "5. INSERT + UPDATE + COMMIT, sqlite3",
            None,
            lambda p: raw_transactions(p, transactions),
        ),
        (
            "commit per job",
            "6. the same in a SQLAlchemy Session",
            None,
            lambda p: session_transactions(p, transactions),
        ),
        (
            "commit per job",
            "7. Worker, ctx.session, concurrency 1",
            TX_KIND,
            worker_transactional_drain,
        ),
        (
            "single enqueue",
            "8. INSERT + COMMIT, sqlite3",
            None,
            lambda p: raw_enqueues(p, transactions),
        ),
        (
            "single enqueue",
            "9. the same INSERT in a SQLAlchemy Session",
            None,
            lambda p: session_enqueues(p, transactions),
        ),
        (
            "single enqueue",
            "10. memtree.enqueue in a Session",
            None,
            lambda p: memtree_enqueues(p, transactions),
        ),
    ]


def measure(jobs: int, transactions: int, repeat: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="memtree-decompose-") as directory:
        fixture = Fixture(Path(directory), jobs)
        base: dict[str, float] = {}
        for group, label, kind, run in steps(jobs, transactions):
            runs: list[float] = []
            for _ in range(repeat):
                path = fixture.fresh(kind)
                start = time.perf_counter()
                count = run(path)
                elapsed = time.perf_counter() - start
                if count <= 0:
                    raise RuntimeError(f"{label}: nothing was done")
                runs.append(elapsed / count * 1e6)
            best = min(runs)
            base.setdefault(group, best)
            results.append(
                {
                    "group": group,
                    "step": label,
                    "us_per_job": best,
                    "runs": runs,
                    "floor_share": base[group] / best,
                }
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decompose", description=__doc__)
    parser.add_argument("--jobs", type=int, default=50_000, help="jobs per drain (50,000)")
    parser.add_argument(
        "--transactions", type=int, default=5_000, help="jobs per commit-per-job step (5,000)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per step; the best counts")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    results = measure(args.jobs, args.transactions, args.repeat)
    table = Table(title="Where a SQLite job's time goes (best of the runs)")
    for column in ("work", "step", "µs per job", "first step / this", "runs (µs per job)"):
        table.add_column(column, justify="right" if "µs" in column or "/" in column else "left")
    for row in results:
        table.add_row(
            row["group"],
            row["step"],
            f"{row['us_per_job']:.1f}",
            f"{row['floor_share']:.2f}x",
            ", ".join(f"{r:.1f}" for r in row["runs"]),
        )
    Console(width=150).print(table)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
