"""The FastAPI example (examples/fastapi_app.py), served by uvicorn in its own process and
driven over HTTP with httpx: every signup's job runs once, its email commits once, and
the lifespan stops the worker cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
from sqlalchemy import Engine, text

from memtree import JobStatus, Queue

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_fastapi_example_runs_every_signups_job_once(
    db_url: str, engine: Engine, tmp_path: Path
) -> None:
    port = free_port()
    log = (tmp_path / "uvicorn.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "MEMTREE_DATABASE_URL": db_url},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:  # until the lifespan has migrated and the server listens
                try:
                    client.get("/signups/0")
                    break
                except httpx.TransportError:
                    assert server.poll() is None, (tmp_path / "uvicorn.log").read_text()
                    assert time.monotonic() < deadline, "the example never started"
                    time.sleep(0.1)

            def sign_up(n: int) -> int:
                response = client.post("/signups", json={"email": f"user{n}@example.com"})
                assert response.status_code == 201, response.text
                return int(response.json()["id"])

            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(sign_up, range(40)))
            deadline = time.monotonic() + 60
            pending = set(ids)
            while pending and time.monotonic() < deadline:
                for signup_id in list(pending):
                    state = client.get(f"/signups/{signup_id}").json()
                    if state["welcomed"]:
                        assert state["emails"] == 1, state
                        pending.discard(signup_id)
                time.sleep(0.05)
            assert not pending, f"{len(pending)} signups were never welcomed"
            # The dashboard, mounted in the application, sees the welcomes and the worker.
            status = client.get("/ops/queue/api/status").json()
            assert status["counts"]["done"] == 40, status["counts"]
            assert [w["kinds"] for w in status["workers"]] == [["send_welcome"]]
            assert "mail" in {limit["name"] for limit in status["limits"]}
            page = client.get("/ops/queue/")
            assert page.status_code == 200 and 'href="/ops/queue/static/dashboard.css"' in page.text
            # The worker's welcomes spent the mail budget as they started; once the window
            # has passed, a burst of requests that send mail themselves gets exactly the
            # budget, the rest 429.
            time.sleep(2.2)
            with ThreadPoolExecutor(8) as pool:
                codes = list(
                    pool.map(
                        lambda n: client.post(f"/signups/{ids[n % 40]}/resend").status_code,
                        range(30),
                    )
                )
            assert sorted(codes) == [201] * 20 + [429] * 10, codes
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
        log.close()
    output = (tmp_path / "uvicorn.log").read_text()
    # uvicorn re-raises the SIGTERM it handled once its shutdown is complete.
    assert code in (0, -signal.SIGTERM), output
    assert "Application shutdown complete." in output, output
    assert "Traceback" not in output, output
    queue = Queue(engine)
    assert queue.count_by_status(JobStatus.DONE) == 40
    assert queue.count_total() == 40
    with engine.connect() as conn:
        emails = conn.execute(
            text("SELECT signup_id, count(*) FROM example_outbox GROUP BY signup_id")
        ).all()
    assert sorted(signup for signup, _ in emails) == sorted(ids)
    assert sum(count for _, count in emails) == 40 + 20  # the welcomes and 20 resends
    with engine.connect() as conn:
        welcomes = conn.execute(
            text(
                "SELECT signup_id, count(*) FROM example_outbox "
                "WHERE subject LIKE 'Welcome,%' GROUP BY signup_id"
            )
        ).all()
    assert sorted(signup for signup, _ in welcomes) == sorted(ids)
    assert {count for _, count in welcomes} == {1}
    with engine.connect() as conn:
        claims = sorted(conn.execute(text("SELECT started_at_ms FROM mem_tree_jobs")).scalars())
    # The welcome jobs started within the budget: at most 20 in any 2 s.
    assert all(sum(1 for c in claims if t <= c < t + 2000) <= 20 for t in claims), claims
    assert claims[-1] - claims[0] >= 2000  # 40 welcomes need at least two windows
