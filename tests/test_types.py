"""Payload wire shapes and dedupe keys (the original's serde output), kinds, statuses, failures."""

from __future__ import annotations

import dataclasses
import json

import pytest

from memtree import (
    CorruptJobError,
    FailureClass,
    InvalidJobError,
    Job,
    JobFailure,
    JobStatus,
    NewJob,
    store,
)
from memtree.tree import RETIRED_KINDS, JobKind, jobs
from memtree.tree.payloads import (
    AppendBufferPayload,
    ExtractChunkPayload,
    FlushStalePayload,
    Leaf,
    SealDocumentPayload,
    SealPayload,
    SourceTarget,
    Summary,
    TopicTarget,
    flush_stale_block,
)


def wire(job: NewJob) -> object:
    return json.loads(job.payload_json)


def test_extract_chunk_payload_and_key() -> None:
    job = jobs.extract_chunk("c-1")
    assert job.kind == JobKind.EXTRACT_CHUNK == "extract_chunk"
    assert wire(job) == {"chunk_id": "c-1"}
    assert job.dedupe_key == "extract:c-1"
    assert job.max_attempts is None


@pytest.mark.parametrize(
    ("node", "target", "payload", "key"),
    [
        (
            Leaf("c1"),
            SourceTarget("slack:#x"),
            {
                "node": {"kind": "leaf", "chunk_id": "c1"},
                "target": {"kind": "source", "source_id": "slack:#x"},
            },
            "append:source:slack:#x:leaf:c1",
        ),
        (
            Summary("s9"),
            TopicTarget("tree-7"),
            {
                "node": {"kind": "summary", "summary_id": "s9"},
                "target": {"kind": "topic", "tree_id": "tree-7"},
            },
            "append:topic:tree-7:summary:s9",
        ),
    ],
)
def test_append_buffer_payload_and_key(node, target, payload, key) -> None:  # type: ignore[no-untyped-def]
    job = jobs.append_buffer(node, target)
    assert job.kind == "append_buffer"
    assert wire(job) == payload
    assert job.dedupe_key == key
    assert AppendBufferPayload.from_wire(payload) == AppendBufferPayload(node, target)


def test_seal_payload_keeps_optional_fields_as_null() -> None:
    job = jobs.seal("tree-1", 2)
    assert wire(job) == {"tree_id": "tree-1", "level": 2, "force_now_ms": None}
    assert job.dedupe_key == "seal:tree-1:2"
    forced = jobs.seal("tree-1", 2, force_now_ms=123)
    assert wire(forced) == {"tree_id": "tree-1", "level": 2, "force_now_ms": 123}
    assert forced.dedupe_key == job.dedupe_key, "forcing does not change the key"
    assert SealPayload.from_wire(wire(forced)) == SealPayload("tree-1", 2, 123)


def test_flush_stale_key_is_the_utc_date_and_three_hour_block() -> None:
    # 2026-11-26T23:59:59.999Z is block 7; one millisecond later is the next day's block 0.
    last_ms = 1_795_737_599_999
    assert flush_stale_block(last_ms) == ("2026-11-26", 7)
    assert jobs.flush_stale(last_ms).dedupe_key == "flush_stale:2026-11-26-h7"
    assert jobs.flush_stale(last_ms + 1).dedupe_key == "flush_stale:2026-11-27-h0"
    assert jobs.flush_stale(last_ms - 3 * 3600 * 1000).dedupe_key == "flush_stale:2026-11-26-h6"
    assert wire(jobs.flush_stale(last_ms)) == {"max_age_secs": None}
    assert wire(jobs.flush_stale(last_ms, max_age_secs=60)) == {"max_age_secs": 60}
    assert FlushStalePayload.from_wire({"max_age_secs": 60}) == FlushStalePayload(60)


def test_reembed_backfill_has_three_attempts() -> None:
    job = jobs.reembed_backfill("openai:3-small:1536")
    assert wire(job) == {"signature": "openai:3-small:1536"}
    assert job.dedupe_key == "reembed_backfill:openai:3-small:1536"
    assert job.max_attempts == 3


def test_seal_document_key_with_and_without_version() -> None:
    versioned = jobs.seal_document("conn:1", "doc-9", ["a", "b"], version_ms=1700)
    assert wire(versioned) == {
        "tree_scope": "conn:1",
        "doc_id": "doc-9",
        "version_ms": 1700,
        "chunk_ids": ["a", "b"],
    }
    assert versioned.dedupe_key == "seal_doc:doc-9@1700"
    plain = jobs.seal_document("conn:1", "doc-9", [])
    assert wire(plain) == {
        "tree_scope": "conn:1",
        "doc_id": "doc-9",
        "version_ms": None,
        "chunk_ids": [],
    }
    assert plain.dedupe_key == "seal_doc:doc-9"
    assert SealDocumentPayload.from_wire(wire(versioned)).chunk_ids == ("a", "b")


def test_payload_classes_roundtrip_from_wire() -> None:
    assert ExtractChunkPayload.from_wire({"chunk_id": "x"}).dedupe_key() == "extract:x"
    with pytest.raises(InvalidJobError):
        ExtractChunkPayload.from_wire({"chunk": "x"})
    with pytest.raises(InvalidJobError):
        AppendBufferPayload.from_wire({"node": {"kind": "twig"}, "target": {"kind": "source"}})


def test_wire_strings() -> None:
    assert [s.value for s in JobStatus] == ["ready", "running", "done", "failed", "cancelled"]
    assert [k.value for k in JobKind] == [
        "extract_chunk",
        "append_buffer",
        "seal",
        "flush_stale",
        "reembed_backfill",
        "seal_document",
    ]
    assert RETIRED_KINDS == ("topic_route", "digest_daily")
    assert JobStatus.DONE.is_terminal and not JobStatus.RUNNING.is_terminal
    assert [c.value for c in FailureClass] == ["transient", "unrecoverable"]


def test_job_failure_constructors_and_text() -> None:
    assert str(JobFailure.transient("net")) == "net (transient)"
    assert str(JobFailure.unrecoverable("auth")) == "auth (unrecoverable)"
    budget = JobFailure.budget_exhausted()
    assert budget == JobFailure.unrecoverable("budget_exhausted")
    assert budget.is_unrecoverable and budget.failure_class is FailureClass.UNRECOVERABLE
    assert not JobFailure.transient("net").is_unrecoverable
    with pytest.raises(ValueError):
        JobFailure("x", "sometimes")


def test_applications_may_use_their_own_kinds() -> None:
    job = NewJob("send_email", {"to": "a@example.com"})
    assert job.kind == "send_email" and job.dedupe_key is None


def test_job_fields_are_the_table_columns_in_order() -> None:
    # The claim builds a Job positionally from a row of every column (job_from_values).
    assert tuple(field.name for field in dataclasses.fields(Job)) == store.JOB_COLUMNS


def test_job_from_values_matches_job_from_row_and_rejects_an_unknown_status() -> None:
    values = (
        "j1",
        "k",
        "{}",
        None,
        "running",
        1,
        5,
        10,
        20,
        None,
        5,
        10,
        None,
        None,
        None,
        "t",
        None,
        2,
    )
    row = dict(zip(store.JOB_COLUMNS, values, strict=True))
    assert store.job_from_values(values) == store.job_from_row(row)
    assert store.job_from_values(values).status is JobStatus.RUNNING
    with pytest.raises(CorruptJobError, match="unknown status 'sleeping'"):
        store.job_from_values((*values[:4], "sleeping", *values[5:]))
