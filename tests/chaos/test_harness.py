"""The chaos checks can fail: each is fed the state a broken queue would leave behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import insert, text

import memtree
from memtree import NewJob, Queue
from tests.chaos import chaos_app
from tests.chaos.harness import (
    LEASE_MS,
    Figures,
    Orphan,
    WorkerPool,
    check_final_state,
    check_recoveries,
)


@pytest.fixture
def done_jobs(tmp_path: Path) -> Iterator[tuple[Queue, list[str]]]:
    """Two jobs, each claimed and completed, with the domain row of its completing claim."""
    queue = Queue(memtree.create_engine(f"sqlite:///{tmp_path / 'chaos.db'}"))
    queue.migrate()
    chaos_app.metadata.create_all(queue.engine)
    ids = [i for i in queue.enqueue_many([NewJob("chaos"), NewJob("chaos")]) if i]
    for job in queue.claim_batch(2):
        with queue.engine.begin() as conn:
            conn.execute(
                insert(chaos_app.effects).values(
                    job_id=job.id, lease_token=job.lease_token, attempt=1, pid=1, outcome="done"
                )
            )
        assert queue.mark_done(job)
    try:
        yield queue, ids
    finally:
        queue.engine.dispose()


def test_the_final_check_passes_a_clean_run(done_jobs: tuple[Queue, list[str]]) -> None:
    queue, ids = done_jobs
    check_final_state(queue.engine, ids, Figures("t", "sqlite"))


@pytest.mark.parametrize(
    "damage",
    [
        "INSERT INTO chaos_effects (job_id, lease_token, attempt, pid, outcome) "
        "SELECT job_id, lease_token, attempt, 2, outcome FROM chaos_effects LIMIT 1",
        "DELETE FROM chaos_effects WHERE id = (SELECT min(id) FROM chaos_effects)",
        "UPDATE chaos_effects SET lease_token = 'an-older-claim' "
        "WHERE id = (SELECT min(id) FROM chaos_effects)",
        "UPDATE chaos_effects SET outcome = 'failed' "
        "WHERE id = (SELECT min(id) FROM chaos_effects)",
        "UPDATE mem_tree_jobs SET status = 'running' "
        "WHERE id = (SELECT min(id) FROM mem_tree_jobs)",
    ],
    ids=["duplicate row", "lost row", "row of a lost claim", "row of a failed run", "stuck"],
)
def test_the_final_check_fails_a_broken_run(
    done_jobs: tuple[Queue, list[str]], damage: str
) -> None:
    queue, ids = done_jobs
    with queue.engine.begin() as conn:
        conn.execute(text(damage))
    with pytest.raises(AssertionError):
        check_final_state(queue.engine, ids, Figures("t", "sqlite"))


def claim_log(tmp_path: Path, *events: dict[str, object]) -> WorkerPool:
    pool = WorkerPool("sqlite://", tmp_path)
    with (tmp_path / "claims-1.jsonl").open("w") as log:
        for event in events:
            log.write(json.dumps({"e": "start", **event}) + "\n")
    return pool


def test_the_recovery_check_measures_a_recovery(tmp_path: Path) -> None:
    orphan = Orphan("job:1", "first", locked_until_ms=2_000, killed_at_ms=1_000, pid=7)
    pool = claim_log(
        tmp_path,
        {"job": "job:1", "token": "first", "started": 0},
        {"job": "job:1", "token": "second", "started": 3_500},
    )
    figures = Figures("t", "sqlite")
    check_recoveries(pool, [orphan], figures)
    assert (figures.orphaned_jobs, figures.max_recovery_s) == (1, 2.5)


@pytest.mark.parametrize(
    ("again", "message"),
    [
        (None, "never run again"),
        (1_500, "before its lease expired"),
        (1_000 + LEASE_MS + 60_000, "took"),
    ],
)
def test_the_recovery_check_fails_a_job_taken_early_late_or_never(
    tmp_path: Path, again: int | None, message: str
) -> None:
    orphan = Orphan("job:1", "first", locked_until_ms=2_000, killed_at_ms=1_000, pid=7)
    events: list[dict[str, object]] = [{"job": "job:1", "token": "first", "started": 0}]
    if again is not None:
        events.append({"job": "job:1", "token": "second", "started": again})
    with pytest.raises(AssertionError, match=message):
        check_recoveries(claim_log(tmp_path, *events), [orphan], Figures("t", "sqlite"))
