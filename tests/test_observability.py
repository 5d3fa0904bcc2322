"""Metrics that count and spans that trace, from a real worker run."""

from __future__ import annotations

import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from memtree import JobFailure, NewJob, Queue
from memtree.metrics import Metrics, QueueCollector
from memtree.worker import Defer, Handlers, JobContext, Worker


def handlers() -> Handlers:
    registry = Handlers()
    registry.register("ok")(lambda ctx: None)
    registry.register("later")(lambda ctx: Defer(delay_ms=60_000))

    @registry.register("bad")
    def bad(ctx: JobContext) -> None:
        raise JobFailure.unrecoverable("nope")

    return registry


def test_metrics_count_claims_outcomes_and_the_queue(wall_queue: Queue) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    registry.register(QueueCollector(wall_queue))
    wall_queue.enqueue_many([NewJob("ok", i) for i in range(3)] + [NewJob("later"), NewJob("bad")])
    Worker(wall_queue, handlers(), metrics=metrics).run_until_idle()

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("memtree_jobs_claimed_total", kind="ok") == 3
    assert sample("memtree_jobs_done_total", kind="ok") == 3
    assert sample("memtree_jobs_deferred_total", kind="later") == 1
    assert sample("memtree_jobs_failed_total", kind="bad") == 1
    assert sample("memtree_job_run_seconds_count", kind="ok") == 3
    assert sample("memtree_job_wait_seconds_count", kind="bad") == 1
    assert sample("memtree_jobs", status="done", kind="ok") == 3
    assert sample("memtree_jobs", status="ready", kind="later") == 1
    assert sample("memtree_jobs", status="failed", kind="bad") == 1
    assert sample("memtree_jobs", status="running", kind="") == 0


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def test_spans_wrap_enqueues_and_job_runs(
    wall_queue: Queue, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    spans.clear()
    with caplog.at_level(logging.WARNING):
        job_id = wall_queue.enqueue(NewJob("ok"))
        Worker(wall_queue, handlers()).run_until_idle()
    names = [span.name for span in spans.get_finished_spans()]
    assert "memtree.enqueue" in names
    run = next(s for s in spans.get_finished_spans() if s.name == "memtree.job ok")
    assert run.attributes is not None and run.attributes["memtree.job_id"] == job_id
