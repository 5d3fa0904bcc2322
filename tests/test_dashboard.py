"""The dashboard's pages, fragments, API and defences, through Starlette's test client, on
every engine (the browser tests are in tests/test_dashboard_browser.py)."""

from __future__ import annotations

import re

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

import memtree
from memtree.dashboard import create_app
from memtree.testing import FakeClock
from memtree.types import NewJob

TOKEN = "open-sesame-42"
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None, "no CSRF field on the page"
    return found.group(1)


def failed_job(queue: memtree.Queue, error: str = XSS) -> str:
    job_id = queue.enqueue(NewJob("hostile", {"to": XSS}, max_attempts=1))
    job = queue.claim_next(kinds=["hostile"])
    assert job is not None and job.id == job_id
    assert queue.mark_failed(job, RuntimeError(error))
    return job.id


def signed_in(queue: memtree.Queue, **options: object) -> TestClient:
    client = TestClient(create_app(queue, token=TOKEN, **options))  # type: ignore[arg-type]
    login = client.get("/login")
    response = client.post(
        "/login", data={"csrf": csrf_of(login.text), "token": TOKEN}, follow_redirects=False
    )
    assert response.status_code == 303
    return client


def test_the_overview_shows_counts_failures_and_the_chart(
    queue: memtree.Queue, clock: FakeClock
) -> None:
    queue.enqueue(NewJob("mail", {}))
    failed = failed_job(queue)
    client = TestClient(create_app(queue))
    page = client.get("/")
    assert page.status_code == 200
    assert re.search(r'id="count-ready">1<', page.text)
    assert re.search(r'id="count-failed">1<', page.text)
    assert re.search(r'id="failed-last-hour">1<', page.text)
    assert failed in page.text
    fragment = client.get("/fragments/overview")
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert re.search(r'id="count-failed">1<', fragment.text)
    status = client.get("/api/status").json()
    assert status["counts"]["failed"] == 1 and status["failed_jobs"][0]["id"] == failed


def test_hostile_payloads_and_errors_render_as_text(queue: memtree.Queue) -> None:
    job_id = failed_job(queue)
    client = TestClient(create_app(queue))
    for page in (client.get("/").text, client.get(f"/jobs/{job_id}").text):
        assert "<script>window.__xss" not in page
        assert "<img src=x" not in page
        assert "&lt;script&gt;window.__xss=2&lt;/script&gt;" in page
    headers = client.get("/").headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"


def test_a_job_page_shows_its_row_history_and_explanation(queue: memtree.Queue) -> None:
    job_id = queue.enqueue(NewJob("mail", {"to": "ada"}, dedupe_key="welcome"))
    assert job_id is not None
    client = TestClient(create_app(queue))
    page = client.get(f"/jobs/{job_id}")
    assert page.status_code == 200
    assert "no worker process is running" in page.text
    assert "enqueued" in page.text and "&#34;to&#34;: &#34;ada&#34;" in page.text
    assert client.get("/jobs/job:nope").status_code == 404
    assert client.get(f"/api/jobs/{job_id}").json()["reason"] == "no_worker"
    assert client.get("/api/jobs/job:nope").status_code == 404


def test_read_only_by_default(queue: memtree.Queue) -> None:
    job_id = failed_job(queue)
    client = TestClient(create_app(queue))
    page = client.get(f"/jobs/{job_id}")
    assert 'id="retry"' not in page.text and "read-only" in page.text
    refused = client.post(f"/jobs/{job_id}/retry", data={"csrf": client.cookies["memtree_csrf"]})
    assert refused.status_code == 403
    assert queue.get_job(job_id).status is memtree.JobStatus.FAILED  # type: ignore[union-attr]


def test_a_token_signs_an_operator_in_to_retry(queue: memtree.Queue) -> None:
    job_id = failed_job(queue)
    anonymous = TestClient(create_app(queue, token=TOKEN))
    assert 'id="retry"' not in anonymous.get(f"/jobs/{job_id}").text
    login = anonymous.get("/login")
    wrong = anonymous.post("/login", data={"csrf": csrf_of(login.text), "token": "guess-guess"})
    assert wrong.status_code == 403 and "wrong token" in wrong.text
    client = signed_in(queue)
    page = client.get(f"/jobs/{job_id}")
    assert 'id="retry"' in page.text
    done = client.post(
        f"/jobs/{job_id}/retry", data={"csrf": csrf_of(page.text)}, follow_redirects=False
    )
    assert done.status_code == 303 and done.headers["location"].endswith("?done=retried")
    assert queue.get_job(job_id).status is memtree.JobStatus.READY  # type: ignore[union-attr]
    # A job that cannot be retried says why.
    again = client.post(f"/jobs/{job_id}/retry", data={"csrf": csrf_of(page.text)})
    assert "can be retried" in again.text


def test_actions_need_the_csrf_token_and_the_same_site(queue: memtree.Queue) -> None:
    job_id = queue.enqueue(NewJob("mail", {}))
    assert job_id is not None
    client = signed_in(queue)
    csrf = csrf_of(client.get(f"/jobs/{job_id}").text)
    assert client.post(f"/jobs/{job_id}/cancel", data={}).status_code == 403
    assert client.post(f"/jobs/{job_id}/cancel", data={"csrf": "forged"}).status_code == 403
    cross = client.post(
        f"/jobs/{job_id}/cancel", data={"csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert cross.status_code == 403
    fetched = client.post(
        f"/jobs/{job_id}/cancel", data={"csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert fetched.status_code == 403
    assert queue.get_job(job_id).status is memtree.JobStatus.READY  # type: ignore[union-attr]
    ok = client.post(
        f"/jobs/{job_id}/cancel",
        data={"csrf": csrf},
        headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
        follow_redirects=False,
    )
    assert ok.status_code == 303 and ok.headers["location"].endswith("?done=cancelled")
    assert queue.get_job(job_id).status is memtree.JobStatus.CANCELLED  # type: ignore[union-attr]


def test_a_bearer_token_acts_without_a_browser_session(queue: memtree.Queue) -> None:
    queue.enqueue(NewJob("mail", {}))
    job = queue.claim_next()
    assert job is not None
    client = TestClient(create_app(queue, token=TOKEN))
    assert (
        client.post(
            f"/jobs/{job.id}/cancel", headers={"Authorization": "Bearer nope-nope"}
        ).status_code
        == 403
    )
    asked = client.post(
        f"/jobs/{job.id}/cancel",
        headers={"Authorization": f"Bearer {TOKEN}"},
        follow_redirects=False,
    )
    assert asked.status_code == 303 and asked.headers["location"].endswith("?done=requested")
    assert queue.get_job(job.id).cancel_requested_at_ms is not None  # type: ignore[union-attr]


def test_actions_false_keeps_a_token_dashboard_read_only(queue: memtree.Queue) -> None:
    job_id = failed_job(queue)
    client = TestClient(create_app(queue, token=TOKEN, actions=False))
    assert (
        client.post(
            f"/jobs/{job_id}/retry", headers={"Authorization": f"Bearer {TOKEN}"}
        ).status_code
        == 403
    )


def test_mounted_in_an_application_behind_its_own_auth(queue: memtree.Queue) -> None:
    job_id = failed_job(queue, "boom")
    host = Starlette(routes=[Mount("/ops/queue", app=create_app(queue, actions=True))])
    client = TestClient(host)
    page = client.get(f"/ops/queue/jobs/{job_id}")
    assert page.status_code == 200
    assert 'href="/ops/queue/static/dashboard.css"' in page.text
    assert f'action="/ops/queue/jobs/{job_id.replace(":", "%3A")}/retry"' in page.text
    assert client.get("/ops/queue/static/htmx.min.js").status_code == 200
    done = client.post(
        f"/ops/queue/jobs/{job_id}/retry", data={"csrf": csrf_of(page.text)}, follow_redirects=False
    )
    assert done.status_code == 303 and done.headers["location"].startswith("/ops/queue/jobs/")
    assert queue.get_job(job_id).status is memtree.JobStatus.READY  # type: ignore[union-attr]


def test_bad_options_are_refused_when_built(queue: memtree.Queue) -> None:
    with pytest.raises(ValueError, match="at least 8"):
        create_app(queue, token="short")
    with pytest.raises(ValueError, match="refresh_s"):
        create_app(queue, refresh_s=0)


def test_the_health_page_shows_the_doctors_findings(queue: memtree.Queue) -> None:
    client = TestClient(create_app(queue))
    page = client.get("/health")
    assert page.status_code == 200
    assert "schema_revision" in page.text and "at memtree_0007" in page.text
    with queue.engine.begin() as conn:
        conn.exec_driver_sql(
            "DROP INDEX ix_mem_tree_jobs_claim"
            + (" ON mem_tree_jobs" if queue.engine.dialect.name in ("mysql", "mariadb") else "")
        )
    page = client.get("/health")
    assert re.search(
        r'class="critical">\s*<td><span class="status critical">critical</span></td>'
        r"<td>missing_indexes",
        page.text,
    ), page.text
    assert 'id="worst">critical<' in page.text
