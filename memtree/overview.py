"""What an operator sees of a queue, as plain data: the status report (counts by kind
and status, the oldest due job, running leases, fleet-wide limits and their holders,
schedules, workers), rows as JSON can hold them, failed jobs, throughput over time.

``memtree status`` renders these for a terminal and the dashboard for a browser; both
also print them as JSON. Nothing here builds a statement (the reads are
:mod:`memtree.store`'s) or formats for a medium: values are JSON-ready.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from memtree import store
from memtree.limits import Gate, RateLimit
from memtree.queue import Queue
from memtree.redact import scrub
from memtree.types import JobStatus, decode_payload

__all__ = [
    "ago",
    "failed_report",
    "iso",
    "limits_report",
    "list_rows",
    "plain",
    "row_dict",
    "shown_ms",
    "status_report",
    "text",
    "throughput_report",
    "workers_report",
]


def iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return str(ms)


def shown_ms(value: Any) -> str:
    """A time column's value: an ISO time for an integer, the repr of anything else."""
    if value is None:
        return "-"
    return iso(value) if type(value) is int else repr(value)


def ago(ms: int) -> str:
    seconds = abs(ms) / 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def plain(value: Any) -> Any:
    """A column's value as JSON can hold it: a value of a type memtree never writes (a BLOB,
    a fraction, an infinity another program left) by its repr."""
    if value is None or type(value) in (str, int):
        return value
    if type(value) is float and math.isfinite(value):
        return value
    return repr(value)


def text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def row_dict(values: tuple[Any, ...]) -> dict[str, Any]:
    """Every column of a row, readable or not, its parsed payload, and what could not be read:
    ``payload_error`` when the payload does not parse, ``unreadable`` when no job can be
    built from the row."""
    data = {name: plain(value) for name, value in zip(store.JOB_COLUMNS, values, strict=True)}
    try:
        data["payload"] = decode_payload(values[store.JOB_COLUMNS.index("payload_json")])
    except ValueError as exc:
        data["payload"] = None
        data["payload_error"] = str(exc)
    problem = store.unreadable_reason(values)
    if problem is not None:
        data["unreadable"] = problem
    return data


def list_rows(
    queue: Queue, *, status: JobStatus | None = None, kind: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    with queue.transaction() as conn:
        rows = store.list_rows(conn, status=status, kind=kind, limit=limit)
    return [row_dict(values) for values in rows]


def limits_report(queue: Queue, limits: Sequence[Gate | RateLimit]) -> list[dict[str, Any]]:
    """Each fleet-wide limit's use now: per key, what is used and left, and the running
    jobs holding a global gate's permits."""
    report = []
    for limit in limits:
        if isinstance(limit, Gate) and not limit.is_global:
            continue
        state = queue.limit_state(limit)
        is_gate = isinstance(limit, Gate)
        report.append(
            {
                "name": limit.name,
                "type": "gate" if is_gate else "rate limit",
                "limit": limit.limit,
                "window_s": None if isinstance(limit, Gate) else limit.window_s,
                "key": limit.key,
                "kinds": list(limit.kinds),
                "used": state.used,
                "remaining": {key: limit.limit - used for key, used in state.used.items()}
                if state.used
                else {"": limit.limit},
                "holders": [
                    {
                        "id": job.id,
                        "kind": job.kind,
                        "lease_expires_in_ms": (job.locked_until_ms or 0) - state.now_ms,
                    }
                    for job in state.holders
                ],
            }
        )
    return report


def status_report(
    queue: Queue, url: str, limits: Sequence[Gate | RateLimit] = ()
) -> dict[str, Any]:
    now = queue.now_ms()
    by_kind: dict[str, dict[str, int]] = {}
    totals = {status.value: 0 for status in JobStatus}
    for (kind, status), count in queue.count_by_kind_and_status().items():
        by_kind.setdefault(kind, {})[status] = count
        totals[status] = totals.get(status, 0) + count
    due = queue.next_due_ms()
    running = []
    for row in list_rows(queue, status=JobStatus.RUNNING, limit=50):
        until = row["locked_until_ms"]
        running.append(
            {
                "id": text(row["id"]),
                "kind": text(row["kind"]),
                "attempts": row["attempts"],
                "locked_until_ms": until,
                "lease_expires_in_ms": until - now if type(until) is int else None,
                "cancel_requested": row["cancel_requested_at_ms"] is not None,
            }
        )
    with queue.transaction() as conn:
        unreadable = store.count_unreadable(conn)
        schedules = [
            {
                "name": name,
                "last_slot": iso(last_slot_ms),
                "last_slot_ms": last_slot_ms,
                "updated_at": iso(updated_at_ms),
                "updated_at_ms": updated_at_ms,
            }
            for name, last_slot_ms, updated_at_ms in store.list_schedules(conn)
        ]
    return {
        "database": url,
        "now_ms": now,
        "counts": totals,
        "by_kind": by_kind,
        "oldest_due_age_ms": None if due is None or due > now else now - due,
        "next_due_in_ms": None if due is None or due <= now else due - now,
        "running": running,
        "failed_unrecoverable": queue.count_failed_unrecoverable(),
        "retired": queue.count_retired(),
        "unreadable": unreadable,
        "schedules": schedules,
        "limits": limits_report(queue, limits),
        "workers": workers_report(queue, now),
    }


def workers_report(queue: Queue, now_ms: int) -> list[dict[str, Any]]:
    """Every worker process's row: what it handles, when it was last seen, whether alive."""
    return [
        {
            "id": worker.id,
            "name": worker.name,
            "kinds": list(worker.kinds),
            "concurrency": worker.concurrency,
            "version": worker.version,
            "started_at_ms": worker.started_at_ms,
            "seen_at_ms": worker.seen_at_ms,
            "seen_ago_ms": now_ms - worker.seen_at_ms,
            "alive": worker.alive(now_ms),
        }
        for worker in queue.list_workers()
    ]


def failed_report(queue: Queue, limit: int = 20) -> list[dict[str, Any]]:
    """The most recently failed jobs, their last error scrubbed of secrets."""
    with queue.transaction() as conn:
        failed = store.list_failed(conn, limit)
    return [
        {
            "id": job.id,
            "kind": job.kind,
            "attempts": job.attempts,
            "max_attempts": job.max_attempts,
            "failure_class": job.failure_class,
            "failure_reason": job.failure_reason,
            "completed_at_ms": job.completed_at_ms,
            "last_error": None if job.last_error is None else scrub(job.last_error, max_bytes=500),
        }
        for job in failed
    ]


def throughput_report(
    queue: Queue, *, window_ms: int = 60 * 60 * 1000, bucket_ms: int = 60 * 1000
) -> dict[str, Any]:
    """Jobs done and failed in the last ``window_ms``, per ``bucket_ms`` (oldest first)."""
    now = queue.now_ms()
    count = max(1, -(-window_ms // bucket_ms))
    # Buckets on whole multiples of bucket_ms, the last one holding now.
    since = (now // bucket_ms - count + 1) * bucket_ms
    with queue.transaction() as conn:
        rows = store.completions(conn, since_ms=since, bucket_ms=bucket_ms)
    buckets = [{"at_ms": since + i * bucket_ms, "done": 0, "failed": 0} for i in range(count)]
    for index, status, n in rows:
        if 0 <= index < count:
            buckets[index][status] = n
    return {"now_ms": now, "since_ms": since, "bucket_ms": bucket_ms, "buckets": buckets}
