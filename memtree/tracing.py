"""OpenTelemetry spans around enqueues and job runs, when ``opentelemetry-api`` is installed.

Without it, :func:`span` is a no-op costing one function call; memtree never requires
OpenTelemetry.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

__all__ = ["span"]

try:
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised where the API is absent
    _trace = None  # type: ignore[assignment]


def span(name: str, attributes: dict[str, Any]) -> AbstractContextManager[Any]:
    """A span named ``name`` on memtree's tracer, or a no-op without OpenTelemetry.

    Until an application installs a tracer provider, the API's proxy would only make
    non-recording spans, at a cost per job: skip them.
    """
    if _trace is None or isinstance(_trace.get_tracer_provider(), _trace.ProxyTracerProvider):
        return nullcontext()
    return _trace.get_tracer("memtree").start_as_current_span(name, attributes=attributes)
