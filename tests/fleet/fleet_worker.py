"""A worker process of a fleet test: ``python -m tests.fleet.fleet_worker CONFIG_JSON``.

The config (JSON) names the database, this process's clock skew, its worker settings and
its gates and rate limits. ``skew_ms`` moves this process's wall clock (``time.time`` and
``time.time_ns``, as every library in it reads them) before memtree is imported, so the
process sees what a machine whose clock is off sees.

Every run records its claim, start and end in ``fleet_runs`` on a connection of its own
that commits at once (so a run whose process is SIGKILLed leaves its start behind), with
times read from the database's clock (on SQLite, the host's real clock).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

REAL_TIME_NS = time.time_ns


def _skew(skew_ms: int) -> None:
    if not skew_ms:
        return
    offset_ns = skew_ms * 1_000_000
    real_time = time.time
    time.time_ns = lambda: REAL_TIME_NS() + offset_ns
    time.time = lambda: real_time() + skew_ms / 1000


def main(config: dict[str, Any]) -> None:
    _skew(int(config.get("skew_ms", 0)))
    from sqlalchemy import create_engine

    import memtree
    from tests.fleet.fleet_app import Recorder, handlers_for, limits_from

    queue = memtree.Queue(config["url"], lock_duration_ms=int(config.get("lease_ms", 3000)))
    recorder = Recorder(create_engine(memtree.sync_url(config["url"])), REAL_TIME_NS)
    limits = limits_from(config)
    worker = memtree.Worker(
        queue,
        handlers_for(recorder, config),
        concurrency=int(config.get("concurrency", 4)),
        gates=[x for x in limits if isinstance(x, memtree.Gate)],
        rate_limits=[x for x in limits if isinstance(x, memtree.RateLimit)],
        poll_interval_s=float(config.get("poll_interval_s", 0.2)),
        recover_interval_s=float(config.get("recover_interval_s", 0.5)),
        shutdown_grace_s=float(config.get("grace_s", 5.0)),
        name=f"fleet-{os.getpid()}",
    )
    print("ready", flush=True)
    worker.run()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
