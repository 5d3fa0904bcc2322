"""The operations commands through the real ``memtree`` entry point, on every database."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from memtree import JobFailure, JobStatus, NewJob, Queue
from tests.test_cli import run

MEMTREE = Path(sys.executable).parent / "memtree"


@pytest.fixture
def migrated(db_url: str, wall_queue: Queue) -> str:
    return db_url


def ok(*args: str, url: str) -> str:
    result = run(*args, url=url)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def fails(*args: str, url: str) -> str:
    result = run(*args, url=url)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    # One error line (a usage error also gets click's two-line usage hint above it).
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and len(lines) in (1, 4), result.stderr
    return result.stderr


def test_enqueue_then_status_list_show(migrated: str, wall_queue: Queue) -> None:
    job_id = ok("enqueue", "hello", "--payload", '{"to": "ada"}', "--dedupe-key", "k", url=migrated)
    assert job_id.strip().startswith("job:")
    assert "suppressed" in ok("enqueue", "hello", "--dedupe-key", "k", url=migrated)
    ok("enqueue", "later", "--delay", "1h", url=migrated)
    ok("enqueue", "dated", "--at", "2001-01-01T00:00:00", "--max-attempts", "2", url=migrated)

    report = json.loads(ok("status", "--json", url=migrated))
    assert report["counts"]["ready"] == 3
    assert report["by_kind"]["hello"] == {"ready": 1}
    assert report["oldest_due_age_ms"] > 0, "the 2001 job has waited long"
    assert "hunter" not in report["database"]
    assert "hello" in ok("status", url=migrated)

    listed = json.loads(ok("jobs", "list", "--kind", "hello", "--json", url=migrated))
    assert [job["id"] for job in listed] == [job_id.strip()]
    shown = json.loads(ok("jobs", "show", job_id.strip(), "--json", url=migrated))
    assert shown["payload"] == {"to": "ada"} and shown["status"] == "ready"
    human = ok("jobs", "show", job_id.strip(), url=migrated)
    assert '"to": "ada"' in human
    dated = wall_queue.list_jobs(kind="dated")[0]
    assert dated.available_at_ms == 978_307_200_000 and dated.max_attempts == 2


def test_status_lists_running_leases_and_unrecoverable_failures(
    migrated: str, wall_queue: Queue
) -> None:
    wall_queue.enqueue_many([NewJob("run"), NewJob("bad", max_attempts=1)])
    running = wall_queue.claim_next(kinds=["run"])
    bad = wall_queue.claim_next(kinds=["bad"])
    assert running is not None and bad is not None
    wall_queue.mark_failed(bad, "x", JobFailure.unrecoverable("nope"))
    report = json.loads(ok("status", "--json", url=migrated))
    assert [job["id"] for job in report["running"]] == [running.id]
    assert report["running"][0]["lease_expires_in_ms"] > 0
    assert report["failed_unrecoverable"] == 1
    assert "expires in" in ok("status", url=migrated)


def test_retry_cancel_prune_recover_and_purge(migrated: str, wall_queue: Queue) -> None:
    failed_id = wall_queue.enqueue(NewJob("f", max_attempts=1))
    claimed = wall_queue.claim_next()
    assert claimed is not None and wall_queue.mark_failed(claimed, "boom")
    assert "requeued" in ok("jobs", "retry", failed_id or "", url=migrated)
    assert wall_queue.get_job(failed_id or "").status is JobStatus.READY  # type: ignore[union-attr]

    assert "cancelled" in ok("jobs", "cancel", failed_id or "", url=migrated)
    assert "already finished: it is cancelled" in fails(
        "jobs", "cancel", failed_id or "", url=migrated
    )
    assert "requeued 0 jobs" in ok("jobs", "retry", "--failed", url=migrated)
    assert "requeued 0 jobs" in ok("jobs", "retry", "--transient-only", url=migrated)

    running_id = wall_queue.enqueue(NewJob("r"))
    assert wall_queue.claim_next(kinds=["r"], lock_duration_ms=-1) is not None
    assert "asked" in ok("jobs", "cancel", running_id or "", url=migrated)
    assert "recovered 1 jobs" in ok("recover", url=migrated)
    assert wall_queue.get_job(running_id or "").status is JobStatus.CANCELLED  # type: ignore[union-attr]

    done = wall_queue.enqueue(NewJob("d"))
    job = wall_queue.claim_next(kinds=["d"])
    assert job is not None and wall_queue.mark_done(job)
    assert "pruned 0 done" in ok("jobs", "prune", "--older-than", "7d", url=migrated)
    assert "pruned 1 done" in ok("jobs", "prune", "--older-than", "0s", url=migrated)
    assert wall_queue.get_job(done or "") is None
    assert "pruned 2 cancelled" in ok(
        "jobs", "prune", "--older-than", "0s", "--status", "cancelled", "--batch", "1", url=migrated
    )
    assert "purged 0 retired" in ok("jobs", "purge-retired", url=migrated)


def test_error_paths_are_one_line(migrated: str, tmp_path: Path) -> None:
    assert "no job with id" in fails("jobs", "show", "job:nope", url=migrated)
    assert "no job with id" in fails("jobs", "cancel", "job:nope", url=migrated)
    assert "no job with id" in fails("jobs", "retry", "job:nope", url=migrated)
    assert "give one of" in fails("jobs", "retry", url=migrated)
    assert "not JSON" in fails("enqueue", "k", "--payload", "{nope", url=migrated)
    assert "retired" in fails("enqueue", "topic_route", url=migrated)
    assert "duration" in fails("jobs", "prune", "--older-than", "soon", url=migrated)
    assert "ISO 8601" in fails("enqueue", "k", "--at", "tuesday", url=migrated)
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert "memtree db upgrade" in fails("status", url=empty)
    assert "memtree db upgrade" in fails("jobs", "list", url=empty)
    wrong = "postgresql://root:sekrit@127.0.0.1:1/db"
    stderr = fails("status", url=wrong)
    assert "sekrit" not in stderr and "database error" in stderr


def test_help_on_every_operations_command() -> None:
    for args in (
        ["status"],
        ["enqueue"],
        ["jobs"],
        ["jobs", "list"],
        ["jobs", "show"],
        ["jobs", "retry"],
        ["jobs", "cancel"],
        ["jobs", "prune"],
        ["jobs", "purge-retired"],
        ["recover"],
        ["worker"],
        ["demo"],
    ):
        result = run(*args, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout, args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_worker_exposes_metrics_that_count(
    migrated: str, wall_queue: Queue, tmp_path: Path
) -> None:
    (tmp_path / "metrics_app.py").write_text("handlers = {'tick': lambda ctx: None}\n")
    wall_queue.enqueue_many([NewJob("tick", i) for i in range(3)])
    port = free_port()
    process = subprocess.Popen(
        [
            str(MEMTREE),
            "--database-url",
            migrated,
            "worker",
            "--app",
            "metrics_app:handlers",
            "--metrics-port",
            str(port),
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        body = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    body = r.read().decode()
                if 'memtree_jobs_done_total{kind="tick"} 3.0' in body:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert 'memtree_jobs_done_total{kind="tick"} 3.0' in body
        assert 'memtree_jobs{kind="tick",status="done"} 3.0' in body
        assert "memtree_job_run_seconds_bucket" in body
    finally:
        process.terminate()
        process.communicate(timeout=60)


def test_worker_reports_a_handler_module_that_cannot_be_imported(
    migrated: str, tmp_path: Path
) -> None:
    (tmp_path / "broken_app.py").write_text("import not_a_module_anywhere\n")
    result = subprocess.run(
        [str(MEMTREE), "--database-url", migrated, "worker", "--app", "broken_app:handlers"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot import 'broken_app'" in result.stderr
    assert "not_a_module_anywhere" in result.stderr
    assert "no attribute" in fails("worker", "--app", "json:nothing_here", url=migrated)
    assert "not a mapping" in fails("worker", "--app", "json:__name__", url=migrated)


def _interruptible() -> None:
    # A shell runs background commands with SIGINT ignored, and a Python started that way
    # keeps ignoring it: give the child the default, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_status_watch_refreshes_until_interrupted(migrated: str, wall_queue: Queue) -> None:
    wall_queue.enqueue(NewJob("watched"))
    process = subprocess.Popen(
        [str(MEMTREE), "--database-url", migrated, "status", "--watch", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_interruptible,
    )
    try:
        time.sleep(2.0)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "watched" in stdout and "Traceback" not in stderr


def test_explain_prints_why_a_job_waits(migrated: str, wall_queue: Queue) -> None:
    job_id = ok("enqueue", "hello", "--delay", "1h", "--dedupe-key", "k", url=migrated).strip()
    text = ok("explain", job_id, url=migrated)
    assert "scheduled for later" in text and "dedupe key 'k'" in text
    data = json.loads(ok("explain", job_id, "--json", url=migrated))
    assert data["reason"] == "scheduled" and 3_500_000 < data["facts"]["due_in_ms"] <= 3_600_000
    wall_queue.enqueue(NewJob("hello", {"x": "<b>[red]markup"}))
    (due,) = [j for j in wall_queue.list_jobs() if j.available_at_ms <= wall_queue.now_ms()]
    data = json.loads(ok("explain", due.id, "--json", url=migrated))
    assert data["reason"] == "no_worker"
    assert "no job with id 'job:nope'" in fails("explain", "job:nope", url=migrated)
    shown = json.loads(ok("jobs", "show", job_id, "--json", url=migrated))
    assert shown["explanation"]["reason"] == "scheduled"
    assert "scheduled for later" in ok("jobs", "show", job_id, url=migrated)
    assert json.loads(ok("status", "--json", url=migrated))["workers"] == []
