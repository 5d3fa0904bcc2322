"""The dashboard: a server-rendered web page of one queue, as an ASGI app.

:func:`create_app` builds a Starlette application over a :class:`~memtree.Queue`: the
overview (counts by kind and status, throughput and failures over the last hour, the
oldest due job, running jobs and their leases, fleet-wide limits and their holders,
workers, recent failures), one job's page (its row, payload, last error, the times it
went through, and :func:`memtree.explain`), retry and cancel buttons, and the database's
health (:func:`memtree.diagnose`, ``memtree doctor``'s findings) on demand. Sections refresh
in place with htmx; nothing needs a build step.

Its defences, because job payloads and errors are hostile input and the buttons change
jobs:

- Every value is rendered by Jinja2 with autoescaping, and a Content-Security-Policy
  allows scripts and styles from the app itself only, so markup in a payload or an
  error is text and a script in one cannot run.
- Read-only by default. Actions need ``token`` (an operator signs in with it once per
  browser, or sends it as ``Authorization: Bearer``), or ``actions=True`` for an app
  mounted behind the application's own authentication.
- Every form carries a CSRF token matched against a ``SameSite=Strict`` cookie, and a
  request whose ``Origin`` or ``Sec-Fetch-Site`` says it came from another site is
  refused.
- ``memtree dashboard`` binds to loopback unless told otherwise.

The data is :mod:`memtree.overview`'s and :mod:`memtree.explanation`'s: nothing here
builds a statement. Requests run the queue's blocking calls in Starlette's thread pool.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import parse_qs, quote

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from memtree import doctor, explanation, overview, store
from memtree.limits import Gate, RateLimit
from memtree.queue import Queue
from memtree.redact import scrub
from memtree.types import CancelOutcome, JobStatus

__all__ = ["DEFAULT_REFRESH_S", "create_app"]

#: Seconds between refreshes of the live sections.
DEFAULT_REFRESH_S = 3.0
#: Seconds between refreshes of the throughput chart (it reads every row finished in the
#: last hour).
CHART_REFRESH_S = 15.0
CSRF_COOKIE = "memtree_csrf"
SESSION_COOKIE = "memtree_session"
#: How much of a payload or an error a page shows.
SHOWN_BYTES = 20_000

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def create_app(
    queue: Queue,
    *,
    limits: Iterable[Gate | RateLimit] = (),
    token: str | None = None,
    actions: bool | None = None,
    refresh_s: float = DEFAULT_REFRESH_S,
    title: str | None = None,
) -> Starlette:
    """The dashboard of ``queue`` as an ASGI app, to serve or to mount.

    ``limits`` are the application's fleet-wide gates and rate limits (shown with their
    holders, and used by each job's explanation). Retry and cancel are offered when
    ``token`` is set (to an operator who signed in with it) or when ``actions`` is True
    (mounted behind the application's own authentication); otherwise the page is
    read-only. ``actions=False`` keeps it read-only even with a token.
    """
    if token is not None and (not isinstance(token, str) or len(token) < 8):
        raise ValueError("a dashboard token must be a string of at least 8 characters")
    if isinstance(refresh_s, bool) or not isinstance(refresh_s, int | float) or refresh_s <= 0:
        raise ValueError(f"refresh_s must be a number > 0, not {refresh_s!r}")
    dashboard = _Dashboard(
        queue,
        tuple(limits),
        token=token,
        actions=(token is not None) if actions is None else actions,
        refresh_s=float(refresh_s),
        title=title or queue.engine.url.render_as_string(hide_password=True),
    )
    return dashboard.app


def _pretty(value: Any) -> str:
    return scrub(json.dumps(value, indent=2, ensure_ascii=False), max_bytes=SHOWN_BYTES)


class _SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        return response


class _Dashboard:
    """The routes of one dashboard and what they share: the queue, the templates, the
    signing key of sessions."""

    def __init__(
        self,
        queue: Queue,
        limits: Sequence[Gate | RateLimit],
        *,
        token: str | None,
        actions: bool,
        refresh_s: float,
        title: str,
    ) -> None:
        self.queue = queue
        self.limits = limits
        self.token = token
        self.actions = actions
        self.refresh_s = refresh_s
        self.title = title
        # Sessions are signed with a key of this process: a restart signs everyone out.
        self._key = secrets.token_bytes(32)
        env = Environment(
            loader=PackageLoader("memtree.dashboard", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        env.filters["iso"] = overview.iso
        env.filters["ago"] = overview.ago
        env.filters["urlpart"] = lambda value: quote(str(value), safe="")
        self.env = env
        self.app = Starlette(
            routes=[
                Route("/", self.index),
                Route("/fragments/overview", self.overview_fragment),
                Route("/fragments/chart", self.chart_fragment),
                Route("/jobs/{job_id:path}/retry", self.retry, methods=["POST"]),
                Route("/jobs/{job_id:path}/cancel", self.cancel, methods=["POST"]),
                Route("/fragments/jobs/{job_id:path}", self.job_fragment),
                Route("/jobs/{job_id:path}", self.job_page),
                Route("/login", self.login, methods=["GET", "POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Route("/health", self.health),
                Route("/api/status", self.api_status),
                Route("/favicon.ico", lambda request: Response(status_code=204)),
                Route("/api/jobs/{job_id:path}", self.api_job),
                Mount("/static", StaticFiles(packages=[("memtree.dashboard", "static")])),
            ],
            middleware=[Middleware(_SecurityHeaders)],
        )

    # -- rendering -----------------------------------------------------------------

    def _render(
        self, request: Request, template: str, status_code: int = 200, **values: Any
    ) -> HTMLResponse:
        csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
        page = self.env.get_template(template).render(
            title=self.title,
            base=request.scope.get("root_path", "").rstrip("/"),
            refresh_s=self.refresh_s,
            chart_refresh_s=CHART_REFRESH_S,
            csrf=csrf,
            can_act=self._may_act(request),
            actions=self.actions,
            signed_in=self._signed_in(request),
            needs_login=self.actions and self.token is not None and not self._signed_in(request),
            **values,
        )
        response = HTMLResponse(page, status_code=status_code)
        if request.cookies.get(CSRF_COOKIE) != csrf:
            self._set_cookie(request, response, CSRF_COOKIE, csrf)
        return response

    def _set_cookie(self, request: Request, response: Response, name: str, value: str) -> None:
        response.set_cookie(
            name,
            value,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=request.scope.get("root_path", "") or "/",
        )

    def _overview(self) -> dict[str, Any]:
        url = self.queue.engine.url.render_as_string(hide_password=True)
        report = overview.status_report(self.queue, url, self.limits)
        report["failed_jobs"] = overview.failed_report(self.queue)
        statuses = [status.value for status in JobStatus]
        report["statuses"] = statuses
        report["kinds"] = sorted(report["by_kind"].items())
        return report

    def _chart(self) -> dict[str, Any]:
        data = overview.throughput_report(self.queue)
        buckets = data["buckets"]
        peak = max((b["done"] + b["failed"] for b in buckets), default=0)
        scale = 100 / peak if peak else 0.0
        bars = []
        for i, bucket in enumerate(buckets):
            done_h = bucket["done"] * scale
            failed_h = bucket["failed"] * scale
            bars.append(
                {
                    "x": i * 10,
                    "done_h": round(done_h, 2),
                    "failed_h": round(failed_h, 2),
                    "done_y": round(100 - done_h, 2),
                    "failed_y": round(100 - done_h - failed_h, 2),
                    "done": bucket["done"],
                    "failed": bucket["failed"],
                    "at": overview.iso(bucket["at_ms"]),
                }
            )
        return {
            "bars": bars,
            "peak": peak,
            "width": len(buckets) * 10,
            "done_total": sum(b["done"] for b in buckets),
            "failed_total": sum(b["failed"] for b in buckets),
            "bucket_s": data["bucket_ms"] // 1000,
        }

    def _job(self, job_id: str) -> dict[str, Any] | None:
        with self.queue.transaction() as conn:
            values = store.get_row(conn, job_id)
        if values is None:
            return None
        row = overview.row_dict(values)
        found = explanation.explain(self.queue, job_id, self.limits)
        payload = row.get("payload")
        error = row.get("last_error")
        times = [
            (label, row.get(column))
            for label, column in (
                ("enqueued", "created_at_ms"),
                ("due", "available_at_ms"),
                ("last attempt started", "started_at_ms"),
                ("cancel requested", "cancel_requested_at_ms"),
                ("lease until", "locked_until_ms"),
                ("finished", "completed_at_ms"),
            )
        ]
        return {
            "row": row,
            "fields": [
                (name, row.get(name))
                for name in (
                    "kind",
                    "status",
                    "attempts",
                    "max_attempts",
                    "dedupe_key",
                    "failure_class",
                    "failure_reason",
                    "heal_count",
                    "lease_token",
                )
            ],
            "history": [
                (label, value, overview.shown_ms(value))
                for label, value in times
                if value is not None
            ],
            "payload_text": _pretty(payload)
            if "payload_error" not in row
            else scrub(overview.text(row.get("payload_json")), max_bytes=SHOWN_BYTES),
            "payload_error": row.get("payload_error"),
            "error_text": None
            if error is None
            else scrub(overview.text(error), max_bytes=SHOWN_BYTES),
            "explanation": found,
            "retryable": row.get("status") in (JobStatus.FAILED.value, JobStatus.CANCELLED.value),
            "cancellable": row.get("status") in (JobStatus.READY.value, JobStatus.RUNNING.value),
        }

    # -- pages ---------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        report = await run_in_threadpool(self._overview)
        chart = await run_in_threadpool(self._chart)
        return self._render(request, "index.html", report=report, chart=chart)

    async def overview_fragment(self, request: Request) -> Response:
        report = await run_in_threadpool(self._overview)
        return self._render(request, "_overview.html", report=report)

    async def chart_fragment(self, request: Request) -> Response:
        chart = await run_in_threadpool(self._chart)
        return self._render(request, "_chart.html", chart=chart)

    async def job_page(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = await run_in_threadpool(self._job, job_id)
        if job is None:
            return self._render(request, "missing.html", status_code=404, job_id=job_id)
        notice = {"retried": "requeued", "cancelled": "cancelled", "requested": "asked to stop"}
        return self._render(
            request,
            "job.html",
            job=job,
            job_id=job_id,
            notice=notice.get(request.query_params.get("done", "")),
            problem=request.query_params.get("problem"),
        )

    async def job_fragment(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = await run_in_threadpool(self._job, job_id)
        if job is None:
            return self._render(request, "missing.html", status_code=404, job_id=job_id)
        return self._render(request, "_job.html", job=job, job_id=job_id)

    async def health(self, request: Request) -> Response:
        findings = await run_in_threadpool(doctor.diagnose, self.queue)
        order = sorted(findings, key=lambda f: -f.severity.rank)
        return self._render(
            request, "health.html", findings=order, worst=doctor.worst(findings).value
        )

    async def api_status(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self._overview))

    async def api_job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        found = await run_in_threadpool(explanation.explain, self.queue, job_id, self.limits)
        if found is None:
            return JSONResponse({"error": f"no job with id {job_id!r}"}, status_code=404)
        return JSONResponse(found.as_dict())

    # -- actions -------------------------------------------------------------------

    def _session_value(self) -> str:
        return hmac.new(self._key, b"memtree-dashboard-session", hashlib.sha256).hexdigest()

    def _signed_in(self, request: Request) -> bool:
        cookie = request.cookies.get(SESSION_COOKIE)
        return cookie is not None and hmac.compare_digest(cookie, self._session_value())

    def _bearer(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        return (
            self.token is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(value.strip().encode(), self.token.encode())
        )

    def _may_act(self, request: Request) -> bool:
        if not self.actions:
            return False
        return self.token is None or self._signed_in(request) or self._bearer(request)

    async def _form(self, request: Request) -> dict[str, str]:
        body = (await request.body())[:10_000].decode("utf-8", "replace")
        return {key: values[0] for key, values in parse_qs(body).items()}

    def _cross_site(self, request: Request) -> bool:
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return True
        origin = request.headers.get("origin")
        if origin is not None and origin != "null":
            host = request.headers.get("host", "")
            return origin.split("://", 1)[-1] != host
        return origin == "null"

    async def _checked(self, request: Request) -> Response | None:
        """A refusal of this POST, or None when it may go on."""
        if self._bearer(request) and self.actions:
            return None  # a script's credential, sent by no browser on its own: no CSRF
        if self._cross_site(request):
            return Response("cross-site request refused", status_code=403)
        form = await self._form(request)
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not cookie or not hmac.compare_digest(form.get("csrf", "").encode(), cookie.encode()):
            return Response("missing or wrong CSRF token: reload the page", status_code=403)
        if not self._may_act(request):
            return Response("this dashboard is read-only", status_code=403)
        return None

    def _back(self, request: Request, job_id: str, **query: str) -> Response:
        base = request.scope.get("root_path", "").rstrip("/")
        suffix = "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
        return RedirectResponse(
            f"{base}/jobs/{quote(job_id, safe='')}" + (f"?{suffix}" if suffix else ""),
            status_code=303,
        )

    async def retry(self, request: Request) -> Response:
        refused = await self._checked(request)
        if refused is not None:
            return refused
        job_id = request.path_params["job_id"]
        if await run_in_threadpool(self.queue.requeue_job, job_id):
            return self._back(request, job_id, done="retried")
        return self._back(
            request,
            job_id,
            problem="only a failed or cancelled job whose dedupe key is free can be retried",
        )

    async def cancel(self, request: Request) -> Response:
        refused = await self._checked(request)
        if refused is not None:
            return refused
        job_id = request.path_params["job_id"]
        outcome = await run_in_threadpool(self.queue.cancel, job_id)
        if outcome is CancelOutcome.CANCELLED:
            return self._back(request, job_id, done="cancelled")
        if outcome is CancelOutcome.REQUESTED:
            return self._back(request, job_id, done="requested")
        return self._back(request, job_id, problem="the job has already finished")

    async def login(self, request: Request) -> Response:
        if self.token is None or not self.actions:
            return RedirectResponse(request.scope.get("root_path", "") or "/", status_code=303)
        if request.method == "GET":
            return self._render(request, "login.html", failed=False)
        if self._cross_site(request):
            return Response("cross-site request refused", status_code=403)
        form = await self._form(request)
        cookie = request.cookies.get(CSRF_COOKIE, "")
        csrf_ok = bool(cookie) and hmac.compare_digest(
            form.get("csrf", "").encode(), cookie.encode()
        )
        if not csrf_ok or not hmac.compare_digest(
            form.get("token", "").encode(), self.token.encode()
        ):
            return self._render(request, "login.html", status_code=403, failed=True)
        response = RedirectResponse(request.scope.get("root_path", "") or "/", status_code=303)
        self._set_cookie(request, response, SESSION_COOKIE, self._session_value())
        return response

    async def logout(self, request: Request) -> Response:
        if self._cross_site(request):
            return Response("cross-site request refused", status_code=403)
        response = RedirectResponse(request.scope.get("root_path", "") or "/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=request.scope.get("root_path", "") or "/")
        return response
