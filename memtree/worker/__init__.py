"""The worker: a producer that claims, executors that run handlers (threads for
``def``, an event loop for ``async def``), and a completer that settles what they
return. See :class:`Worker`."""

from memtree.worker.completer import (
    DEFAULT_MAX_INFRASTRUCTURE_RELEASES,
    INFRASTRUCTURE_RETRY_BASE_MS,
    INFRASTRUCTURE_RETRY_CAP_MS,
)
from memtree.worker.context import (
    AsyncHandler,
    AsyncJobContext,
    Defer,
    Gate,
    Handler,
    Handlers,
    JobContext,
    RateLimit,
)
from memtree.worker.faults import classify_error, is_infrastructure_error
from memtree.worker.outcome import Ending
from memtree.worker.worker import Worker

__all__ = [
    "DEFAULT_MAX_INFRASTRUCTURE_RELEASES",
    "INFRASTRUCTURE_RETRY_BASE_MS",
    "INFRASTRUCTURE_RETRY_CAP_MS",
    "AsyncHandler",
    "AsyncJobContext",
    "Defer",
    "Ending",
    "Gate",
    "Handler",
    "Handlers",
    "JobContext",
    "RateLimit",
    "Worker",
    "classify_error",
    "is_infrastructure_error",
]
