"""The benchmark harness at a tiny size, so that it cannot rot.

One ``python -m benchmarks --smoke --json ... --chart ...`` run in a subprocess, then
checks that every workload produced a positive figure for memtree on every database
(PostgreSQL, SQLite, MariaDB), for the raw-SQL floors and for each peer. Nothing here
asserts a speed: the figures of a smoke run mean nothing, and the full run is a manual
command (``docs/benchmarks.md``).

A peer is skipped, with the reason, only when its package is not importable; under
``CI=true`` the peers of the ``test`` extra must be there. The MariaDB systems are
skipped, with the reason, when the MariaDB server is not reachable (or PyMySQL is not
installed), except under ``CI=true``, where that fails, as PostgreSQL's absence does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.postgresql, pytest.mark.sqlite]

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_URL = os.environ.get("MEMTREE_TEST_PG_URL", "postgresql://root@127.0.0.1:5432/postgres")
MARIADB_URL = os.environ.get("MEMTREE_TEST_MYSQL_URL", "mariadb+pymysql://root@127.0.0.1:3306/")

WORKLOADS = ("enqueue", "drain", "fleet", "latency", "backlog", "memory")

#: What each system must have measured: workload -> cases.
EXPECTED: dict[str, dict[str, tuple[str, ...]]] = {
    "memtree": {
        "enqueue": ("single", "batched"),
        "drain": ("noop-1p", "noop-2p", "tx-1p"),
        "latency": ("p50", "p99"),
        "backlog": ("empty/worker", "empty/all-kinds", "done-1000/worker", "ready-1000/worker"),
        "memory": ("rss-first", "rss-last"),
    },
    "floor": {
        "enqueue": ("single", "batched"),
        "drain": ("noop-1p", "noop-2p", "tx-1p"),
        "backlog": ("empty/raw", "done-1000/raw", "ready-1000/raw"),
    },
    "pgqueuer": {
        "enqueue": ("single", "batched"),
        "drain": ("noop-1p", "noop-2p"),
        "latency": ("p50", "p99"),
    },
    "procrastinate": {
        "enqueue": ("single", "batched"),
        "drain": ("noop-1p",),
        "latency": ("p50", "p99"),
    },
    "huey": {"enqueue": ("single",), "drain": ("noop-1p",), "latency": ("p50", "p99")},
}

PEER_MODULES = {
    "pgqueuer": ("pgqueuer", "asyncpg"),
    "procrastinate": ("procrastinate",),
    "huey": ("huey",),
}


def _pg_problem() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _mariadb_problem() -> str | None:
    try:
        from benchmarks.dbs import mariadb_raw

        with mariadb_raw(MARIADB_URL, database=None, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="module")
def mariadb() -> None:
    """Skip a MariaDB system's test when the server is not there (fail under CI)."""
    problem = _mariadb_problem()
    if problem is not None:
        message = f"MariaDB is not reachable at {MARIADB_URL}: {problem}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true requires the MariaDB benchmark smoke run)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    problem = _pg_problem()
    if problem is not None:
        message = f"PostgreSQL is not reachable at {PG_URL}: {problem}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true requires the benchmark smoke run)")
        pytest.skip(message)
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "--smoke",
        "--json",
        str(out / "smoke.json"),
        "--chart",
        str(out / "smoke.png"),
        "--pg-url",
        PG_URL,
        "--mariadb-url",
        MARIADB_URL,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    payload: dict[str, Any] = json.loads((out / "smoke.json").read_text())
    payload["chart_bytes"] = (out / "smoke.png").stat().st_size
    return payload


def _figures(smoke: dict[str, Any], system: str) -> dict[tuple[str, str], float]:
    return {
        (f["workload"], f["case"]): f["value"] for f in smoke["figures"] if f["system"] == system
    }


def _check(smoke: dict[str, Any], system: str, expected: dict[str, tuple[str, ...]]) -> None:
    figures = _figures(smoke, system)
    for workload, cases in expected.items():
        for case in cases:
            value = figures.get((workload, case))
            assert value is not None, f"{system}: no {workload} figure for {case}"
            assert value > 0, f"{system}: {workload} {case} = {value}"


def test_the_run_is_clean_and_complete(smoke: dict[str, Any]) -> None:
    assert smoke["errors"] == []
    assert smoke["meta"]["sizes"] == "smoke"
    assert set(smoke["meta"]["workloads"]) == set(WORKLOADS)
    assert smoke["checks"], "no ratio was computed"
    assert "| workload |" in smoke["markdown"]["checks"]
    assert smoke["chart_bytes"] > 10_000


@pytest.mark.parametrize("system", ["memtree-pg", "memtree-sqlite"])
def test_memtree_has_every_workload(smoke: dict[str, Any], system: str) -> None:
    fleet = set() if system == "memtree-sqlite" else {"fleet"}  # the fleet is PostgreSQL's
    assert {f["workload"] for f in smoke["figures"] if f["system"] == system} == (
        set(WORKLOADS) - {"fleet"} | fleet
    )
    _check(smoke, system, EXPECTED["memtree"])


FLEET: dict[str, tuple[str, ...]] = {
    "memtree-pg": (
        "noop-1p",
        "noop-2p",
        "noop-4p",
        "gate64-4p",
        "keyed1000x1-4p",
        "keyed1000x4-4p",
    ),
    "floor-pg": ("noop-1p", "noop-2p", "noop-4p"),
}


@pytest.mark.parametrize("system", sorted(FLEET))
def test_the_fleet_workload(smoke: dict[str, Any], system: str) -> None:
    """Issue 13's PostgreSQL fleet: processes, a global gate, a keyed gate."""
    _check(smoke, system, {"fleet": FLEET[system]})


@pytest.mark.parametrize("system", ["floor-pg", "floor-sqlite"])
def test_the_raw_sql_floor(smoke: dict[str, Any], system: str) -> None:
    _check(smoke, system, EXPECTED["floor"])


#: Issue 14's MariaDB systems: no fleet (PostgreSQL's) and no latency workload.
MARIADB_WORKLOADS = {"enqueue", "drain", "backlog", "memory"}


@pytest.mark.mariadb
def test_memtree_on_mariadb(smoke: dict[str, Any], mariadb: None) -> None:
    system = "memtree-mariadb"
    assert system not in smoke["meta"]["skipped"], smoke["meta"]["skipped"][system]
    assert {f["workload"] for f in smoke["figures"] if f["system"] == system} == MARIADB_WORKLOADS
    expected = {w: cases for w, cases in EXPECTED["memtree"].items() if w in MARIADB_WORKLOADS}
    _check(smoke, system, expected)


@pytest.mark.mariadb
def test_the_raw_sql_floor_on_mariadb(smoke: dict[str, Any], mariadb: None) -> None:
    assert "floor-mariadb" not in smoke["meta"]["skipped"], smoke["meta"]["skipped"]
    _check(smoke, "floor-mariadb", EXPECTED["floor"])


@pytest.mark.parametrize("peer", ["pgqueuer", "procrastinate", "huey"])
def test_each_peer(smoke: dict[str, Any], peer: str) -> None:
    missing = [m for m in PEER_MODULES[peer] if importlib.util.find_spec(m) is None]
    if missing:
        reason = f"{peer} is not installed ({', '.join(missing)}): pip install -e '.[bench]'"
        if IN_CI:
            pytest.fail(f"{reason}; CI=true requires the peers of the test extra")
        pytest.skip(reason)
    _check(smoke, peer, EXPECTED[peer])
    if peer == "huey":
        _check(smoke, "huey-default", {"drain": ("noop-1p",)})


def test_every_ratio_was_computed(smoke: dict[str, Any]) -> None:
    """Every comparison with both figures present has a result (pass, FAIL or info)."""
    statuses = {row["status"] for row in smoke["checks"]}
    assert statuses <= {"pass", "FAIL", "info", "n/a"}
    skipped = set(smoke["meta"]["skipped"])  # e.g. the MariaDB systems, without a server
    missing = [
        row["label"]
        for row in smoke["checks"]
        if row["status"] == "n/a"
        and row["system"].startswith("memtree")
        and row["system"] not in skipped
        and row["other"] not in skipped
    ]
    installed = all(
        importlib.util.find_spec(m) is not None for mods in PEER_MODULES.values() for m in mods
    )
    if installed:
        assert missing == []


def test_the_sqlite_decomposition_measures_every_step(tmp_path: Path) -> None:
    """``python -m benchmarks.decompose`` at a tiny size: every step ran and did work."""
    out = tmp_path / "decompose.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.decompose",
        "--jobs",
        "600",
        "--transactions",
        "100",
        "--repeat",
        "1",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    rows = json.loads(out.read_text())
    assert [row["step"].split(".")[0] for row in rows] == [str(n) for n in range(1, 11)]
    assert {row["group"] for row in rows} == {"no-op drain", "commit per job", "single enqueue"}
    for row in rows:
        assert row["us_per_job"] > 0, row
