"""The original crate's queue SQL and connection set-up, verbatim, as test data.

Source: GitHub ``tinyhumansai/tinycortex`` at commit
be076a4ccf65c8766bdafdd06d274490688e25c9 ("chore: bump tinycortex version to 0.1.1 in
Cargo files"). Each string below is copied character for character from the file named
above it, so the interop tests run exactly what a tinycortex 0.1.1 process runs against
the shared table; only the host language around them is Python's ``sqlite3`` instead of
rusqlite. memtree's package never uses these: they are what memtree must live next to.

rusqlite binds ``?1``-style numbered parameters, and so does Python's ``sqlite3`` (with a
sequence), so the strings run unchanged. :func:`numbered_to_named` turns them into
SQLAlchemy ``text()`` for the PostgreSQL half of the fencing tests, where only the
recovery and claim statements are needed and are valid PostgreSQL as written.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

#: src/memory/chunks/mod.rs: ``SQLITE_BUSY_TIMEOUT`` (15 s), for ``conn.busy_timeout``.
BUSY_TIMEOUT_S = 15.0

# -- src/memory/chunks/connection.rs: init_db / apply_schema, per connection -----------

PRAGMA_FOREIGN_KEYS = "PRAGMA foreign_keys = ON;"
PRAGMA_SYNCHRONOUS = "PRAGMA synchronous = FULL;"
PRAGMA_JOURNAL_MODE = "PRAGMA journal_mode=TRUNCATE"

# -- src/memory/chunks/schema.rs: the mem_tree_jobs part of SCHEMA ---------------------

SCHEMA_JOBS = """
CREATE TABLE IF NOT EXISTS mem_tree_jobs (
    id                     TEXT PRIMARY KEY,
    kind                   TEXT NOT NULL,
    payload_json           TEXT NOT NULL,
    dedupe_key             TEXT,
    status                 TEXT NOT NULL DEFAULT 'ready',
    attempts               INTEGER NOT NULL DEFAULT 0,
    max_attempts           INTEGER NOT NULL DEFAULT 5,
    available_at_ms        INTEGER NOT NULL,
    locked_until_ms        INTEGER,
    last_error             TEXT,
    created_at_ms          INTEGER NOT NULL,
    started_at_ms          INTEGER,
    completed_at_ms        INTEGER,
    failure_reason         TEXT,
    failure_class          TEXT
);

CREATE INDEX IF NOT EXISTS idx_mem_tree_jobs_ready
    ON mem_tree_jobs(status, available_at_ms);
CREATE INDEX IF NOT EXISTS idx_mem_tree_jobs_kind
    ON mem_tree_jobs(kind);
CREATE UNIQUE INDEX IF NOT EXISTS idx_mem_tree_jobs_dedupe_active
    ON mem_tree_jobs(dedupe_key)
    WHERE dedupe_key IS NOT NULL AND status IN ('ready', 'running');
"""

#: connection.rs apply_schema: add_column_if_missing(conn, "mem_tree_jobs", ...), whose
#: "duplicate column name" error counts as success.
ADD_COLUMNS_JOBS = (
    "ALTER TABLE mem_tree_jobs ADD COLUMN failure_reason TEXT",
    "ALTER TABLE mem_tree_jobs ADD COLUMN failure_class TEXT",
)

# -- src/memory/queue/store.rs ---------------------------------------------------------

#: enqueue_conn: ?1 id, ?2 kind, ?3 payload_json, ?4 dedupe_key, ?5 max_attempts,
#: ?6 available_at_ms, ?7 now_ms.
ENQUEUE = """INSERT OR IGNORE INTO mem_tree_jobs (
            id, kind, payload_json, dedupe_key, status, attempts, max_attempts,
            available_at_ms, locked_until_ms, last_error,
            created_at_ms, started_at_ms, completed_at_ms
        ) VALUES (?1, ?2, ?3, ?4, 'ready', 0, ?5, ?6, NULL, NULL, ?7, NULL, NULL)"""

#: claim_next: ?1 now_ms, ?2 lock_until. Returns the 15 wire columns.
CLAIM_NEXT = """UPDATE mem_tree_jobs
                    SET status = 'running',
                        attempts = attempts + 1,
                        started_at_ms = ?1,
                        locked_until_ms = ?2,
                        last_error = NULL
                  WHERE id = (
                      SELECT id FROM mem_tree_jobs
                       WHERE status = 'ready'
                         AND available_at_ms <= ?1
                         AND kind NOT IN ('topic_route', 'digest_daily')
                       ORDER BY
                         CASE kind
                           WHEN 'seal'          THEN 1
                           WHEN 'flush_stale'   THEN 2
                           WHEN 'append_buffer' THEN 3
                           ELSE 4
                         END ASC,
                         available_at_ms ASC
                       LIMIT 1
                  )
              RETURNING id, kind, payload_json, dedupe_key, status, attempts,
                        max_attempts, available_at_ms, locked_until_ms, last_error,
                        created_at_ms, started_at_ms, completed_at_ms,
                        failure_reason, failure_class"""

#: The positions of the columns CLAIM_NEXT returns that a settle needs.
ID, ATTEMPTS, STARTED_AT_MS = 0, 5, 11

# -- src/memory/queue/store_settle.rs --------------------------------------------------

#: mark_done: ?1 now_ms, ?2 job_id, ?3 claim_attempts, ?4 claim_started_at.
MARK_DONE = """UPDATE mem_tree_jobs
                SET status = 'done',
                    completed_at_ms = ?1,
                    locked_until_ms = NULL,
                    last_error = NULL
              WHERE id = ?2
                AND attempts = ?3
                AND started_at_ms IS ?4"""

#: recover_stale_locks: ?1 now_ms.
RECOVER_STALE_LOCKS = """UPDATE mem_tree_jobs
                SET status = 'ready',
                    last_error = COALESCE(last_error, 'recovered_from_stale_lock')
              WHERE status = 'running'
                AND locked_until_ms IS NOT NULL
                AND locked_until_ms < ?1"""

#: store.rs DEFAULT_LOCK_DURATION_MS (5 min).
DEFAULT_LOCK_DURATION_MS = 5 * 60 * 1_000


def connect(path: str) -> sqlite3.Connection:
    """A connection set up the way the crate's ``open_and_init`` sets up its connection:
    busy timeout, foreign keys, synchronous FULL, journal TRUNCATE, the jobs schema and
    its additive columns, in that order.

    ``isolation_level=None``: every statement runs in its own implicit transaction, as
    rusqlite's ``Connection::execute`` outside a ``Transaction`` does.
    """
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.executescript(PRAGMA_FOREIGN_KEYS)
    conn.executescript(PRAGMA_SYNCHRONOUS)
    mode = conn.execute(PRAGMA_JOURNAL_MODE).fetchone()[0]
    if str(mode).lower() != "truncate":
        raise RuntimeError(f"the crate's connection got journal_mode={mode}")
    conn.executescript(SCHEMA_JOBS)
    for statement in ADD_COLUMNS_JOBS:
        try:
            conn.execute(statement)
        except sqlite3.OperationalError as exc:
            if "duplicate column name" not in str(exc):
                raise
    return conn


_NUMBERED = re.compile(r"\?(\d+)")


def numbered_to_named(sql: str) -> str:
    """``?1`` placeholders as SQLAlchemy ``:p1`` binds (for ``text()``)."""
    return _NUMBERED.sub(lambda m: f":p{m.group(1)}", sql)


def named(*params: Any) -> dict[str, Any]:
    """The ``text()`` parameters for the numbered placeholders ``?1``, ``?2``, ..."""
    return {f"p{i}": value for i, value in enumerate(params, start=1)}
