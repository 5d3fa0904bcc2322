"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright) against a live ``memtree dashboard`` and a live ``memtree worker``, on every
engine. The counts move while jobs run without a reload, a retry click moves a failed job
back to ready, a cancel click cancels, and a script in a job's error is shown as text.

Set ``MEMTREE_SCREENSHOTS=DIR`` to save the pages as PNG (docs/dashboard*.png come from
this test). Without Chromium the tests skip; under ``CI=true`` they fail instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from memtree import FailureClass, JobFailure, JobStatus, NewJob, Queue

MEMTREE = Path(sys.executable).parent / "memtree"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TOKEN = "browser-test-token"
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
HANDLERS = """
import time

def slow(ctx):
    time.sleep(0.05)

handlers = {"slow": slow}
"""

pytestmark = pytest.mark.slow


def chromium_path() -> str:
    found = os.environ.get("MEMTREE_TEST_CHROMIUM") or shutil.which("chromium")
    if found is None:
        message = "no Chromium: apt-get install chromium (or set MEMTREE_TEST_CHROMIUM)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def started(command: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def stopped(process: subprocess.Popen[str]) -> str:
    process.terminate()
    try:
        out, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out


def wait_for_http(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the dashboard exited: {process.communicate()[0]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"the dashboard did not answer at {url}")


@pytest.fixture
def served(db_url: str, wall_queue: Queue, tmp_path: Path) -> Iterator[str]:
    """A live dashboard (with a token) and a worker of the ``slow`` kind on ``db_url``."""
    (tmp_path / "dash_handlers.py").write_text(HANDLERS)
    port = free_port()
    base = [str(MEMTREE), "--database-url", db_url]
    dashboard = started(
        [*base, "dashboard", "--port", str(port), "--token", TOKEN, "--refresh", "0.3"], tmp_path
    )
    worker = None
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/status", dashboard)
        worker = started(
            [*base, "worker", "--app", "dash_handlers:handlers", "--concurrency", "1"], tmp_path
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        if worker is not None:
            stopped(worker)
        stopped(dashboard)


def failed_for_good(queue: Queue) -> str:
    """A job of a kind no worker handles, failed with a hostile error."""
    job_id = queue.enqueue(NewJob("hostile", {"note": XSS}, max_attempts=1))
    job = queue.claim_next(kinds=["hostile"])
    assert job is not None and job.id == job_id
    assert queue.mark_failed(
        job, RuntimeError(XSS), JobFailure("bad_input", FailureClass.UNRECOVERABLE)
    )
    return job.id


def test_the_dashboard_in_a_browser(served: str, wall_queue: Queue) -> None:
    from playwright.sync_api import sync_playwright

    hostile = failed_for_good(wall_queue)
    parked = wall_queue.enqueue(NewJob("parked", {"why": "no worker handles it"}))
    assert parked is not None
    wall_queue.enqueue_many([NewJob("slow", {"n": i}) for i in range(60)])
    shots = os.environ.get("MEMTREE_SCREENSHOTS")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            dialogs: list[str] = []
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

            page.goto(f"{served}/login")
            page.fill("#token", TOKEN)
            page.click("#sign-in")
            page.wait_for_url(f"{served}/")

            # The counts move while the worker runs, with no reload.
            def done_count() -> int:
                return int(page.inner_text("#count-done"))

            seen = {done_count()}
            deadline = time.monotonic() + 60
            while len(seen) < 3 and time.monotonic() < deadline:
                page.wait_for_timeout(200)
                seen.add(done_count())
            assert len(seen) >= 3, f"the done count did not move: {seen}"
            assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
            if shots:
                page.wait_for_selector("#workers")
                page.screenshot(path=str(Path(shots) / "dashboard.png"), full_page=True)

            # A script in the error is text, and never runs.
            page.goto(f"{served}/jobs/{hostile}")
            assert page.inner_text("#last-error").count("<script>window.__xss=2</script>") == 1
            assert "<img src=x" in page.inner_text("#payload")
            assert page.evaluate("window.__xss") is None
            if shots:
                page.screenshot(path=str(Path(shots) / "dashboard-job.png"), full_page=True)

            # Retry moves the failed job back to ready.
            page.click("#retry")
            page.wait_for_selector("#notice")
            assert page.inner_text("#job-status") == "ready"
            assert wall_queue.get_job(hostile).status is JobStatus.READY  # type: ignore[union-attr]

            # Cancel cancels.
            page.goto(f"{served}/jobs/{parked}")
            page.click("#cancel")
            page.wait_for_selector("#notice")
            assert page.inner_text("#job-status") == "cancelled"
            assert wall_queue.get_job(parked).status is JobStatus.CANCELLED  # type: ignore[union-attr]
            assert dialogs == []
        finally:
            browser.close()
