"""``python -m benchmarks``: run the workloads, print the table, write JSON and the chart."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks import report
from benchmarks.dbs import Databases, mariadb_reachable, pg_reachable
from benchmarks.settings import (
    DRAIN_CONCURRENCY,
    FULL,
    HUEY_POLL_S,
    LATENCY_CONCURRENCY,
    MARIADB_ADMIN_URL,
    PG_ADMIN_URL,
    PGQUEUER_BATCH,
    PROCRASTINATE_CONCURRENCY,
    SMOKE,
    TX_CONCURRENCY,
)
from benchmarks.workloads import PEERS, RUNNERS, SYSTEMS, WORKLOADS, Figure, Run

DISTRIBUTIONS = (
    "memtree",
    "SQLAlchemy",
    "psycopg",
    "PyMySQL",
    "pgqueuer",
    "asyncpg",
    "procrastinate",
    "huey",
    "uvloop",
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="memtree against pgqueuer, procrastinate, huey and a raw-SQL floor.",
    )
    parser.add_argument("--smoke", action="store_true", help="every workload at a tiny size")
    parser.add_argument(
        "--only", nargs="+", choices=WORKLOADS, metavar="WORKLOAD", help=", ".join(WORKLOADS)
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=list(SYSTEMS),
        metavar="SYSTEM",
        help="run these systems only: " + ", ".join(SYSTEMS),
    )
    parser.add_argument("--json", type=Path, help="write every figure and ratio here")
    parser.add_argument("--chart", type=Path, help="render the PNG chart here")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DRAIN_CONCURRENCY,
        help=f"memtree worker concurrency = floor claim batch [default {DRAIN_CONCURRENCY}]",
    )
    parser.add_argument("--pg-url", default=PG_ADMIN_URL, help="the PostgreSQL server (admin)")
    parser.add_argument(
        "--mariadb-url", default=MARIADB_ADMIN_URL, help="the MariaDB server (admin)"
    )
    parser.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="run nothing: print the table and render --chart from a saved --json file",
    )
    return parser.parse_args(argv)


def replot(args: argparse.Namespace, console: Console) -> int:
    """The table and the chart again, from a saved run."""
    saved = json.loads(args.replot.read_text())
    figures = [
        Figure(f["workload"], f["case"], f["system"], f["metric"], f["value"], f["detail"])
        for f in saved["figures"]
    ]
    sizes = SMOKE if saved["meta"]["sizes"] == "smoke" else FULL
    rows = report.evaluate(figures, sizes)
    report.print_report(console, figures, rows)
    if args.chart:
        report.chart(args.chart, figures, {**saved["meta"], "checks": rows})
        console.log(f"wrote {args.chart}")
    if args.json:
        saved["checks"] = rows
        saved["markdown"] = {
            "checks": report.markdown(rows),
            "figures": report.figures_markdown(figures),
        }
        report.write_json(args.json, saved)
        console.log(f"wrote {args.json}")
    return 0


def _version(name: str) -> str | None:
    try:
        return dist_version(name)
    except PackageNotFoundError:
        return None


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        import psutil

        return round(float(psutil.virtual_memory().total) / 2**30, 1)
    except ImportError:
        return None


def _git() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "memtree"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (" (memtree/ modified)" if dirty else "")


def _pg_version(url: str) -> str | None:
    try:
        import psycopg

        from benchmarks.dbs import _libpq

        with psycopg.connect(_libpq(url), autocommit=True, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else None
    except Exception:
        return None


def _mariadb_version(url: str) -> str | None:
    try:
        from benchmarks.dbs import mariadb_raw

        with mariadb_raw(url, database=None, connect_timeout=3) as conn:
            row = conn.execute("SELECT VERSION()").fetchone()
            return str(row[0]) if row else None
    except Exception:
        return None


def machine(pg_url: str, mariadb_url: str | None = None) -> dict[str, Any]:
    return {
        "cpu": _cpu(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgresql": _pg_version(pg_url),
        "mariadb": _mariadb_version(mariadb_url) if mariadb_url else None,
        "sqlite": sqlite3.sqlite_version,
        "load_average": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console = Console(stderr=False, width=160)
    if args.replot:
        return replot(args, console)
    sizes = SMOKE if args.smoke else FULL
    workloads = list(args.only or WORKLOADS)
    wanted = list(args.systems or SYSTEMS)

    skipped: dict[str, str] = {}
    why_no_pg = pg_reachable(args.pg_url)
    why_no_mariadb: str | None = None
    if any(SYSTEMS[name].backend == "mariadb" for name in wanted):
        why_no_mariadb = mariadb_reachable(args.mariadb_url)
    systems: list[str] = []
    for name in wanted:
        spec = SYSTEMS[name]
        missing = _missing(spec.modules)
        if missing:
            skipped[name] = f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"
        elif spec.backend == "postgresql" and why_no_pg:
            skipped[name] = f"PostgreSQL not reachable at {args.pg_url}: {why_no_pg}"
        elif spec.backend == "mariadb" and why_no_mariadb:
            skipped[name] = f"MariaDB not reachable at {args.mariadb_url}: {why_no_mariadb}"
        else:
            systems.append(name)
    for name, reason in skipped.items():
        console.log(f"[yellow]skipping {name}:[/] {reason}")

    started = time.time()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta: dict[str, Any] = {
        "date": date,
        "sizes": sizes.name,
        "size_settings": sizes.__dict__,
        "workloads": workloads,
        "systems": systems,
        "skipped": skipped,
        "peers": list(PEERS),
        "machine": machine(args.pg_url, args.mariadb_url),
        "versions": {name: _version(name) for name in DISTRIBUTIONS},
        "git": _git(),
        "settings": {
            "memtree_drain_concurrency": args.concurrency,
            "floor_claim_batch": args.concurrency,
            "transactional_concurrency": TX_CONCURRENCY,
            "latency_concurrency": LATENCY_CONCURRENCY,
            "pgqueuer_batch_size": PGQUEUER_BATCH,
            "procrastinate_concurrency": PROCRASTINATE_CONCURRENCY,
            "huey_poll_s": HUEY_POLL_S,
            "sqlite_synchronous": "NORMAL (memtree, floor); OFF (huey fsync=False)",
            "mariadb_isolation": "READ COMMITTED (floor; memtree sets its own)",
        },
        "command": " ".join(
            ["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    console.log(
        f"memtree benchmarks ({sizes.name}): {', '.join(workloads)} on {', '.join(systems)}"
    )

    databases = Databases(
        args.pg_url,
        pg_available=why_no_pg is None,
        mariadb_url=args.mariadb_url,
        mariadb_available=why_no_mariadb is None,
    )
    run = Run(
        sizes=sizes,
        databases=databases,
        systems=systems,
        concurrency=args.concurrency,
        console=console,
    )
    try:
        for workload in workloads:
            console.rule(workload)
            RUNNERS[workload](run)
    except KeyboardInterrupt:
        console.log("[red]interrupted[/]")
        return 130
    finally:
        databases.close()
    meta["elapsed_s"] = round(time.time() - started, 1)
    meta["machine"]["load_average_end"] = list(os.getloadavg())

    rows = report.evaluate(run.figures, sizes)
    meta["checks"] = rows
    report.print_report(console, run.figures, rows)
    for error in run.errors:
        console.print(
            f"[red]error[/] {error['workload']} {error['case']} {error['system']}: {error['error']}"
        )
    console.log(f"done in {meta['elapsed_s']:.0f}s")

    payload = {
        "meta": {k: v for k, v in meta.items() if k != "checks"},
        "figures": [f.as_json() for f in run.figures],
        "checks": rows,
        "errors": run.errors,
        "markdown": {
            "checks": report.markdown(rows),
            "figures": report.figures_markdown(run.figures),
        },
    }
    if args.json:
        report.write_json(args.json, payload)
        console.log(f"wrote {args.json}")
    if args.chart:
        report.chart(args.chart, run.figures, meta)
        console.log(f"wrote {args.chart}")
    return 1 if run.errors else 0
