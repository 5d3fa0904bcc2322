"""Rows another program wrote, and payloads nested deeper than memtree's fixed limit.

SQLite stores any type in any column, so a foreign program can leave text in
``available_at_ms`` or a BLOB in ``payload_json``; on PostgreSQL the columns are typed,
but a text payload can still be too deep or not JSON, and a status can be unknown. Each
such row is that row's problem: the queue reports it, fails or leaves that one job, and
serves every other.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from memtree import InvalidJobError, JobStatus, NewJob, Queue, store
from memtree.testing import FakeClock
from memtree.types import MAX_PAYLOAD_DEPTH, decode_payload
from memtree.worker import Handlers, JobContext, Worker
from tests.test_reliability_inputs import insert_raw, raw_row


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_value(depth: int) -> object:
    value: object = []
    for _ in range(depth - 1):
        value = [value]
    return value


def in_a_thread(operation: Callable[[], Any]) -> BaseException | None:
    """Run ``operation`` in a fresh thread, as a handler would; what it raised, if anything."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            operation()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return raised[0] if raised else None


def at_stack_depth(frames: int, operation: Callable[[], Any]) -> Any:
    if frames == 0:
        return operation()
    return at_stack_depth(frames - 1, operation)


@pytest.fixture
def sqlite_queue(tmp_path: Path, clock: FakeClock) -> Iterator[Queue]:
    """A migrated queue on a SQLite file: foreign column types exist only there."""
    queue = Queue(f"sqlite:///{tmp_path / 'foreign.db'}", clock=clock)
    queue.migrate()
    try:
        yield queue
    finally:
        queue.close()


def work_handlers(seen: list[Any]) -> Handlers:
    handlers = Handlers()

    @handlers.register("work")
    def work(ctx: JobContext) -> None:
        seen.append(ctx.payload)

    return handlers


# -- payload depth -------------------------------------------------------------------------


def test_payload_depth_is_limited_to_a_fixed_documented_maximum() -> None:
    assert MAX_PAYLOAD_DEPTH == 100
    assert NewJob("k", nested_value(MAX_PAYLOAD_DEPTH)).payload_json == nested(MAX_PAYLOAD_DEPTH)
    for depth in (MAX_PAYLOAD_DEPTH + 1, 990, 992, 5_000):
        with pytest.raises(InvalidJobError, match="nested more than 100 levels deep"):
            NewJob("k", nested_value(depth))
    # Brackets inside strings do not nest, nor do escaped quotes end a string.
    payload = {"text": "[" * 500 + '\\"{' * 500, "é": '\\"', "list": [[1, 2]] * 200}
    assert NewJob("k", payload).payload == payload


def test_whether_a_deep_payload_is_accepted_does_not_depend_on_the_callers_stack() -> None:
    """Deep in the caller's stack or not, 992 levels are refused with the same error, and the
    limit's own depth is accepted."""
    for frames in (0, 700):
        with pytest.raises(InvalidJobError, match="nested more than 100 levels deep"):
            at_stack_depth(frames, lambda: NewJob("k", nested_value(992)))
        at_stack_depth(frames, lambda: NewJob("k", nested_value(MAX_PAYLOAD_DEPTH)))


@pytest.mark.parametrize("depth", [MAX_PAYLOAD_DEPTH + 1, 990, 5_000, 100_000])
def test_a_stored_payload_deeper_than_the_limit_is_a_value_error_in_any_thread(
    queue: Queue, depth: int
) -> None:
    insert_raw(queue.engine, "job:deep", payload_json=nested(depth))
    job = queue.get_job("job:deep")
    assert job is not None
    raised = in_a_thread(lambda: job.payload)
    assert isinstance(raised, ValueError), repr(raised)
    assert "MAX_PAYLOAD_DEPTH" in str(raised)
    assert in_a_thread(lambda: decode_payload(nested(MAX_PAYLOAD_DEPTH))) is None


# -- the store ---------------------------------------------------------------------------------


@pytest.mark.sqlite
def test_a_text_due_time_is_never_due_and_does_not_break_the_due_time_read(
    sqlite_queue: Queue,
) -> None:
    insert_raw(sqlite_queue.engine, "job:soon", available_at_ms="soon")
    assert sqlite_queue.next_due_ms() is None
    assert sqlite_queue.next_due_ms(["work"]) is None
    job_id = sqlite_queue.enqueue(NewJob("work", available_at_ms=5))
    assert sqlite_queue.next_due_ms(["work"]) == 5
    assert [job.id for job in sqlite_queue.claim_batch(10)] == [job_id]


FOREIGN_TYPED: dict[str, dict[str, object]] = {
    "job:blob-payload": {"payload_json": b"\x00\x01{}"},
    "job:text-attempts": {"attempts": "many"},
    "job:real-max-attempts": {"max_attempts": 2.5},
    "job:fractional-due": {"available_at_ms": 1.5},
    "job:text-created": {"created_at_ms": "yesterday"},
    "job:blob-dedupe-key": {"dedupe_key": b"key"},
}


@pytest.mark.sqlite
def test_a_claim_fails_rows_it_cannot_read_and_returns_the_rest(
    sqlite_queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    for job_id, columns in FOREIGN_TYPED.items():
        insert_raw(sqlite_queue.engine, job_id, **columns)
    good = sqlite_queue.enqueue_many([NewJob("work", {"n": n}) for n in range(3)])
    with caplog.at_level(logging.WARNING, logger="memtree"):
        claimed = sqlite_queue.claim_batch(20)
    assert sorted(job.id for job in claimed) == sorted(i for i in good if i)
    for job_id in FOREIGN_TYPED:
        row = raw_row(sqlite_queue.engine, job_id)
        assert (row["status"], row["failure_reason"], row["failure_class"]) == (
            "failed",
            "unreadable_row",
            "unrecoverable",
        ), job_id
        assert "cannot be read" in row["last_error"]
        assert any(job_id in record.getMessage() for record in caplog.records), job_id
    assert sqlite_queue.claim_batch(20) == []


@pytest.mark.sqlite
def test_unreadable_rows_are_counted_and_readable_raw(sqlite_queue: Queue) -> None:
    insert_raw(sqlite_queue.engine, "job:soon", available_at_ms="soon")
    insert_raw(sqlite_queue.engine, "job:blob", payload_json=b"\xff")
    sqlite_queue.enqueue(NewJob("work"))
    with sqlite_queue.transaction() as conn:
        assert store.count_unreadable(conn) == 2
        row = store.get_row(conn, "job:soon")
        assert row is not None
        assert store.unreadable_reason(row) == "available_at_ms holds str 'soon', not an integer"
        reasons = [store.unreadable_reason(values) for values in store.list_rows(conn)]
    assert sorted(reason or "" for reason in reasons)[0] == ""
    assert sum(reason is not None for reason in reasons) == 2


def test_a_row_with_an_unknown_status_is_counted_unreadable(queue: Queue) -> None:
    insert_raw(queue.engine, "job:paused", status="paused-by-another-program")
    queue.enqueue(NewJob("work"))
    with queue.transaction() as conn:
        assert store.count_unreadable(conn) == 1
        assert [store.unreadable_reason(values) for values in store.list_rows(conn)].count(
            "unknown status 'paused-by-another-program'"
        ) == 1


@pytest.mark.sqlite
def test_counts_by_kind_and_status_name_a_kind_that_is_not_text(sqlite_queue: Queue) -> None:
    insert_raw(sqlite_queue.engine, "job:blob-kind", kind=b"work")
    insert_raw(sqlite_queue.engine, "job:int-kind", kind=5)
    sqlite_queue.enqueue(NewJob("work"))
    counts = sqlite_queue.count_by_kind_and_status()
    assert counts == {("work", "ready"): 1, ("b'work'", "ready"): 1, ("5", "ready"): 1}


# -- the worker --------------------------------------------------------------------------------


@pytest.mark.sqlite
def test_a_worker_settles_good_jobs_past_a_text_due_time_and_a_blob_payload(
    sqlite_queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    insert_raw(sqlite_queue.engine, "job:soon", available_at_ms="soon")
    insert_raw(sqlite_queue.engine, "job:blob", payload_json=b"\x00\x01")
    good = sqlite_queue.enqueue_many([NewJob("work", {"n": n}) for n in range(20)])
    seen: list[Any] = []
    with caplog.at_level(logging.WARNING, logger="memtree"):
        settled = Worker(sqlite_queue, work_handlers(seen), gates=()).run_until_idle()
    assert settled == 20
    assert sorted(payload["n"] for payload in seen) == list(range(20))
    assert all(raw_row(sqlite_queue.engine, i or "")["status"] == "done" for i in good)
    assert raw_row(sqlite_queue.engine, "job:soon")["status"] == "ready", "never due"
    blob = raw_row(sqlite_queue.engine, "job:blob")
    assert (blob["status"], blob["failure_reason"]) == ("failed", "unreadable_row")
    assert any("job:blob" in record.getMessage() for record in caplog.records)


def test_a_worker_fails_a_too_deep_payload_cleanly_and_serves_the_rest(
    queue: Queue, engine: Engine
) -> None:
    insert_raw(engine, "job:deep", payload_json=nested(5_000))
    good = queue.enqueue_many([NewJob("work", {"n": n}) for n in range(20)])
    seen: list[Any] = []
    Worker(queue, work_handlers(seen), gates=()).run_until_idle()
    assert sorted(payload["n"] for payload in seen) == list(range(20))
    assert all(raw_row(engine, i or "")["status"] == "done" for i in good)
    deep = queue.get_job("job:deep")
    assert deep is not None and deep.status is JobStatus.READY and deep.attempts == 1
    assert deep.last_error is not None and "MAX_PAYLOAD_DEPTH" in deep.last_error
    assert "RecursionError" not in deep.last_error
