"""Prometheus metrics for workers (``pip install memtree[metrics]``).

Counters and histograms are updated by the worker as jobs move; the gauges of jobs by
status are read from the database on each scrape, so every worker reports the whole
queue, not just its own share. Nothing here runs unless a ``Metrics`` is given to a
:class:`memtree.worker.Worker` (``memtree worker --metrics-port``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from memtree.errors import ConfigurationError
from memtree.types import Job, JobStatus

if TYPE_CHECKING:
    from memtree.queue import Queue

__all__ = ["Metrics", "QueueCollector", "serve"]

_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600)


class Metrics:
    """What one worker counts: jobs claimed and settled by kind, waiting and running time."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(f"memtree_jobs_{name}", doc, ["kind"], registry=registry)

        self.claimed = counter("claimed", "Jobs claimed by this worker.")
        self.done = counter("done", "Jobs this worker settled done.")
        self.failed = counter("failed", "Failed runs (retried or final) settled by this worker.")
        self.deferred = counter("deferred", "Runs this worker settled deferred.")
        self.released = counter(
            "released",
            "Runs this worker released after an infrastructure error, attempt given back.",
        )
        self.cancelled = counter("cancelled", "Runs that ended cancelled in this worker.")
        self.lost = counter("lease_lost", "Runs whose lease was lost before they settled.")
        self.recovered = Counter(
            "memtree_jobs_recovered",
            "Expired leases this worker's maintenance recovered.",
            registry=registry,
        )
        self.waiting = Histogram(
            "memtree_job_wait_seconds",
            "Time from due to claimed.",
            ["kind"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.running = Histogram(
            "memtree_job_run_seconds",
            "Time a handler ran.",
            ["kind"],
            buckets=_SECONDS,
            registry=registry,
        )

    def on_claimed(self, job: Job, now_ms: int) -> None:
        self.claimed.labels(job.kind).inc()
        self.waiting.labels(job.kind).observe(max(now_ms - job.available_at_ms, 0) / 1000)

    def on_finished(self, job: Job, outcome: str, duration_s: float) -> None:
        """``outcome`` is done, failed, deferred, released, cancelled or lease_lost."""
        counter = {
            "done": self.done,
            "failed": self.failed,
            "deferred": self.deferred,
            "released": self.released,
            "cancelled": self.cancelled,
            "lease_lost": self.lost,
        }[outcome]
        counter.labels(job.kind).inc()
        self.running.labels(job.kind).observe(duration_s)


class QueueCollector(Collector):
    """``memtree_jobs{status, kind}``: the queue's rows, counted at scrape time."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[Any]:
        gauge = GaugeMetricFamily(
            "memtree_jobs", "Jobs in the queue by status and kind.", labels=["status", "kind"]
        )
        counts = self.queue.count_by_kind_and_status()
        present = {status for _, status in counts}
        for missing in JobStatus:
            if missing.value not in present:
                gauge.add_metric([missing.value, ""], 0)
        for (kind, status), count in sorted(counts.items()):
            gauge.add_metric([status, kind], count)
        yield gauge

    def describe(self) -> Iterator[Any]:
        return iter(())


def serve(queue: Queue, port: int, addr: str = "127.0.0.1") -> Metrics:
    """Expose this process's metrics over HTTP on ``addr:port``; returns the worker's Metrics.

    A port that cannot be bound (in use, out of range) is a :class:`ConfigurationError`."""
    try:
        start_http_server(port, addr=addr)
    except (OSError, OverflowError) as exc:  # in use, not permitted, out of range, bad host
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigurationError(f"cannot serve metrics on {addr}:{port}: {reason}") from None
    metrics = Metrics()
    REGISTRY.register(QueueCollector(queue))
    return metrics
