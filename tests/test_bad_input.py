"""Bad input gets a clear memtree error and writes nothing; hostile text is stored exactly."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import Engine

from memtree import (
    ConfigurationError,
    InvalidJobError,
    JobStatus,
    MemtreeError,
    NewJob,
    Queue,
    UnsupportedDatabaseError,
)
from memtree.tree import jobs


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: NewJob(""), "kind must not be empty"),
        (lambda: NewJob(None), "kind must be a string"),  # type: ignore[arg-type]
        (lambda: NewJob("k\x00"), "NUL"),
        (lambda: NewJob("k", math.nan), "not JSON"),
        (lambda: NewJob("k", {"x": math.inf}), "not JSON"),
        (lambda: NewJob("k", object()), "not JSON"),
        (lambda: NewJob("k", {1, 2}), "not JSON"),
        (lambda: NewJob("k", {"s": "\ud800"}), "not valid Unicode"),
        (lambda: NewJob("k", dedupe_key=""), "dedupe_key must not be empty"),
        (lambda: NewJob("k", dedupe_key="a\x00b"), "NUL"),
        (lambda: NewJob("k", max_attempts=0), "max_attempts"),
        (lambda: NewJob("k", max_attempts=-3), "max_attempts"),
        (lambda: NewJob("k", max_attempts=True), "max_attempts"),
        (lambda: NewJob("k", max_attempts=2.0), "max_attempts"),  # type: ignore[arg-type]
        (lambda: NewJob("k", max_attempts=2**40), "max_attempts"),
        (lambda: NewJob("k", available_at_ms=1.5), "integer"),  # type: ignore[arg-type]
        (lambda: NewJob("k", available_at_ms="soon"), "integer"),  # type: ignore[arg-type]
        (lambda: NewJob("k", available_at_ms=2**64), "64-bit"),
        (lambda: jobs.seal("t", -1), "level"),
        (lambda: jobs.extract_chunk(""), "chunk_id"),
        (lambda: NewJob("k" * 256), "at most 255"),
        (lambda: NewJob("k", dedupe_key="é" * 1001), "at most 2000"),
    ],
)
def test_bad_new_job_is_rejected_with_a_clear_error(build, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidJobError, match=message):
        build()


@pytest.mark.parametrize("kind", ["topic_route", "digest_daily"])
def test_a_retired_kind_is_rejected_with_a_clear_error(tree_queue: Queue, kind: str) -> None:
    """The tree's queue retires the crate's removed kinds; a plain NewJob of one is fine
    until it reaches a queue that would never claim it."""
    with pytest.raises(InvalidJobError, match="retired"):
        tree_queue.enqueue(NewJob(kind))
    with pytest.raises(InvalidJobError, match="retired"):
        tree_queue.enqueue_many([NewJob("k"), NewJob(kind)])
    assert tree_queue.count_total() == 0


def test_deeply_nested_payload_is_rejected() -> None:
    payload: object = []
    for _ in range(100_000):
        payload = [payload]
    with pytest.raises(InvalidJobError, match="nested"):
        NewJob("k", payload)


def test_invalid_job_error_is_a_memtree_error_and_a_value_error() -> None:
    assert issubclass(InvalidJobError, MemtreeError)
    assert issubclass(InvalidJobError, ValueError)


def test_enqueue_of_something_that_is_not_a_new_job_writes_nothing(queue: Queue) -> None:
    with pytest.raises(InvalidJobError):
        queue.enqueue({"kind": "k"})  # type: ignore[arg-type]
    assert queue.count_total() == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lock_duration_ms": 0},
        {"lock_duration_ms": "300000"},
        {"lock_duration_ms": 1.5},
        {"retry_base_ms": -1},
        {"retry_base_ms": 10, "retry_cap_ms": 5},
        {"max_defer_age_ms": 0},
        {"max_attempts": 0},
        {"claim_order": "seal"},
        {"claim_order": ("seal", "seal")},
        {"claim_order": ("topic_route",), "retired_kinds": ("topic_route",)},
        {"retired_kinds": "topic_route"},
        {"retired_kinds": ("",)},
        {"retired_kinds": ("a", "a")},
        {"claim_order": ("",)},
        {"clock": 5},
    ],
)
def test_queue_settings_are_validated_when_built(engine: Engine, kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigurationError):
        Queue(engine, **kwargs)


def test_queue_rejects_a_bind_that_is_not_an_engine_or_url() -> None:
    with pytest.raises(ConfigurationError):
        Queue(42)  # type: ignore[arg-type]


def test_unsupported_database_is_named() -> None:
    with pytest.raises(UnsupportedDatabaseError, match="oracle"):
        Queue("oracle+oracledb://scott@127.0.0.1/test")


def test_claim_rejects_a_lease_that_is_not_an_int(queue: Queue) -> None:
    queue.enqueue(NewJob("k"))
    for bad in ("5000", 5.0, None.__class__):
        with pytest.raises(ConfigurationError, match="lock_duration_ms"):
            queue.claim_next(lock_duration_ms=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        queue.claim_batch(-1)
    with pytest.raises(ConfigurationError):
        queue.claim_batch(5, kinds="k")
    assert queue.count_by_status(JobStatus.READY) == 1, "nothing was claimed"


HOSTILE = [
    "'; DROP TABLE mem_tree_jobs; --",
    "Robert'); DELETE FROM mem_tree_jobs WHERE ('1'='1",
    "emoji 🧠 and RTL \u202e and zero width \u200b",
    "x" * (1024 * 1024),
]


@pytest.mark.parametrize("text", HOSTILE, ids=["drop", "delete", "unicode", "1MB"])
def test_hostile_text_is_stored_exactly(queue: Queue, text: str) -> None:
    kind, key = text[:255], text[:2000]
    job_id = queue.enqueue(NewJob(kind, {"s": text}, dedupe_key=key))
    assert job_id is not None
    assert queue.enqueue(NewJob(kind, dedupe_key=key)) is None
    claimed = queue.claim_next()
    assert claimed is not None and claimed.id == job_id
    assert claimed.payload == {"s": text}
    assert (claimed.kind, claimed.dedupe_key) == (kind, key)
    assert queue.mark_failed(claimed, text)
    stored = queue.get_job(job_id)
    assert stored is not None and stored.last_error == text
    assert queue.count_total() == 1


def test_nul_bytes_in_payload_text_are_stored_escaped(queue: Queue) -> None:
    job_id = queue.enqueue(NewJob("k", {"s": "a\x00b"}))
    stored = queue.get_job(job_id or "")
    assert stored is not None and stored.payload == {"s": "a\x00b"}


def test_ten_megabyte_payload_round_trips(queue: Queue) -> None:
    big = {"blob": "z" * (10 * 1024 * 1024)}
    job_id = queue.enqueue(NewJob("k", big))
    claimed = queue.claim_next()
    assert claimed is not None and claimed.id == job_id and claimed.payload == big


def test_extreme_times_are_stored(queue: Queue) -> None:
    far = 2**63 - 1
    job_id = queue.enqueue(NewJob("k", available_at_ms=far))
    assert queue.claim_next() is None
    stored = queue.get_job(job_id or "")
    assert stored is not None and stored.available_at_ms == far
    past = queue.enqueue(NewJob("k", available_at_ms=-(2**63)))
    claimed = queue.claim_next(lock_duration_ms=2**62)
    assert claimed is not None and claimed.id == past
    assert claimed.locked_until_ms is not None
