"""Enqueue, claim and read: the original's store_tests.rs, ported, plus memtree's additions."""

from __future__ import annotations

import dataclasses
import json

import psycopg
import pytest
from sqlalchemy import make_url, text
from sqlalchemy.orm import Session

import memtree
from memtree import (
    DEFAULT_LOCK_DURATION_MS,
    RETRY_CAP_MS,
    CorruptJobError,
    JobStatus,
    NewJob,
    Queue,
    backoff_ms,
)
from memtree.tree import JobKind, is_retired_kind, jobs
from tests.conftest import FakeClock


def insert_raw(
    queue: Queue, job_id: str, kind: str, status: str = "ready", **extra: object
) -> None:
    columns = {
        "id": job_id,
        "kind": kind,
        "payload_json": "{}",
        "status": status,
        "attempts": 0,
        "max_attempts": 5,
        "available_at_ms": 0,
        "created_at_ms": 0,
        **extra,
    }
    names = ", ".join(columns)
    values = ", ".join(f":{name}" for name in columns)
    with queue.engine.begin() as conn:
        conn.execute(text(f"INSERT INTO mem_tree_jobs ({names}) VALUES ({values})"), columns)


# -- the original's store_tests.rs ----------------------------------------------------


def test_enqueue_and_claim_roundtrip(queue: Queue) -> None:
    job_id = queue.enqueue(jobs.extract_chunk("c1"))
    assert job_id is not None and job_id.startswith("job:")
    claimed = queue.claim_next(DEFAULT_LOCK_DURATION_MS)
    assert claimed is not None
    assert claimed.id == job_id
    assert claimed.status is JobStatus.RUNNING
    assert claimed.attempts == 1
    assert claimed.locked_until_ms == queue.now_ms() + DEFAULT_LOCK_DURATION_MS
    assert queue.claim_next() is None, "the only row is running"


def test_typed_failure_columns_roundtrip_as_none_by_default(queue: Queue) -> None:
    job_id = queue.enqueue(jobs.extract_chunk("c-typed"))
    claimed = queue.claim_next()
    assert claimed is not None
    assert (claimed.failure_reason, claimed.failure_class) == (None, None)
    row = queue.get_job(job_id or "")
    assert row is not None
    assert (row.failure_reason, row.failure_class) == (None, None)


def test_enqueue_dedupes_active_jobs(queue: Queue) -> None:
    job = jobs.extract_chunk("c1")
    assert queue.enqueue(job) is not None
    assert queue.enqueue(job) is None, "a duplicate is suppressed while ready"
    assert queue.count_total() == 1


def test_enqueue_dedupes_while_running(queue: Queue) -> None:
    job = jobs.extract_chunk("c1")
    queue.enqueue(job)
    assert queue.claim_next() is not None
    assert queue.enqueue(job) is None, "a duplicate is suppressed while running"
    assert queue.count_total() == 1


def test_enqueue_after_done_creates_fresh_row(queue: Queue) -> None:
    job = jobs.extract_chunk("c1")
    first = queue.enqueue(job)
    claimed = queue.claim_next()
    assert claimed is not None and claimed.id == first
    assert queue.mark_done(claimed)
    second = queue.enqueue(job)
    assert second is not None and second != first
    assert queue.count_total() == 2


def test_enqueue_after_failed_creates_fresh_row(queue: Queue) -> None:
    job = NewJob("k", dedupe_key="key", max_attempts=1)
    first = queue.enqueue(job)
    claimed = queue.claim_next()
    assert claimed is not None
    assert queue.mark_failed(claimed, "boom")
    assert queue.get_job(first or "").status is JobStatus.FAILED  # type: ignore[union-attr]
    assert queue.enqueue(job) not in (None, first)


def test_count_by_status_reports_each_state(queue: Queue) -> None:
    for i in range(3):
        queue.enqueue(jobs.extract_chunk(f"c{i}"))
    assert queue.count_by_status(JobStatus.READY) == 3
    claimed = queue.claim_next()
    assert claimed is not None and queue.mark_done(claimed)
    assert queue.count_by_status(JobStatus.DONE) == 1
    assert queue.count_by_status("ready") == 2


def test_backoff_grows_then_caps() -> None:
    assert backoff_ms(1) == 60_000
    assert backoff_ms(2) == 120_000
    assert backoff_ms(3) == 240_000
    assert backoff_ms(20) == RETRY_CAP_MS
    assert backoff_ms(99) == RETRY_CAP_MS
    assert backoff_ms(0) == 60_000, "a first attempt never waits less than the base"


def test_retired_kind_rows_are_skipped_then_purged(tree_queue: Queue) -> None:
    insert_raw(tree_queue, "job:retired-1", "topic_route")
    insert_raw(tree_queue, "job:retired-2", "digest_daily")
    live_id = tree_queue.enqueue(jobs.extract_chunk("live"))
    claimed = tree_queue.claim_next()
    assert claimed is not None
    assert claimed.id == live_id
    assert claimed.kind == JobKind.EXTRACT_CHUNK
    assert tree_queue.claim_next() is None, "retired rows are never claimed"
    assert tree_queue.purge_retired_jobs() == 2
    assert tree_queue.count_total() == 1
    assert tree_queue.get_job(live_id or "") is not None


def test_a_plain_queue_retires_nothing_and_claims_a_tree_retired_kind(queue: Queue) -> None:
    """Retired kinds are the tree's setting, not the core's: a plain queue enqueues,
    claims, counts and purges nothing of its own accord."""
    assert (queue.claim_order, queue.retired_kinds) == ((), ())
    job_id = queue.enqueue(NewJob("topic_route", {"n": 1}))
    assert queue.count_retired() == 0 and queue.purge_retired_jobs() == 0
    claimed = queue.claim_next(kinds=["topic_route"])
    assert claimed is not None and claimed.id == job_id


def test_queues_retiring_different_kinds_share_an_engine(queue: Queue, tree_queue: Queue) -> None:
    """The claim and next-due statements are cached per retired kinds, not built once."""
    insert_raw(queue, "job:retired-1", "topic_route")
    assert tree_queue.next_due_ms() is None and tree_queue.claim_next() is None
    assert queue.next_due_ms() is not None
    claimed = queue.claim_next()
    assert claimed is not None and claimed.id == "job:retired-1"
    assert tree_queue.claim_next() is None


def test_is_retired_kind_recognises_legacy_strings() -> None:
    assert is_retired_kind("topic_route")
    assert is_retired_kind("digest_daily")
    assert not is_retired_kind("extract_chunk")
    assert not is_retired_kind("seal")


# -- enqueue_many ---------------------------------------------------------------------


def test_enqueue_many_reports_none_at_each_suppressed_position(queue: Queue) -> None:
    existing = queue.enqueue(NewJob("k", dedupe_key="held"))
    ids = queue.enqueue_many(
        [
            NewJob("k", dedupe_key="a"),
            NewJob("k", dedupe_key="held"),
            NewJob("k", dedupe_key="a"),
            NewJob("k"),
            NewJob("k"),
        ]
    )
    assert ids[1] is None, "a key active in the table is suppressed"
    assert ids[2] is None, "a key repeated inside the batch is suppressed after its first"
    assert all(ids[i] is not None for i in (0, 3, 4))
    assert len({ids[0], ids[3], ids[4], existing}) == 4
    assert queue.count_total() == 4


def test_enqueue_many_spans_insert_chunks(queue: Queue) -> None:
    ids = queue.enqueue_many(
        [NewJob("bulk", {"i": i}, dedupe_key=f"k{i % 900}") for i in range(1200)]
    )
    assert sum(1 for job_id in ids if job_id) == 900
    assert ids[899] is not None and ids[900] is None
    assert queue.count_total() == 900


def test_enqueue_many_returns_each_jobs_own_id_at_its_position(queue: Queue) -> None:
    """Rows go in sorted by dedupe key; each id still comes back where its job was."""
    keys = ["m", None, "c", "x", None, "a"]
    ids = queue.enqueue_many([NewJob("k", {"n": n}, dedupe_key=key) for n, key in enumerate(keys)])
    for n, (job_id, key) in enumerate(zip(ids, keys, strict=True)):
        job = queue.get_job(job_id or "")
        assert job is not None
        assert (json.loads(job.payload_json), job.dedupe_key) == ({"n": n}, key)


def test_enqueue_many_suppresses_only_keys_of_ready_or_running_jobs(queue: Queue) -> None:
    queue.enqueue(NewJob("k", dedupe_key="running"))
    assert queue.claim_next() is not None
    queue.enqueue(NewJob("k", dedupe_key="done"))
    done = queue.claim_next()
    assert done is not None and queue.mark_done(done)
    queue.enqueue(NewJob("k", dedupe_key="ready"))
    ids = queue.enqueue_many(
        [NewJob("k", dedupe_key=key) for key in ("ready", "running", "done", "new")]
    )
    assert [job_id is None for job_id in ids] == [True, True, False, False]
    assert queue.count_total() == 5


def test_enqueue_many_stores_the_rows_enqueue_stores(queue: Queue, clock: FakeClock) -> None:
    def job(key: str, n: int) -> NewJob:
        if n == 0:
            return NewJob("k", {"a": [1, "x"]}, dedupe_key=key)
        return NewJob("k2", None, dedupe_key=key, available_at_ms=clock.now_ms + 5, max_attempts=3)

    def stored(job_id: str | None) -> dict[str, object]:
        found = queue.get_job(job_id or "")
        assert found is not None
        return {**dataclasses.asdict(found), "id": None, "dedupe_key": None}

    singles = [queue.enqueue(job(f"single{n}", n)) for n in range(2)]
    batch = queue.enqueue_many([job(f"batch{n}", n) for n in range(2)])
    assert [stored(i) for i in batch] == [stored(i) for i in singles]


@pytest.mark.parametrize(
    "text_value",
    ["NULL", "null", 'a,"b"', "{braces}", "back\\slash", " spaced ", "ünï ✓ 🙂", "'; --"],
)
def test_enqueue_many_keeps_text_exactly(queue: Queue, text_value: str) -> None:
    """Kinds, keys and payloads arrive as given, whatever a batch is encoded as."""
    ids = queue.enqueue_many(
        [NewJob(text_value, {"s": text_value}, dedupe_key=text_value), NewJob("plain")]
    )
    job = queue.get_job(ids[0] or "")
    assert job is not None
    assert (job.kind, job.dedupe_key) == (text_value, text_value)
    assert json.loads(job.payload_json) == {"s": text_value}
    other = queue.get_job(ids[1] or "")
    assert other is not None and other.dedupe_key is None
    assert queue.enqueue_many([NewJob("k", dedupe_key=text_value)]) == [None]


def test_enqueue_many_notifies_each_kind_it_inserted_when_it_commits(
    queue: Queue, db_url: str
) -> None:
    if queue.engine.dialect.name != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    queue.enqueue(NewJob("suppressed", dedupe_key="held"))
    libpq = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as listener:
        listener.execute("LISTEN memtree_jobs")
        with Session(queue.engine) as session:
            memtree.enqueue_many(session, [NewJob("rolled_back")])
            session.rollback()
        queue.enqueue_many(
            [NewJob("suppressed", dedupe_key="held"), NewJob("a"), NewJob("b"), NewJob("a")]
        )
        queue.enqueue(NewJob("marker"))  # delivered after everything committed before it
        got = [n.payload for n in listener.notifies(timeout=30, stop_after=3)]
    assert sorted(got[:2]) == ["a", "b"], "one per kind inserted, none rolled back or suppressed"
    assert got[2:] == ["marker"]


def test_enqueue_many_of_nothing_is_empty(queue: Queue) -> None:
    assert queue.enqueue_many([]) == []


def test_enqueue_many_is_one_transaction(queue: Queue) -> None:
    """A bad job anywhere in the batch means nothing of it is written."""
    with pytest.raises(ValueError):
        queue.enqueue_many([NewJob("k"), "not a job"])  # type: ignore[list-item]
    assert queue.count_total() == 0


# -- claim ----------------------------------------------------------------------------


def test_claim_order_is_seal_flush_append_then_the_rest_by_due_time(
    tree_queue: Queue, clock: FakeClock
) -> None:
    now = clock.now_ms
    tree_queue.enqueue(NewJob("other", {"n": 1}, available_at_ms=now - 500))
    tree_queue.enqueue(jobs.extract_chunk("x"))
    tree_queue.enqueue(NewJob("append_buffer", {"n": 2}, available_at_ms=now - 10))
    tree_queue.enqueue(NewJob("append_buffer", {"n": 1}, available_at_ms=now - 20))
    tree_queue.enqueue(jobs.flush_stale(now))
    tree_queue.enqueue(jobs.seal("t", 1))
    order = []
    while (job := tree_queue.claim_next()) is not None:
        order.append((job.kind, job.available_at_ms))
    assert [kind for kind, _ in order] == [
        "seal",
        "flush_stale",
        "append_buffer",
        "append_buffer",
        "other",
        "extract_chunk",
    ]
    assert order[2][1] < order[3][1], "within a kind, the earliest due first"


def test_claim_batch_returns_jobs_in_claim_order(tree_queue: Queue, clock: FakeClock) -> None:
    tree_queue.enqueue_many(
        [
            NewJob("z", {"i": 1}, available_at_ms=clock.now_ms - 5),
            jobs.seal("t", 0),
            NewJob("a", {"i": 2}, available_at_ms=clock.now_ms - 9),
            jobs.extract_chunk("c"),
        ]
    )
    batch = tree_queue.claim_batch(10)
    assert [job.kind for job in batch] == ["seal", "a", "z", "extract_chunk"]
    assert len({job.lease_token for job in batch}) == 1
    assert all(job.status is JobStatus.RUNNING and job.attempts == 1 for job in batch)


def test_claim_batch_respects_limit_and_skips_future_jobs(queue: Queue, clock: FakeClock) -> None:
    queue.enqueue_many([NewJob("k", {"i": i}) for i in range(5)])
    queue.enqueue(NewJob("k", {"later": True}, available_at_ms=clock.now_ms + 1000))
    assert len(queue.claim_batch(3)) == 3
    assert len(queue.claim_batch(10)) == 2
    assert queue.claim_batch(10) == []
    clock.advance(1000)
    later = queue.claim_batch(10)
    assert [job.payload for job in later] == [{"later": True}]


def test_claim_with_kinds_only_takes_those_kinds(tree_queue: Queue) -> None:
    tree_queue.enqueue_many([jobs.seal("t", 0), NewJob("mine", 1), NewJob("theirs", 2)])
    got = tree_queue.claim_batch(10, kinds=["mine"])
    assert [job.kind for job in got] == ["mine"]
    got = tree_queue.claim_batch(10, kinds=["seal", "nothing"])
    assert [job.kind for job in got] == ["seal"]
    assert tree_queue.claim_batch(10, kinds=[]) == []
    assert tree_queue.claim_batch(10, kinds=["topic_route"]) == []
    assert [job.kind for job in tree_queue.claim_batch(10)] == ["theirs"]


def test_claim_order_is_configurable(engine, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    queue = Queue(engine, clock=clock, claim_order=("urgent",))
    queue.migrate()
    queue.enqueue_many([jobs.seal("t", 0), NewJob("urgent", 1)])
    assert [job.kind for job in queue.claim_batch(5)] == ["urgent", "seal"]


def test_claim_sets_lease_and_clears_last_error(queue: Queue, clock: FakeClock) -> None:
    job_id = queue.enqueue(NewJob("k", max_attempts=3))
    first = queue.claim_next()
    assert first is not None and queue.mark_failed(first, "boom")
    clock.advance(backoff_ms(1))
    second = queue.claim_next(lock_duration_ms=1234)
    assert second is not None and second.id == job_id
    assert second.last_error is None
    assert second.started_at_ms == clock.now_ms
    assert second.locked_until_ms == clock.now_ms + 1234
    assert second.attempts == 2
    assert second.lease_token not in (None, first.lease_token)


def test_get_job_of_unknown_id_is_none(queue: Queue) -> None:
    assert queue.get_job("job:nope") is None


def test_row_with_unknown_status_is_reported_and_never_blocks_claims(queue: Queue) -> None:
    insert_raw(queue, "job:weird", "k", status="paused-by-another-program")
    live = queue.enqueue(NewJob("k"))
    with pytest.raises(CorruptJobError, match="job:weird"):
        queue.get_job("job:weird")
    claimed = queue.claim_next()
    assert claimed is not None and claimed.id == live
    assert queue.count_total() == 2


def test_row_written_by_another_program_with_unknown_kind_is_claimed(queue: Queue) -> None:
    insert_raw(queue, "job:foreign", "someone_elses_kind")
    claimed = queue.claim_next()
    assert claimed is not None and claimed.kind == "someone_elses_kind"


def test_repeated_single_calls_survive_prepared_statements(queue: Queue) -> None:
    """Drivers prepare a statement after a few uses; the dedupe conflict target and the
    claim must work the same as a prepared statement as they do as a one-off."""
    with queue.engine.connect() as conn:
        for i in range(30):
            from memtree import enqueue

            assert (
                enqueue(conn, NewJob("p", {"i": i}, dedupe_key=f"k{i % 3}")) is not None or i >= 3
            )
            conn.commit()
    assert queue.count_total() == 3
    for _ in range(30):
        queue.enqueue(NewJob("p", dedupe_key="k0"))
    assert queue.count_total() == 3
    for i in range(30):
        queue.enqueue(NewJob("q", {"i": i}))
    claimed = [queue.claim_next(kinds=["q"]) for _ in range(30)]
    assert len({job.id for job in claimed if job}) == 30
