"""Fleet-wide limits: global gates (per key, too) and rate limits, on every database.

The claims here go through :meth:`Queue.exchange`, as a worker's do; several queues on
one database stand for several worker processes (tests/fleet runs real ones).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import memtree
from memtree import ConfigurationError, Gate, JobContext, NewJob, Queue, RateLimit, Worker
from memtree.limits import Limit
from memtree.queue import ClaimGroup
from memtree.testing import FakeClock

LEASE_MS = 30_000


def claim(
    queue: Queue, limit: Limit, want: int = 50, kinds: tuple[str, ...] = ("llm",)
) -> list[memtree.Job]:
    exchanged = queue.exchange([], [ClaimGroup(want, kinds, limit)], want, LEASE_MS)
    return exchanged.claimed[0]


def test_a_global_gate_hands_out_no_more_permits_than_its_limit(queue: Queue) -> None:
    queue.enqueue_many([NewJob("llm") for _ in range(10)])
    gate = Limit(gate=Gate("llm", 3, ["llm"], scope="global"))
    assert len(claim(queue, gate)) == 3
    assert claim(queue, gate) == []
    # Another "process" on the same database sees the same permits taken.
    other = Queue(queue.engine, clock=queue._clock)
    assert claim(other, gate) == []


def test_a_settled_run_frees_its_permit_and_a_stale_claim_frees_none(queue: Queue) -> None:
    queue.enqueue_many([NewJob("llm") for _ in range(4)])
    gate = Limit(gate=Gate("llm", 1, ["llm"], scope="global"))
    [first] = claim(queue, gate)
    assert queue.mark_done(first)
    [second] = claim(queue, gate)
    # The first claim is over: settling it again (a stale worker) frees nothing.
    assert not queue.mark_done(first)
    assert claim(queue, gate) == []
    assert queue.mark_failed(second, "boom")  # retried later: its permit is free now
    assert len(claim(queue, gate)) == 1


def test_a_permit_never_outlives_its_lease(queue: Queue, clock: FakeClock) -> None:
    queue.enqueue_many([NewJob("llm") for _ in range(2)])
    gate = Limit(gate=Gate("llm", 1, ["llm"], scope="global"))
    [held] = claim(queue, gate)
    clock.advance(LEASE_MS - 1)
    assert claim(queue, gate) == []
    clock.advance(2)  # the holder's worker died: its lease ran out, not yet recovered
    [taken] = claim(queue, gate)
    assert taken.id != held.id
    assert not queue.mark_done(held) or True  # whatever the stale worker does next
    assert queue.get_job(taken.id).status is memtree.JobStatus.RUNNING  # type: ignore[union-attr]


def test_a_keyed_gate_limits_each_key_on_its_own(queue: Queue) -> None:
    trees = ["a", "a", "a", "b", "b", "c"]
    queue.enqueue_many([NewJob("seal", {"tree": t, "n": i}) for i, t in enumerate(trees)])
    queue.enqueue(NewJob("seal", {"n": "no tree"}))  # no key: the partition ''
    gate = Limit(gate=Gate("seal", 1, ["seal"], scope="global", key="tree"))
    first = claim(queue, gate, kinds=("seal",))
    assert sorted(job.payload.get("tree", "") for job in first) == ["", "a", "b", "c"]
    assert claim(queue, gate, kinds=("seal",)) == []
    done = next(job for job in first if job.payload.get("tree") == "a")
    assert queue.mark_done(done)
    [again] = claim(queue, gate, kinds=("seal",))
    assert again.payload["tree"] == "a"


def test_a_keyed_gate_is_not_blocked_by_a_backlog_of_a_full_key(queue: Queue) -> None:
    queue.enqueue_many([NewJob("seal", {"tree": "hot"}) for _ in range(300)])
    queue.enqueue(NewJob("seal", {"tree": "cold"}))
    gate = Limit(gate=Gate("seal", 1, ["seal"], scope="global", key="tree"))
    assert [job.payload["tree"] for job in claim(queue, gate, want=1, kinds=("seal",))] == ["hot"]
    # 300 hot jobs are due first, and their key is full: the cold one is still found.
    assert [job.payload["tree"] for job in claim(queue, gate, want=1, kinds=("seal",))] == ["cold"]


def test_a_rate_limit_counts_starts_in_a_sliding_window(queue: Queue, clock: FakeClock) -> None:
    queue.enqueue_many([NewJob("llm") for _ in range(10)])
    rate = RateLimit("calls", 4, 10.0, ["llm"])
    limit = Limit(rate=rate)
    assert len(claim(queue, limit)) == 4
    clock.advance(5_000)
    exchanged = queue.exchange([], [ClaimGroup(10, ("llm",), limit)], 10, LEASE_MS)
    assert exchanged.claimed == [[]]
    # The window rolls when the first starts are 10 s old: the worker is told when.
    assert exchanged.blocked[0] == clock.now_ms + 5_000
    clock.advance(5_000)
    assert len(claim(queue, limit)) == 4


def test_a_rate_limit_weighs_starts_by_a_payload_field(queue: Queue) -> None:
    # Due one after another (jobs due in the same millisecond have no order on MySQL).
    due = queue.now_ms() - 10
    queue.enqueue_many(
        [NewJob("llm", {"tokens": t}, available_at_ms=due + i) for i, t in enumerate((5, 4, 2, 1))]
    )
    limit = Limit(rate=RateLimit("tokens", 8, 60.0, ["llm"], weight="tokens"))
    taken = claim(queue, limit)
    assert sum(job.payload["tokens"] for job in taken) <= 8
    # In due order: 5 fits, 4 does not fit the 3 left, 2 and 1 do.
    assert sorted(job.payload["tokens"] for job in taken) == [1, 2, 5]


def test_a_keyed_rate_limit_has_a_budget_per_key(queue: Queue) -> None:
    queue.enqueue_many([NewJob("llm", {"tenant": t}) for t in "aaabbbc"])
    limit = Limit(rate=RateLimit("tenant-calls", 2, 60.0, ["llm"], key="tenant"))
    assert Counter(job.payload["tenant"] for job in claim(queue, limit)) == {"a": 2, "b": 2, "c": 1}


def test_consume_shares_the_budget_with_workers_and_rolls_back(
    queue: Queue, engine: Engine, clock: FakeClock
) -> None:
    rate = RateLimit("llm-calls", 3, 60.0, ["llm"])
    with Session(engine) as session:
        assert memtree.consume(session, rate, now_ms=clock.now_ms)
        session.rollback()  # the request failed: its call is given back
    with Session(engine) as session, session.begin():
        assert memtree.consume(session, rate, now_ms=clock.now_ms, weight=2)
    queue.enqueue_many([NewJob("llm") for _ in range(5)])
    assert len(claim(queue, Limit(rate=rate))) == 1
    assert not queue.consume(rate)
    assert queue.limit_state(rate).used == {"": 3}


def test_consume_on_the_databases_clock(wall_queue: Queue, engine: Engine) -> None:
    rate = RateLimit("wall", 2, 60.0, ["llm"])
    with Session(engine) as session, session.begin():
        assert [memtree.consume(session, rate, key="t") for _ in range(3)] == [True, True, False]
    assert wall_queue.limit_state(rate).used == {"t": 2}


def test_consume_refuses_misuse(queue: Queue, engine: Engine) -> None:
    rate = RateLimit("r", 2, 1.0, ["llm"])
    with Session(engine) as session:
        with pytest.raises(ConfigurationError):
            memtree.consume(session, rate, weight=3)
        with pytest.raises(ConfigurationError):
            memtree.consume(session, Gate("g", 1, ["llm"], scope="global"))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        memtree.consume(engine, rate)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build",
    [
        lambda: Gate("g", 0, ["k"]),
        lambda: Gate("g", 1, "k"),
        lambda: Gate("g", 1, ["k"], scope="fleet"),  # type: ignore[arg-type]
        lambda: Gate("g", 1, ["k"], key="tree"),  # a key needs scope="global"
        lambda: Gate("g", 1, ["k"], scope="global", key="a.b"),
        lambda: RateLimit("r", 1, 0, ["k"]),
        lambda: RateLimit("r", 1, 1.0, ["k"], weight="$x"),
    ],
)
def test_limits_are_validated_when_built(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError):
        build()


def test_a_worker_refuses_a_kind_in_two_rate_limits(queue: Queue) -> None:
    rates = [RateLimit("a", 1, 1.0, ["k"]), RateLimit("b", 1, 1.0, ["k"])]
    with pytest.raises(ConfigurationError, match="two rate limits"):
        Worker(queue, {"k": lambda ctx: None}, rate_limits=rates)


def test_two_workers_never_run_more_than_a_global_gates_limit(wall_queue: Queue) -> None:
    running = 0
    peak = 0
    lock = threading.Lock()

    def work(ctx: JobContext) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    wall_queue.enqueue_many(
        [NewJob("llm") for _ in range(30)] + [NewJob("fast") for _ in range(30)]
    )
    gate = Gate("llm", 2, ["llm"], scope="global")
    workers = [
        Worker(
            Queue(wall_queue.engine),
            {"llm": work, "fast": lambda ctx: None},
            gates=[gate],
            concurrency=4,
        )
        for _ in range(2)
    ]
    threads = [threading.Thread(target=w.run_until_idle) for w in workers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while wall_queue.count_by_status(memtree.JobStatus.DONE) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    for worker in workers:
        worker.stop()
    for thread in threads:
        thread.join(30)
    assert wall_queue.count_by_status(memtree.JobStatus.DONE) == 60
    assert peak == 2  # 8 slots in all, yet never more than the gate's 2 at once


def test_a_worker_waits_on_a_full_global_gate_without_spinning(wall_queue: Queue) -> None:
    wall_queue.enqueue_many([NewJob("llm") for _ in range(3)])
    gate = Gate("llm", 1, ["llm"], scope="global")
    holder = Queue(wall_queue.engine)
    held = claim(holder, Limit(gate=gate), want=1)
    assert len(held) == 1
    worker = Worker(
        Queue(wall_queue.engine), {"llm": lambda ctx: None}, gates=[gate], poll_interval_s=0.5
    )
    calls = Counter[str]()
    real = Queue.exchange

    def counting(self: Queue, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["exchange"] += 1
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Queue, "exchange", counting)
        thread = threading.Thread(target=worker.run)
        thread.start()
        time.sleep(2.0)
        assert wall_queue.count_by_status(memtree.JobStatus.DONE) == 0
        spent = calls["exchange"]
        holder.mark_done(held[0])  # the permit frees: NOTIFY wakes it on PostgreSQL
        deadline = time.monotonic() + 10
        while (
            wall_queue.count_by_status(memtree.JobStatus.DONE) < 3 and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        worker.stop()
        thread.join(30)
    assert wall_queue.count_by_status(memtree.JobStatus.DONE) == 3
    # Two seconds behind a full gate cost a claim per poll interval, not a hot loop.
    assert spent <= 8, spent


STATUS_LIMITS = [RateLimit("status-calls", 5, 60.0, ["call"], key="tenant")]


def test_status_shows_each_limits_holders_and_what_is_left(db_url: str, wall_queue: Queue) -> None:
    import json

    from click.testing import CliRunner

    from memtree.cli import main
    from memtree.tree import LLM_GATE

    wall_queue.enqueue_many([NewJob("seal", {"n": i}) for i in range(3)])
    [held] = claim(wall_queue, Limit(gate=LLM_GATE), kinds=("seal",))
    assert wall_queue.consume(STATUS_LIMITS[0], key="acme", weight=2)
    result = CliRunner().invoke(
        main,
        ["--database-url", db_url, "status", "--json", "--limits", f"{__name__}:STATUS_LIMITS"],
    )
    assert result.exit_code == 0, result.output
    limits = {row["name"]: row for row in json.loads(result.output)["limits"]}
    assert limits["llm"]["used"] == {"": 1}
    assert limits["llm"]["remaining"] == {"": 0}
    assert [h["id"] for h in limits["llm"]["holders"]] == [held.id]
    assert limits["status-calls"]["used"] == {"acme": 2}
    assert limits["status-calls"]["remaining"] == {"acme": 3}
    table = CliRunner().invoke(main, ["--database-url", db_url, "status"])
    assert table.exit_code == 0 and "fleet-wide limits" in table.output
    bad = CliRunner().invoke(main, ["--database-url", db_url, "status", "--limits", "json:dumps"])
    assert bad.exit_code != 0 and "not a Gate or RateLimit" in bad.output


def test_consume_async_in_the_applications_async_session(wall_queue: Queue, db_url: str) -> None:
    import asyncio

    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    rate = RateLimit("async-calls", 2, 60.0, ["llm"])

    async def requests() -> list[bool]:
        engine = memtree.configure_engine(create_async_engine(memtree.async_url(db_url)))
        taken = []
        try:
            for _ in range(3):
                async with AsyncSession(engine) as session, session.begin():
                    taken.append(await memtree.consume_async(session, rate))
            with pytest.raises(ConfigurationError, match=r"memtree\.consume for a Session"):
                await memtree.consume_async(Session(), rate)  # type: ignore[arg-type]
        finally:
            await engine.dispose()
        return taken

    assert asyncio.run(requests()) == [True, True, False]
    assert wall_queue.limit_state(rate).used == {"": 2}


def test_a_global_gates_permits_are_made_again_if_their_rows_are_gone(queue: Queue) -> None:
    from sqlalchemy import delete, func, select

    from memtree.models import permits

    queue.enqueue_many([NewJob("llm") for _ in range(4)])
    gate = Limit(gate=Gate("llm", 2, ["llm"], scope="global"))
    assert len(claim(queue, gate, want=1)) == 1
    with queue.engine.begin() as conn:
        conn.execute(delete(permits))  # an operator emptied the table under the worker
    taken = claim(queue, gate)
    with queue.engine.connect() as conn:
        permit_rows = select(func.count()).select_from(permits).where(permits.c.slot >= 0)
        rows = conn.execute(permit_rows).scalar_one()
    if not queue.dialect.permit_rows:
        assert rows == 0  # SQLite and MySQL count running rows: they have no permit rows
        assert len(taken) == 1
    else:
        assert rows == 2
        # The first claim's permit row is gone with the table: its job runs on, but the
        # gate's two permits are free again (a limit of 2 with 3 running, until it ends).
        assert len(taken) == 2


def test_a_kind_under_a_global_gate_and_a_rate_limit_keeps_both(
    queue: Queue, clock: FakeClock
) -> None:
    queue.enqueue_many([NewJob("llm") for _ in range(10)])
    both = Limit(
        gate=Gate("llm", 2, ["llm"], scope="global"), rate=RateLimit("calls", 3, 10.0, ["llm"])
    )
    first = claim(queue, both)
    assert len(first) == 2  # the gate binds
    for job in first:
        assert queue.mark_done(job)
    assert len(claim(queue, both)) == 1  # now the rate limit does: 3 starts in the window
    assert claim(queue, both) == []  # one permit is free, but no start is left
    clock.advance(10_000)
    assert len(claim(queue, both)) == 1  # the window rolled: the one free permit is taken
    assert claim(queue, both) == []  # and the gate is full (2 running)
