"""A tinycortex 0.1.1 process for the interop tests: ``python -m tests.crate_worker DB OUT N``.

It does what the crate's queue does, with the crate's own SQL (``tests/tinycortex.py``)
on one connection set up as the crate sets up its cached connection: ``bootstrap``
(purge retired kinds, recover stale locks), then ``run_once`` in a loop (claim the next
job, run it, ``mark_done`` fenced on the claim's attempts and start), enqueueing one of
its ``N`` jobs before each step until all are in. A run appends the job's id to OUT and
flushes before the settle, so OUT counts every run, settled or not. It stops after two
seconds without a job once its jobs are in, or when the file ``OUT.stop`` appears, and
exits non-zero with the error on stderr if any statement fails (a ``database is
locked`` included).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

from tests import tinycortex

#: store.rs purge_retired_jobs.
PURGE_RETIRED = "DELETE FROM mem_tree_jobs WHERE kind IN ('topic_route', 'digest_daily')"
KIND = "append_buffer"
IDLE_EXIT_S = 2.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def main(db: str, out: str, count: int) -> None:
    conn = tinycortex.connect(db)
    conn.execute(PURGE_RETIRED)
    conn.execute(tinycortex.RECOVER_STALE_LOCKS, (now_ms(),))
    enqueued = 0
    idle_since: float | None = None
    with open(out, "a", encoding="utf-8") as runs:
        while not os.path.exists(out + ".stop"):
            if enqueued < count:
                now = now_ms()
                payload = json.dumps({"side": "crate", "n": enqueued})
                # store.rs enqueue_conn: a fresh "job:<uuid>" id, default max attempts 5.
                params = (f"job:{uuid.uuid4()}", KIND, payload, None, 5, now, now)
                conn.execute(tinycortex.ENQUEUE, params)
                enqueued += 1
            now = now_ms()
            claimed = conn.execute(
                tinycortex.CLAIM_NEXT, (now, now + tinycortex.DEFAULT_LOCK_DURATION_MS)
            ).fetchall()
            if not claimed:
                if enqueued >= count:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > IDLE_EXIT_S:
                        break
                time.sleep(0.005)
                continue
            idle_since = None
            job = claimed[0]
            runs.write(job[tinycortex.ID] + "\n")
            runs.flush()
            conn.execute(
                tinycortex.MARK_DONE,
                (
                    now_ms(),
                    job[tinycortex.ID],
                    job[tinycortex.ATTEMPTS],
                    job[tinycortex.STARTED_AT_MS],
                ),
            )
    conn.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
