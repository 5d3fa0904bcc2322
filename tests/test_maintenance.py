"""The original's scheduler_tests.rs, ported: flush_stale per 3-hour block, and self-heal."""

from __future__ import annotations

from memtree import JobKind, JobStatus, NewJob, Queue
from memtree.maintenance import enqueue_flush_stale, self_heal
from tests.conftest import FakeClock


def test_enqueue_flush_stale_dedupes_within_current_block(wall_queue: Queue) -> None:
    assert enqueue_flush_stale(wall_queue) is not None
    assert enqueue_flush_stale(wall_queue) is None, "the same 3h block is deduped"
    assert wall_queue.count_by_status(JobStatus.READY) == 1
    claimed = wall_queue.claim_next()
    assert claimed is not None and claimed.kind == JobKind.FLUSH_STALE


def test_enqueue_flush_stale_enqueues_again_in_the_next_block(
    queue: Queue, clock: FakeClock
) -> None:
    assert enqueue_flush_stale(queue) is not None
    clock.advance(3 * 60 * 60 * 1000)
    assert enqueue_flush_stale(queue) is not None, "a new block, a new key"
    assert queue.count_total() == 2


def test_self_heal_requeues_transient_failures(wall_queue: Queue) -> None:
    wall_queue.enqueue(NewJob("extract_chunk", {"chunk_id": "c1"}, "extract:c1", max_attempts=1))
    claim = wall_queue.claim_next()
    assert claim is not None
    assert wall_queue.mark_failed(claim, "connection reset by peer")
    assert wall_queue.count_by_status(JobStatus.FAILED) == 1
    assert self_heal(wall_queue) == 1
    assert wall_queue.count_by_status(JobStatus.READY) == 1
