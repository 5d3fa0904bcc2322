"""memtree's benchmark harness: memtree against its peers and the database's own floor.

Run it with ``python -m benchmarks [--smoke] [--only WORKLOAD ...] [--json out.json]
[--chart docs/benchmarks.png]``; see ``docs/benchmarks.md`` for the method and the figures.
"""
