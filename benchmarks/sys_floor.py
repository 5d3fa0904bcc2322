"""The raw-SQL floor: the driver alone (psycopg 3 / PyMySQL / sqlite3) on memtree's table.

The least SQL a leased queue can run: per claim batch one claim statement (the same
``UPDATE … WHERE id IN (SELECT … ORDER BY available_at_ms LIMIT n [FOR UPDATE SKIP
LOCKED]) RETURNING …`` memtree runs, at the same batch size) and one settle statement
(``UPDATE … SET status = 'done' WHERE (id, lease_token) IN (…)``), and one commit: the
settle of the batch just run and the claim of the next share a transaction, and the
jobs run after it commits. The transactional floor claims a batch, then commits once
per job: one domain row inserted and the job settled, fenced to its lease, in one
transaction. Enqueue: one INSERT per transaction, or ``executemany`` of a batch in one.

MariaDB has no ``UPDATE … RETURNING``, so its claim is two statements in the claim's
transaction: ``SELECT id, kind, payload_json … ORDER BY available_at_ms LIMIT n FOR
UPDATE SKIP LOCKED``, then ``UPDATE … WHERE id IN (…)`` of the rows it locked; its
settle is ``UPDATE … SET status = 'done' WHERE id IN (…) AND lease_token = …`` (a
batch's rows share their claim's token). PyMySQL's ``executemany`` sends a batch of
inserts as one multi-row ``INSERT``. Every transaction runs at READ COMMITTED, on
memtree's own table as its revisions make it on MariaDB (every index included), as the
other floors run on theirs.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable
from functools import cache
from typing import Any

import psycopg

from benchmarks import proc
from benchmarks.dbs import Target, mariadb_connect, now_ms, sqlite_connect
from benchmarks.settings import KIND, TX_KIND

LEASE_MS = 5 * 60 * 1000

_INSERT_COLUMNS = (
    "id, kind, payload_json, status, attempts, max_attempts, available_at_ms, created_at_ms"
)

PG_INSERT = (
    f"INSERT INTO mem_tree_jobs ({_INSERT_COLUMNS})"  # noqa: S608 - constants only
    " VALUES (%s, %s, %s, 'ready', 0, 5, %s, %s)"
)
SQLITE_INSERT = (
    f"INSERT INTO mem_tree_jobs ({_INSERT_COLUMNS})"  # noqa: S608 - constants only
    " VALUES (?, ?, ?, 'ready', 0, 5, ?, ?)"
)

PG_CLAIM = """
UPDATE mem_tree_jobs
   SET status = 'running', attempts = attempts + 1, started_at_ms = %(now)s,
       locked_until_ms = %(until)s, last_error = NULL, lease_token = %(token)s
 WHERE id IN (SELECT id FROM mem_tree_jobs
               WHERE status = 'ready' AND kind = %(kind)s AND available_at_ms <= %(now)s
               ORDER BY available_at_ms LIMIT %(limit)s
               FOR UPDATE SKIP LOCKED)
RETURNING id, kind, payload_json, lease_token
"""
PG_SETTLE_MANY = """
UPDATE mem_tree_jobs
   SET status = 'done', completed_at_ms = %(now)s, locked_until_ms = NULL
 WHERE status = 'running'
   AND (id, lease_token) IN (SELECT * FROM unnest(%(ids)s::text[], %(tokens)s::text[]))
"""
PG_SETTLE_ONE = """
UPDATE mem_tree_jobs
   SET status = 'done', completed_at_ms = %(now)s, locked_until_ms = NULL
 WHERE id = %(id)s AND lease_token = %(token)s AND status = 'running'
"""
PG_EFFECT = "INSERT INTO bench_effects (job_id, created_at_ms) VALUES (%(id)s, %(now)s)"

#: Every value a placeholder, so that PyMySQL's ``executemany`` rewrites a batch into
#: one multi-row INSERT (it does so only for a VALUES list of placeholders alone).
MARIADB_INSERT = (
    f"INSERT INTO mem_tree_jobs ({_INSERT_COLUMNS})"  # noqa: S608 - constants only
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)
MARIADB_CLAIM_SELECT = """
SELECT id, kind, payload_json FROM mem_tree_jobs
 WHERE status = 'ready' AND kind = %(kind)s AND available_at_ms <= %(now)s
 ORDER BY available_at_ms LIMIT %(limit)s
   FOR UPDATE SKIP LOCKED
"""
MARIADB_SETTLE_ONE = PG_SETTLE_ONE  # the same statement, and the same %(name)s style
MARIADB_EFFECT = PG_EFFECT


@cache
def _mariadb_claim_update(count: int) -> str:
    ids = ", ".join(["%s"] * count)
    return (
        "UPDATE mem_tree_jobs"  # noqa: S608 - placeholders only
        " SET status = 'running', attempts = attempts + 1, started_at_ms = %s,"
        " locked_until_ms = %s, last_error = NULL, lease_token = %s"
        f" WHERE id IN ({ids})"
    )


@cache
def _mariadb_settle_many(count: int) -> str:
    ids = ", ".join(["%s"] * count)
    return (
        "UPDATE mem_tree_jobs"  # noqa: S608 - placeholders only
        " SET status = 'done', completed_at_ms = %s, locked_until_ms = NULL"
        f" WHERE status = 'running' AND lease_token = %s AND id IN ({ids})"
    )


SQLITE_CLAIM = """
UPDATE mem_tree_jobs
   SET status = 'running', attempts = attempts + 1, started_at_ms = :now,
       locked_until_ms = :until, last_error = NULL, lease_token = :token
 WHERE id IN (SELECT id FROM mem_tree_jobs
               WHERE status = 'ready' AND kind = :kind AND available_at_ms <= :now
               ORDER BY available_at_ms LIMIT :limit)
RETURNING id, kind, payload_json, lease_token
"""
SQLITE_SETTLE_ONE = """
UPDATE mem_tree_jobs
   SET status = 'done', completed_at_ms = :now, locked_until_ms = NULL
 WHERE id = :id AND lease_token = :token AND status = 'running'
"""
SQLITE_EFFECT = "INSERT INTO bench_effects (job_id, created_at_ms) VALUES (:id, :now)"


@cache
def _sqlite_settle_many(count: int) -> str:
    pairs = ", ".join(["(?, ?)"] * count)
    return (
        "UPDATE mem_tree_jobs SET status = 'done', completed_at_ms = ?, locked_until_ms = NULL"  # noqa: S608
        f" WHERE status = 'running' AND (id, lease_token) IN (VALUES {pairs})"
    )


def _new_row(i: int, now: int) -> tuple[Any, ...]:
    return (f"job:{uuid.uuid4()}", KIND, json.dumps({"i": i}), now, now)


def _new_mariadb_row(i: int, now: int) -> tuple[Any, ...]:
    return (f"job:{uuid.uuid4()}", KIND, json.dumps({"i": i}), "ready", 0, 5, now, now)


def _noop(payload_json: str) -> None:
    return None


# -- enqueue -------------------------------------------------------------------------------


def enqueue_single(target: Target, count: int, warmup: int = 20) -> float:
    if target.is_pg:
        with psycopg.connect(target.url) as conn:
            for i in range(-warmup, count):
                if i == 0:
                    start = time.perf_counter()
                conn.execute(PG_INSERT, _new_row(i, now_ms()))
                conn.commit()
            return time.perf_counter() - start
    if target.is_mariadb:
        maria = mariadb_connect(target.url)
        try:
            with maria.cursor() as cursor:
                for i in range(-warmup, count):
                    if i == 0:
                        start = time.perf_counter()
                    cursor.execute(MARIADB_INSERT, _new_mariadb_row(i, now_ms()))
                    maria.commit()
            return time.perf_counter() - start
        finally:
            maria.close()
    lite = sqlite_connect(target.path)
    try:
        for i in range(-warmup, count):
            if i == 0:
                start = time.perf_counter()
            lite.execute("BEGIN IMMEDIATE")
            lite.execute(SQLITE_INSERT, _new_row(i, now_ms()))
            lite.execute("COMMIT")
        return time.perf_counter() - start
    finally:
        lite.close()


def enqueue_batched(target: Target, count: int, batch: int) -> float:
    if target.is_pg:
        with psycopg.connect(target.url) as conn:
            conn.execute(PG_INSERT, _new_row(-1, now_ms()))
            conn.commit()
            start = time.perf_counter()
            for offset in range(0, count, batch):
                now = now_ms()
                rows = [_new_row(i, now) for i in range(offset, min(offset + batch, count))]
                with conn.cursor() as cursor:
                    cursor.executemany(PG_INSERT, rows)
                conn.commit()
            return time.perf_counter() - start
    if target.is_mariadb:
        maria = mariadb_connect(target.url)
        try:
            with maria.cursor() as cursor:
                cursor.execute(MARIADB_INSERT, _new_mariadb_row(-1, now_ms()))
                maria.commit()
                start = time.perf_counter()
                for offset in range(0, count, batch):
                    now = now_ms()
                    rows = [
                        _new_mariadb_row(i, now) for i in range(offset, min(offset + batch, count))
                    ]
                    cursor.executemany(MARIADB_INSERT, rows)  # one multi-row INSERT
                    maria.commit()
            return time.perf_counter() - start
        finally:
            maria.close()
    lite = sqlite_connect(target.path)
    try:
        start = time.perf_counter()
        for offset in range(0, count, batch):
            now = now_ms()
            rows = [_new_row(i, now) for i in range(offset, min(offset + batch, count))]
            lite.execute("BEGIN IMMEDIATE")
            lite.executemany(SQLITE_INSERT, rows)
            lite.execute("COMMIT")
        return time.perf_counter() - start
    finally:
        lite.close()


# -- claim cost (backlog) ------------------------------------------------------------------


class Claimer:
    """The raw claim statement of a full batch, in a transaction of its own, timed."""

    def __init__(self, target: Target) -> None:
        self._claimer = _Claimer(target)

    def claim(self, batch: int) -> float:
        """Seconds for one claim of ``batch`` rows (which must all be there)."""
        start = time.perf_counter()
        rows = self._claimer.claim(KIND, batch)
        elapsed = time.perf_counter() - start
        if len(rows) != batch:
            raise RuntimeError(f"a floor claim returned {len(rows)} rows, not {batch}")
        return elapsed

    def close(self) -> None:
        self._claimer.close()


class _Claimer:
    """Claim and settle with the driver alone."""

    def __init__(self, target: Target) -> None:
        self.is_pg = target.is_pg
        self.pg: psycopg.Connection[Any] | None = None
        self.maria: Any = None  # a PyMySQL connection, autocommit off, READ COMMITTED
        self.lite: sqlite3.Connection | None = None
        if self.is_pg:
            self.pg = psycopg.connect(target.url)
        elif target.is_mariadb:
            self.maria = mariadb_connect(target.url)
        else:
            self.lite = sqlite_connect(target.path)

    def close(self) -> None:
        if self.pg is not None:
            self.pg.close()
        if self.maria is not None:
            self.maria.close()
        if self.lite is not None:
            self.lite.close()

    def claim(self, kind: str, limit: int) -> list[tuple[Any, ...]]:
        """One claim in a transaction of its own."""
        self.begin()
        rows = self.claim_statement(kind, limit)
        self.commit()
        return rows

    def begin(self) -> None:
        if self.lite is not None:
            self.lite.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        if self.pg is not None:
            self.pg.commit()
        elif self.maria is not None:
            self.maria.commit()
        else:
            assert self.lite is not None
            self.lite.execute("COMMIT")

    def claim_statement(self, kind: str, limit: int) -> list[tuple[Any, ...]]:
        now = now_ms()
        params = {
            "now": now,
            "until": now + LEASE_MS,
            "token": uuid.uuid4().hex,
            "kind": kind,
            "limit": limit,
        }
        if self.pg is not None:
            return self.pg.execute(PG_CLAIM, params).fetchall()
        if self.maria is not None:
            with self.maria.cursor() as cursor:
                cursor.execute(MARIADB_CLAIM_SELECT, params)
                locked = cursor.fetchall()
                if not locked:
                    return []
                cursor.execute(
                    _mariadb_claim_update(len(locked)),
                    [now, params["until"], params["token"], *(r[0] for r in locked)],
                )
            return [(r[0], r[1], r[2], params["token"]) for r in locked]
        assert self.lite is not None
        return self.lite.execute(SQLITE_CLAIM, params).fetchall()

    def settle_statement(self, rows: list[tuple[Any, ...]]) -> int:
        """Settle ``rows`` done, each fenced to its lease, in one statement."""
        if not rows:
            return 0
        now = now_ms()
        if self.pg is not None:
            cursor = self.pg.execute(
                PG_SETTLE_MANY,
                {"now": now, "ids": [r[0] for r in rows], "tokens": [r[3] for r in rows]},
            )
            return cursor.rowcount
        if self.maria is not None:
            settled = 0
            tokens = {r[3] for r in rows}  # one: the batch of one claim
            with self.maria.cursor() as maria_cursor:
                for token in tokens:
                    ids = [r[0] for r in rows if r[3] == token]
                    settled += maria_cursor.execute(
                        _mariadb_settle_many(len(ids)), [now, token, *ids]
                    )
            return settled
        assert self.lite is not None
        params: list[Any] = [now]
        for row in rows:
            params.extend((row[0], row[3]))
        return self.lite.execute(_sqlite_settle_many(len(rows)), params).rowcount

    def settle_one_with_effect(self, row: tuple[Any, ...]) -> int:
        """One transaction: the handler's domain row and the job's fenced settle."""
        params = {"id": row[0], "token": row[3], "now": now_ms()}
        self.begin()
        if self.pg is not None:
            self.pg.execute(PG_EFFECT, params)
            count = self.pg.execute(PG_SETTLE_ONE, params).rowcount
        elif self.maria is not None:
            with self.maria.cursor() as cursor:
                cursor.execute(MARIADB_EFFECT, params)
                count = cursor.execute(MARIADB_SETTLE_ONE, params)
        else:
            assert self.lite is not None
            self.lite.execute(SQLITE_EFFECT, params)
            count = self.lite.execute(SQLITE_SETTLE_ONE, params).rowcount
        self.commit()
        return count


def drain_child(spec: dict[str, Any]) -> None:
    """Drain with the driver alone: claim a batch, run each job, settle the batch."""
    target = Target(spec["backend"], spec["url"])
    claimer = _Claimer(target)
    transactional = spec["transactional"]
    kind = TX_KIND if transactional else KIND
    batch = spec["batch"]
    handler: Callable[[str], None] = _noop
    proc.ready_and_wait()
    start = time.time()
    settled = 0
    if transactional:
        while rows := claimer.claim(kind, batch):
            for row in rows:
                handler(row[2])
                settled += claimer.settle_one_with_effect(row)
    else:
        finished: list[tuple[Any, ...]] = []
        while True:
            # One transaction: settle the batch just run, claim the next one.
            claimer.begin()
            settled += claimer.settle_statement(finished)
            rows = claimer.claim_statement(kind, batch)
            claimer.commit()
            if not rows:
                break
            for row in rows:
                handler(row[2])
            finished = rows
    end = time.time()
    claimer.close()
    proc.result({"count": settled, "start": start, "end": end})
