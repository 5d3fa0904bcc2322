"""memtree: a durable job queue in your application's own SQL database.

Enqueue in the same transaction as your domain writes, claim under leases fenced to
their claim, settle exactly once. SQLite by default, PostgreSQL to scale.
"""

from memtree.doctor import Finding, Severity, diagnose
from memtree.engine import async_url, configure_engine, create_engine, sync_url
from memtree.errors import (
    ConfigurationError,
    CorruptJobError,
    DatabaseError,
    DatabaseFileChangedError,
    InvalidJobError,
    MemtreeError,
    SchemaError,
    SchemaMissingError,
    SchemaNewerError,
    SchemaOutdatedError,
    UnsupportedDatabaseError,
)
from memtree.explanation import ExplainReason, Explanation, explain
from memtree.models import MemTreeJob
from memtree.queue import (
    Queue,
    consume,
    consume_async,
    enqueue,
    enqueue_async,
    enqueue_many,
    mark_done,
    wall_clock_ms,
)
from memtree.schedule import Schedule
from memtree.types import (
    DEFAULT_LOCK_DURATION_MS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_DEFER_AGE_MS,
    DEFAULT_SELF_HEAL_LIMIT,
    RETRY_BASE_MS,
    RETRY_CAP_MS,
    CancelOutcome,
    FailureClass,
    Job,
    JobFailure,
    JobStatus,
    NewJob,
    SettledBatch,
    backoff_ms,
)
from memtree.worker import Defer, Gate, Handlers, JobContext, RateLimit, Worker

__all__ = [
    "DEFAULT_LOCK_DURATION_MS",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_DEFER_AGE_MS",
    "DEFAULT_SELF_HEAL_LIMIT",
    "RETRY_BASE_MS",
    "RETRY_CAP_MS",
    "CancelOutcome",
    "ConfigurationError",
    "CorruptJobError",
    "DatabaseError",
    "DatabaseFileChangedError",
    "Defer",
    "ExplainReason",
    "Explanation",
    "FailureClass",
    "Finding",
    "Gate",
    "Handlers",
    "InvalidJobError",
    "Job",
    "JobContext",
    "JobFailure",
    "JobStatus",
    "MemTreeJob",
    "MemtreeError",
    "NewJob",
    "Queue",
    "RateLimit",
    "Schedule",
    "SchemaError",
    "SchemaMissingError",
    "SchemaNewerError",
    "SchemaOutdatedError",
    "SettledBatch",
    "Severity",
    "UnsupportedDatabaseError",
    "Worker",
    "async_url",
    "backoff_ms",
    "configure_engine",
    "consume",
    "consume_async",
    "create_engine",
    "diagnose",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "explain",
    "mark_done",
    "sync_url",
    "wall_clock_ms",
]

__version__ = "0.1.0"
