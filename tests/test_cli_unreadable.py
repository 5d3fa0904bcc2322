"""The CLI never prints a traceback: rows it cannot read, payloads too deep, settings that
cannot work, a metrics port it cannot bind and a SQLite file that is not there.

Each command runs through the real entry point in a subprocess.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from memtree import NewJob, Queue
from memtree.testing import FakeClock
from tests.test_reliability_inputs import APP, insert_raw, one_line_error, run_cli


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def refused_by_click(result: subprocess.CompletedProcess[str]) -> str:
    """A usage error: exit 2, click's usage hint and one ``Error:`` line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.stderr
    return last


@pytest.fixture
def sqlite_url(tmp_path: Path, clock: FakeClock) -> Iterator[str]:
    """A migrated SQLite file: foreign column types exist only there."""
    url = f"sqlite:///{tmp_path / 'foreign.db'}"
    queue = Queue(url, clock=clock)
    queue.migrate()
    queue.close()
    yield url


@pytest.mark.sqlite
def test_status_reports_rows_it_cannot_read_instead_of_crashing(sqlite_url: str) -> None:
    queue = Queue(sqlite_url)
    try:
        insert_raw(queue.engine, "job:soon", available_at_ms="soon")
        insert_raw(queue.engine, "job:blob-kind", kind=b"work")
        insert_raw(
            queue.engine, "job:text-lease", status="running", attempts=1, locked_until_ms="later"
        )
    finally:
        queue.close()
    report = run_cli("status", "--json", url=sqlite_url)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr
    data = json.loads(report.stdout)
    assert data["unreadable"] == 3
    assert data["by_kind"]["b'work'"] == {"ready": 1}
    assert data["running"][0]["lease_expires_in_ms"] is None
    rendered = run_cli("status", url=sqlite_url)
    assert rendered.returncode == 0 and "Traceback" not in rendered.stderr, rendered.stderr
    assert "rows memtree cannot read: 3" in rendered.stdout


@pytest.mark.sqlite
@pytest.mark.parametrize(
    ("columns", "problem"),
    [
        ({"payload_json": b"\x00\x01"}, "payload_json holds bytes"),
        ({"available_at_ms": "soon"}, "available_at_ms holds str 'soon'"),
        ({"attempts": 1.5}, "attempts holds float 1.5"),
    ],
    ids=["blob-payload", "text-due", "real-attempts"],
)
def test_jobs_show_prints_every_column_of_a_foreign_typed_row(
    sqlite_url: str, columns: dict[str, object], problem: str
) -> None:
    queue = Queue(sqlite_url)
    try:
        insert_raw(queue.engine, "job:foreign", **columns)
    finally:
        queue.close()
    shown = run_cli("jobs", "show", "job:foreign", url=sqlite_url)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "cannot read this row as a job" in shown.stdout and "created_at_ms" in shown.stdout
    data = json.loads(run_cli("jobs", "show", "job:foreign", "--json", url=sqlite_url).stdout)
    assert problem in data["unreadable"]
    assert data["created_at_ms"] == 0


@pytest.mark.parametrize(
    ("columns", "what"),
    [
        ({"payload_json": nested(5_000)}, "payload_error"),
        ({"payload_json": "{not json"}, "payload_error"),
        ({"status": "paused-by-another-program"}, "unreadable"),
    ],
    ids=["deep-payload", "not-json", "unknown-status"],
)
def test_jobs_show_and_list_print_what_they_can_of_a_row_they_cannot_read(
    db_url: str, wall_queue: Queue, columns: dict[str, object], what: str
) -> None:
    insert_raw(wall_queue.engine, "job:odd", **columns)
    wall_queue.enqueue(NewJob("work"))
    shown = run_cli("jobs", "show", "job:odd", url=db_url)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "job:odd" in shown.stdout
    data = json.loads(run_cli("jobs", "show", "job:odd", "--json", url=db_url).stdout)
    assert data[what]
    listed = run_cli("jobs", "list", "--json", url=db_url)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 2


def test_enqueue_of_a_payload_nested_3000_deep_is_refused(db_url: str, wall_queue: Queue) -> None:
    error = refused_by_click(run_cli("enqueue", "k", "--payload", nested(3_000), url=db_url))
    assert "nested more than 100 levels deep" in error
    assert wall_queue.count_total() == 0


@pytest.mark.parametrize(
    "option",
    [
        ("--lease", "0s"),
        ("--lease", "-1s"),
        ("--shutdown-grace", "-1"),
        ("--concurrency", "0"),
        ("--poll-interval", "0"),
        ("--metrics-port", "70000"),
        ("--metrics-port", "0"),
    ],
    ids=" ".join,
)
def test_worker_settings_that_cannot_work_are_refused(
    sqlite_url: str, option: tuple[str, str]
) -> None:
    """Refused before the worker starts, not silently replaced by the default (a worker
    that did start would outlive the timeout)."""
    error = refused_by_click(run_cli("worker", "--app", APP, *option, url=sqlite_url, timeout=20))
    assert option[0] in error


def test_a_metrics_port_already_in_use_is_one_line(sqlite_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("worker", "--app", APP, "--metrics-port", str(port), url=sqlite_url)
    error = one_line_error(result)
    assert f"cannot serve metrics on 127.0.0.1:{port}" in error


@pytest.mark.parametrize(
    "command",
    [
        ("status",),
        ("jobs", "list"),
        ("jobs", "show", "job:x"),
        ("recover",),
        ("enqueue", "k"),
        ("worker", "--app", APP),
    ],
    ids=" ".join,
)
def test_a_command_on_a_missing_sqlite_file_says_so_and_creates_nothing(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    path = tmp_path / "missing.db"
    error = one_line_error(run_cli(*command, url=f"sqlite:///{path}", timeout=20))
    assert f"the SQLite file {path} does not exist" in error
    assert list(tmp_path.iterdir()) == [], "no file was created"
