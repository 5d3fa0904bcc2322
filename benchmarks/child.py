"""Entry point of a child process: ``python -m benchmarks.child ROLE SPEC_JSON``."""

from __future__ import annotations

import importlib
import json
import logging
import sys

ROLES: dict[str, str] = {
    "memtree-drain": "benchmarks.sys_memtree:drain_child",
    "memtree-fleet-drain": "benchmarks.sys_memtree:fleet_drain_child",
    "memtree-latency-worker": "benchmarks.sys_memtree:latency_worker_child",
    "memtree-latency-inprocess": "benchmarks.sys_memtree:latency_inprocess_child",
    "memtree-memory": "benchmarks.sys_memtree:memory_child",
    "floor-drain": "benchmarks.sys_floor:drain_child",
    "pgqueuer-drain": "benchmarks.sys_pgqueuer:drain_child",
    "pgqueuer-latency-worker": "benchmarks.sys_pgqueuer:latency_worker_child",
    "procrastinate-drain": "benchmarks.sys_procrastinate:drain_child",
    "procrastinate-latency-worker": "benchmarks.sys_procrastinate:latency_worker_child",
    "huey-drain": "benchmarks.sys_huey:drain_child",
    "huey-latency-worker": "benchmarks.sys_huey:latency_worker_child",
}


def main(argv: list[str]) -> None:
    role, spec = argv[0], json.loads(argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    module_name, function_name = ROLES[role].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    function(spec)


if __name__ == "__main__":
    main(sys.argv[1:])
