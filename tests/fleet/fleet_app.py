"""The handlers of the fleet tests and the record they leave.

Each run inserts its row into ``fleet_runs`` when it starts (claim time from the job,
start time from the database's clock, pid, the partition key from the payload) and sets
its end when it returns, each on its own committed connection. A run SIGKILLed mid-way
leaves a row with no end: the test ends it at the moment it killed that process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import BigInteger, Column, Engine, Integer, MetaData, Table, Text, insert, text
from sqlalchemy import update as sa_update

import memtree
from memtree import JobContext

metadata = MetaData()

runs = Table(
    "fleet_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("partition_key", Text),
    Column("attempt", Integer, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("claim_ms", BigInteger),
    Column("start_ms", BigInteger, nullable=False),
    Column("end_ms", BigInteger),
)


#: The server's clock in epoch ms, read the test's own way (not memtree's), per database.
DATABASE_CLOCKS = {
    "postgresql": "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint",
    "mysql": "SELECT CAST(UNIX_TIMESTAMP(SYSDATE(3)) * 1000 AS SIGNED)",
    "mariadb": "SELECT CAST(UNIX_TIMESTAMP(SYSDATE(3)) * 1000 AS SIGNED)",
}


class Recorder:
    """Writes ``fleet_runs`` rows on the database's clock, each in its own transaction."""

    def __init__(self, engine: Engine, real_time_ns: Callable[[], int]) -> None:
        self.engine = engine
        self._real_time_ns = real_time_ns
        self._clock = DATABASE_CLOCKS.get(engine.dialect.name)

    def now_ms(self, conn: Any) -> int:
        if self._clock is not None:
            return int(conn.execute(text(self._clock)).scalar_one())
        return self._real_time_ns() // 1_000_000

    def start(self, ctx: JobContext, key: str | None) -> int:
        with self.engine.begin() as conn:
            row = conn.execute(
                insert(runs)
                .values(
                    job_id=ctx.job.id,
                    kind=ctx.job.kind,
                    partition_key=key,
                    attempt=ctx.job.attempts,
                    pid=os.getpid(),
                    claim_ms=ctx.job.started_at_ms,
                    start_ms=self.now_ms(conn),
                )
                .returning(runs.c.id)
            ).scalar_one()
        return int(row)

    def end(self, run_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa_update(runs).where(runs.c.id == run_id).values(end_ms=self.now_ms(conn))
            )


def handlers_for(recorder: Recorder, config: dict[str, Any]) -> dict[str, Any]:
    """One handler per kind in ``config["kinds"]`` (kind -> seconds it works)."""

    def handler_of(seconds: float) -> Callable[[JobContext], None]:
        def handle(ctx: JobContext) -> None:
            payload = ctx.payload if isinstance(ctx.payload, dict) else {}
            key = payload.get("key")
            run_id = recorder.start(ctx, None if key is None else str(key))
            time.sleep(float(payload.get("seconds", seconds)))
            recorder.end(run_id)

        return handle

    return {kind: handler_of(float(s)) for kind, s in config.get("kinds", {"work": 0}).items()}


def limits_from(config: dict[str, Any]) -> list[Any]:
    """The gates and rate limits the config describes (memtree's own spelling, as kwargs)."""
    made: list[Any] = []
    for spec in config.get("gates", ()):
        made.append(memtree.Gate(**spec))
    for spec in config.get("rate_limits", ()):
        made.append(memtree.RateLimit(**spec))
    return made
