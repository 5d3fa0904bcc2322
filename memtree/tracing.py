"""OpenTelemetry spans around enqueues and job runs, when ``opentelemetry-api`` is installed.

Without it, :func:`span` is a no-op costing one function call; memtree never requires
OpenTelemetry.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

__all__ = ["enabled", "span"]

try:
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised where the API is absent
    _trace = None  # type: ignore[assignment]


def enabled() -> bool:
    """Whether spans would record: OpenTelemetry is installed and an application has set
    a tracer provider. Until then the API's proxy only makes non-recording spans, at a
    cost per job, so memtree skips them. (Asking costs an environment lookup: the worker
    asks once per batch of claims, not once per job.)"""
    return _trace is not None and not isinstance(
        _trace.get_tracer_provider(), _trace.ProxyTracerProvider
    )


def span(
    name: str, attributes: dict[str, Any], *, record: bool | None = None
) -> AbstractContextManager[Any]:
    """A span named ``name`` on memtree's tracer, or a no-op when spans would not record
    (``record``: the caller's own recent answer of :func:`enabled`)."""
    if not (enabled() if record is None else record) or _trace is None:
        return nullcontext()
    return _trace.get_tracer("memtree").start_as_current_span(name, attributes=attributes)
