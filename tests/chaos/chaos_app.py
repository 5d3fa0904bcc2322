"""The application the chaos workers run: ``memtree worker --app tests.chaos.chaos_app:handlers``.

Every handler writes one domain row (``chaos_effects``, with the job's id and claim) through
``ctx.session``, so the row commits with the job's completion or not at all. The table has
no unique constraint on purpose: a job whose effects committed twice shows as two rows.

Each run also appends one JSON line per event to ``$CHAOS_LOG_DIR/claims-<pid>.jsonl``
with a single ``os.write`` (an O_APPEND write reaches the kernel at once, so the lines of
a process killed with SIGKILL are still there): ``start`` when a handler begins, ``wrote``
once its row is flushed inside the job's transaction, and the outcome it returns.

``CHAOS_MODE`` picks the handlers' behaviour:

- ``plain``: every run succeeds.
- ``write-first``: every run writes its row first and then works, so its transaction is
  open while it works (a dropped connection then hits a transaction in flight).
- ``flaky``: deterministic by job id and attempt, 20% of jobs fail their first attempt
  (a transient error) and 10% defer themselves for 100-280 ms until 1.5 s after a worker
  process first ran them (not after they were created: on a loaded machine a job can
  wait longer than that for its first claim); so every job converges.

``CHAOS_EXECUTOR=asyncio`` registers the same handlers as ``async def`` (their session
is an ``AsyncSession``, their waits ``asyncio.sleep``); ``threads`` (the default) as ``def``.

Kind ``hang`` (any mode) sleeps ``payload["hang_s"]`` seconds on the attempts listed in
``payload["hang_attempts"]`` before writing its row: longer than its lease, to test the
heartbeat and frozen workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, Text, insert

from memtree.worker import AsyncJobContext, Defer, Handlers, JobContext

metadata = MetaData()

effects = Table(
    "chaos_effects",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), nullable=False),  # deliberately not unique
    Column("lease_token", String(64)),
    Column("attempt", Integer, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("outcome", Text, nullable=False),
)

MODE = os.environ.get("CHAOS_MODE", "plain")
EXECUTOR = os.environ.get("CHAOS_EXECUTOR", "threads")
FAIL_PERCENT = 20
DEFER_PERCENT = 10
DEFER_WINDOW_MS = 1500

_log_fd: int | None = None
_log_lock = threading.Lock()


def bucket(job_id: str) -> int:
    """0-99, stable for a job id across processes (unlike ``hash``)."""
    return int(hashlib.sha256(job_id.encode()).hexdigest()[:8], 16) % 100


def work_ms(job_id: str) -> int:
    """How long a chaos job 'works' before writing: 20-100 ms, stable per job."""
    return 20 + int(hashlib.sha256(b"work:" + job_id.encode()).hexdigest()[:8], 16) % 81


def record(event: str, ctx: JobContext, **extra: Any) -> None:
    global _log_fd
    directory = os.environ.get("CHAOS_LOG_DIR")
    if not directory:
        return
    line = {
        "e": event,
        "job": ctx.job.id,
        "token": ctx.job.lease_token,
        "attempt": ctx.job.attempts,
        "started": ctx.job.started_at_ms,
        "created": ctx.job.created_at_ms,
        "pid": os.getpid(),
        "t": time.time_ns() // 1_000_000,
        **extra,
    }
    data = (json.dumps(line) + "\n").encode()
    with _log_lock:
        if _log_fd is None:
            path = os.path.join(directory, f"claims-{os.getpid()}.jsonl")
            _log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(_log_fd, data)


def effect(ctx: JobContext, outcome: str) -> Any:
    return insert(effects).values(
        job_id=ctx.job.id,
        lease_token=ctx.job.lease_token,
        attempt=ctx.job.attempts,
        pid=os.getpid(),
        outcome=outcome,
    )


def write_effect(ctx: JobContext, outcome: str) -> None:
    ctx.session.execute(effect(ctx, outcome))
    ctx.session.flush()
    record("wrote", ctx, outcome=outcome)


async def write_effect_async(ctx: AsyncJobContext, outcome: str) -> None:
    await ctx.session.execute(effect(ctx, outcome))
    await ctx.session.flush()
    record("wrote", ctx, outcome=outcome)


#: When this process first ran each job (the deferral window starts there).
_first_run_ms: dict[str, int] = {}

handlers = Handlers()


def chaos(ctx: JobContext) -> Defer | None:
    record("start", ctx)
    if MODE == "write-first":
        write_effect(ctx, "done")
        time.sleep(work_ms(ctx.job.id) / 1000)
        return None
    time.sleep(work_ms(ctx.job.id) / 1000)  # before any write: no SQLite lock held meanwhile
    if _should_fail(ctx):
        write_effect(ctx, "failed")  # rolled back with the failure
        record("fail", ctx)
        raise RuntimeError(f"chaos: transient failure of {ctx.job.id} on its first attempt")
    defer = _defer_for(ctx)
    if defer is not None:
        write_effect(ctx, "deferred")  # rolled back with the deferral
        record("defer", ctx)
        return defer
    write_effect(ctx, "done")
    return None


def hang(ctx: JobContext) -> None:
    record("start", ctx)
    payload = ctx.payload
    if ctx.job.attempts in payload.get("hang_attempts", [1]):
        time.sleep(float(payload["hang_s"]))
        record("woke", ctx)
    write_effect(ctx, "done")
    return None


def _should_fail(ctx: JobContext) -> bool:
    return MODE == "flaky" and bucket(ctx.job.id) < FAIL_PERCENT and ctx.job.attempts == 1


def _defer_for(ctx: JobContext) -> Defer | None:
    share = bucket(ctx.job.id)
    deadline = _first_run_ms.setdefault(ctx.job.id, ctx.now_ms()) + DEFER_WINDOW_MS
    in_window = MODE == "flaky" and FAIL_PERCENT <= share < FAIL_PERCENT + DEFER_PERCENT
    if in_window and ctx.now_ms() < deadline:
        return Defer(delay_ms=100 + (share - FAIL_PERCENT) * 20, reason="chaos: not yet")
    return None


async def chaos_async(ctx: AsyncJobContext) -> Defer | None:
    record("start", ctx)
    if MODE == "write-first":
        await write_effect_async(ctx, "done")
        await asyncio.sleep(work_ms(ctx.job.id) / 1000)
        return None
    await asyncio.sleep(work_ms(ctx.job.id) / 1000)
    if _should_fail(ctx):
        await write_effect_async(ctx, "failed")
        record("fail", ctx)
        raise RuntimeError(f"chaos: transient failure of {ctx.job.id} on its first attempt")
    defer = _defer_for(ctx)
    if defer is not None:
        await write_effect_async(ctx, "deferred")
        record("defer", ctx)
        return defer
    await write_effect_async(ctx, "done")
    return None


async def hang_async(ctx: AsyncJobContext) -> None:
    record("start", ctx)
    payload = ctx.payload
    if ctx.job.attempts in payload.get("hang_attempts", [1]):
        await asyncio.sleep(float(payload["hang_s"]))
        record("woke", ctx)
    await write_effect_async(ctx, "done")


if EXECUTOR == "asyncio":
    handlers.register("chaos")(chaos_async)
    handlers.register("hang")(hang_async)
else:
    handlers.register("chaos")(chaos)
    handlers.register("hang")(hang)
