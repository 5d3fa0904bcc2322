"""Periodic jobs: slots of crons and intervals, DST, one enqueue per slot across threads and
processes, the missed-slot policies, the worker's ticks, the tree's flush_stale, status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, func, select

import memtree
import memtree.tree
from memtree import ConfigurationError, NewJob, Queue, Schedule, store
from memtree.models import jobs as jobs_table
from memtree.schedule import Ticker, tick
from memtree.testing import FakeClock
from memtree.tree import FLUSH_STALE_SCHEDULE, JobKind
from memtree.tree import jobs as tree_jobs

BERLIN = ZoneInfo("Europe/Berlin")
MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def utc(ms_value: int) -> datetime:
    return datetime.fromtimestamp(ms_value / 1000, tz=UTC)


def keys_count(engine: Engine) -> Counter[str]:
    """How many rows each dedupe key has, in every status."""
    with engine.connect() as conn:
        rows = conn.execute(select(jobs_table.c.dedupe_key, func.count()).group_by("dedupe_key"))
        return Counter({key: int(n) for key, n in rows})


def finish_all(queue: Queue) -> int:
    """Claim and mark done every ready job, so no dedupe key stays active."""
    done = 0
    while claimed := queue.claim_batch(100):
        for job in claimed:
            assert queue.mark_done(job)
            done += 1
    return done


# -- declaring ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cron": "61 * * * *"}, "bad cron"),
        ({"cron": "* * *"}, "bad cron"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"every": 0}, "every must be > 0"),
        ({"every": -5.0}, "every must be > 0"),
        ({"every": timedelta(0)}, "every must be > 0"),
        ({"every": float("inf")}, "every"),
        ({}, "exactly one of cron= and every="),
        ({"cron": "* * * * *", "every": 60}, "exactly one of cron= and every="),
        ({"every": 60, "timezone": "Europe/Berlin"}, "no time zone"),
        ({"every": 60, "missed": "sometimes"}, "missed"),
        ({"every": 60, "grace": -1}, "grace"),
        ({"every": 60, "payload": float("nan")}, "JSON"),
        ({"every": 60, "job": lambda slot: NewJob("k"), "payload": {"a": 1}}, "NewJob"),
    ],
)
def test_a_bad_schedule_is_refused_when_built_naming_it(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        Schedule("nightly-report", "report", **settings)  # type: ignore[arg-type]
    assert "nightly-report" in str(raised.value)


def test_a_schedule_is_a_frozen_value_with_its_policy_normalised() -> None:
    schedule = Schedule("s", "k", every=timedelta(minutes=5), missed="skip", grace=timedelta(0))
    assert schedule.every_ms == 5 * MINUTE_MS and schedule.grace_ms == 0
    assert schedule.missed is memtree.schedule.Missed.SKIP
    with pytest.raises(AttributeError):
        schedule.name = "other"  # type: ignore[misc]


# -- slots ----------------------------------------------------------------------------------


def test_interval_slots_are_anchored_to_the_epoch() -> None:
    schedule = Schedule("s", "k", every=90)
    for now in (0, 1, 89_999, 90_000, 1_780_000_000_123, 1_780_000_089_999):
        slot = schedule.slot_at(now)
        assert slot is not None and slot % 90_000 == 0 and slot <= now < slot + 90_000
        assert schedule.next_slot(now) == slot + 90_000


def test_cron_slots_are_the_latest_at_or_before_now_in_utc() -> None:
    schedule = Schedule("s", "k", cron="0 */3 * * *")
    block = ms(datetime(2026, 5, 28, 3, tzinfo=UTC))
    assert schedule.slot_at(block) == block, "a slot is due at its own instant"
    assert schedule.slot_at(block - 1) == block - 3 * HOUR_MS
    assert schedule.slot_at(block + 3 * HOUR_MS - 1) == block
    assert schedule.next_slot(block) == block + 3 * HOUR_MS
    assert schedule.next_slot(block - 1) == block


def test_a_cron_in_a_zone_fires_at_its_local_wall_time() -> None:
    schedule = Schedule("s", "k", cron="0 9 * * MON-FRI", timezone="America/New_York")
    friday_noon = ms(datetime(2026, 5, 29, 12, tzinfo=ZoneInfo("America/New_York")))
    assert utc(schedule.slot_at(friday_noon) or 0) == datetime(2026, 5, 29, 13, tzinfo=UTC)
    assert utc(schedule.next_slot(friday_noon) or 0) == datetime(2026, 6, 1, 13, tzinfo=UTC)


def test_daily_0230_in_berlin_across_dst_runs_once_each_day_as_cronsim_defines() -> None:
    """Spring forward (02:00 -> 03:00, 2026-03-29): 02:30 does not exist and the slot is at
    03:00 CEST. Fall back (03:00 -> 02:00, 2026-10-25): 02:30 happens twice and the slot
    is the first one (CEST), not the second."""
    schedule = Schedule("s", "k", cron="30 2 * * *", timezone="Europe/Berlin")

    def slots_between(start: datetime, end: datetime) -> list[datetime]:
        found, now = [], ms(start)
        while (nxt := schedule.next_slot(now)) is not None and nxt <= ms(end):
            found.append(utc(nxt))
            now = nxt
        return found

    spring = slots_between(
        datetime(2026, 3, 28, 12, tzinfo=BERLIN), datetime(2026, 3, 30, 12, tzinfo=BERLIN)
    )
    assert spring == [
        datetime(2026, 3, 29, 1, tzinfo=UTC),
        datetime(2026, 3, 30, 0, 30, tzinfo=UTC),
    ]
    autumn = slots_between(
        datetime(2026, 10, 24, 12, tzinfo=BERLIN), datetime(2026, 10, 26, 12, tzinfo=BERLIN)
    )
    assert autumn == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
    ]
    second_0230 = ms(datetime(2026, 10, 25, 2, 45, tzinfo=BERLIN, fold=1))  # 01:45 UTC
    assert utc(schedule.slot_at(second_0230) or 0) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (
            datetime(2026, 3, 28, 3, tzinfo=BERLIN),
            datetime(2026, 3, 30, 12, tzinfo=BERLIN),
            [datetime(2026, 3, 29, 1, tzinfo=UTC), datetime(2026, 3, 30, 0, 30, tzinfo=UTC)],
        ),
        (
            datetime(2026, 10, 24, 3, tzinfo=BERLIN),
            datetime(2026, 10, 26, 12, tzinfo=BERLIN),
            [datetime(2026, 10, 25, 0, 30, tzinfo=UTC), datetime(2026, 10, 26, 1, 30, tzinfo=UTC)],
        ),
    ],
    ids=["spring-forward", "fall-back"],
)
def test_ticking_through_a_dst_change_enqueues_each_days_slot_once(
    queue: Queue,
    clock: FakeClock,
    engine: Engine,
    start: datetime,
    end: datetime,
    expected: list[datetime],
) -> None:
    schedule = Schedule("berlin", "k", cron="30 2 * * *", timezone="Europe/Berlin", missed="skip")
    ticker = Ticker(schedule, interval_s=300)
    clock.set(ms(start))
    while clock.now_ms <= ms(end):
        ticker(queue)
        clock.advance(5 * MINUTE_MS)
    enqueued = sorted(utc(int(key.rsplit(":", 1)[1])) for key in keys_count(engine))
    assert enqueued == expected


# -- one enqueue per slot -------------------------------------------------------------------


def test_the_first_tick_enqueues_the_current_slot_and_records_it(
    queue: Queue, clock: FakeClock
) -> None:
    schedule = Schedule("s", "report", every=60, payload={"n": 1})
    slot = schedule.slot_at(clock.now_ms)
    assert slot is not None
    first = tick(queue, schedule)
    assert first.recorded and first.job_id is not None and first.slot_ms == slot
    job = queue.get_job(first.job_id)
    assert job is not None and job.payload == {"n": 1} and job.dedupe_key == f"schedule:s:{slot}"
    again = tick(queue, schedule)
    assert not again.recorded and again.job_id is None
    with queue.transaction() as conn:
        assert store.list_schedules(conn) == [("s", slot, clock.now_ms)]


def test_a_slot_whose_job_is_done_is_not_enqueued_again(queue: Queue, clock: FakeClock) -> None:
    """The active-dedupe index alone would take a second job once the first is done: the
    schedule's row is what fences the slot."""
    schedule = Schedule("s", "report", every=60)
    assert tick(queue, schedule).job_id is not None
    assert finish_all(queue) == 1
    assert tick(queue, schedule).job_id is None
    assert queue.count_total() == 1
    clock.advance(60_000)
    assert tick(queue, schedule).job_id is not None, "the next slot is a new job"


def test_a_known_slot_costs_no_transaction(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = Schedule("s", "k", every=60)
    ticker = Ticker(schedule, 1.0)
    assert ticker(queue).recorded
    monkeypatch.setattr(queue, "transaction", lambda: pytest.fail("a transaction ran"))
    assert not ticker(queue).recorded


def test_many_threads_with_their_own_queues_enqueue_each_slot_once(
    db_url: str, queue: Queue, engine: Engine
) -> None:
    threads_n, steps = 8, 12
    schedule = Schedule("race", "k", every=60, payload={"race": True})
    start = queue.now_ms()
    # Slot 0 is enqueued and done before the race: its key is inactive when they tick it.
    assert tick(queue, schedule).job_id is not None and finish_all(queue) == 1
    barrier = threading.Barrier(threads_n + 1)
    recorded: list[int] = []
    errors: list[BaseException] = []
    racing = threading.Event()
    racing.set()

    def ticker() -> None:
        clock = FakeClock(start)
        own = Queue(db_url, clock=clock)
        try:
            for step in range(steps):
                clock.set(start + step * 60_000)
                barrier.wait(timeout=30)
                if tick(own, schedule).recorded:
                    recorded.append(step)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            own.close()

    def finisher() -> None:
        # Jobs are done as soon as they are enqueued, so keys go inactive mid-race.
        own = Queue(db_url, clock=FakeClock(start))
        try:
            while racing.is_set():
                finish_all(own)
                time.sleep(0.005)
        finally:
            own.close()

    workers = [threading.Thread(target=ticker) for _ in range(threads_n)]
    done_thread = threading.Thread(target=finisher)
    for thread in [*workers, done_thread]:
        thread.start()
    for _ in range(steps):
        barrier.wait(timeout=30)
    for thread in workers:
        thread.join(timeout=60)
    racing.clear()
    done_thread.join(timeout=60)
    assert errors == []
    assert sorted(recorded) == list(range(1, steps)), (
        "each slot recorded by one tick, slot 0 before"
    )
    counts = keys_count(engine)
    assert counts == Counter(
        {f"schedule:race:{start // 60_000 * 60_000 + i * 60_000}": 1 for i in range(steps)}
    )


TICKER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from memtree import Queue, Schedule
    from memtree.schedule import tick
    from memtree.testing import FakeClock

    url, start, steps, gate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    clock = FakeClock(start)
    queue = Queue(url, clock=clock)
    schedule = Schedule("fleet", "k", every=60)
    gate.with_suffix(".ready." + str(__import__("os").getpid())).touch()
    while not gate.exists():
        time.sleep(0.005)
    t0 = float(gate.read_text())
    recorded = 0
    for step in range(steps):
        # Paced by the wall clock the processes share, so they tick each slot together.
        time.sleep(max(0.0, t0 + step * 0.02 - time.time()))
        clock.set(start + step * 60_000)
        for _ in range(3):
            recorded += tick(queue, schedule).recorded
        # Finish what is there, so the next process's tick of this slot meets no active key.
        while claimed := queue.claim_batch(50):
            for job in claimed:
                queue.mark_done(job)
    queue.close()
    print(recorded)
    """
)


@pytest.mark.slow
def test_processes_ticking_one_schedule_enqueue_each_slot_once(
    db_url: str, queue: Queue, engine: Engine, tmp_path: Path
) -> None:
    processes_n, steps = 3, 40
    start = queue.now_ms()
    gate = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TICKER_SCRIPT, db_url, str(start), str(steps), str(gate)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(processes_n)
    ]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("go.ready.*"))) < processes_n:
        assert time.monotonic() < deadline, "the processes did not start"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    ready = gate.with_suffix(".tmp")
    ready.write_text(str(time.time() + 0.1))
    ready.rename(gate)  # all of them start ticking at once
    recorded = 0
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        recorded += int(out.strip())
    assert recorded == steps
    first = start // 60_000 * 60_000
    assert keys_count(engine) == Counter(
        {f"schedule:fleet:{first + i * 60_000}": 1 for i in range(steps)}
    )


# -- missed slots ---------------------------------------------------------------------------


def test_run_once_enqueues_one_late_job_for_the_latest_missed_slot(
    queue: Queue, clock: FakeClock, engine: Engine
) -> None:
    schedule = Schedule("hourly", "k", cron="0 * * * *", missed="run_once")
    ten = ms(datetime(2026, 5, 28, 10, tzinfo=UTC))
    clock.set(ten + 5_000)
    assert tick(queue, schedule).job_id is not None
    clock.set(ten + 5 * HOUR_MS + 30 * MINUTE_MS)  # 15:30: 11:00 to 15:00 missed
    late = tick(queue, schedule)
    assert late.late and late.recorded and late.job_id is not None
    assert late.slot_ms == ten + 5 * HOUR_MS
    assert tick(queue, schedule).job_id is None, "once, not once per tick"
    assert sorted(keys_count(engine)) == [
        f"schedule:hourly:{ten}",
        f"schedule:hourly:{ten + 5 * HOUR_MS}",
    ]


def test_skip_records_a_missed_slot_and_runs_the_next_on_time_one(
    queue: Queue, clock: FakeClock, engine: Engine
) -> None:
    schedule = Schedule("hourly", "k", cron="0 * * * *", missed="skip", grace=30)
    ten = ms(datetime(2026, 5, 28, 10, tzinfo=UTC))
    clock.set(ten + 30_000)  # exactly the grace: on time
    assert tick(queue, schedule).job_id is not None
    clock.set(ten + 5 * HOUR_MS + 30_001)  # 15:00 seen 1 ms past its grace
    skipped = tick(queue, schedule)
    assert skipped.late and skipped.recorded and skipped.job_id is None
    clock.set(ten + 6 * HOUR_MS + 1_000)
    on_time = tick(queue, schedule)
    assert not on_time.late and on_time.job_id is not None
    assert sorted(keys_count(engine)) == [
        f"schedule:hourly:{ten}",
        f"schedule:hourly:{ten + 6 * HOUR_MS}",
    ]


def test_the_tick_interval_widens_the_grace(queue: Queue, clock: FakeClock) -> None:
    schedule = Schedule("hourly", "k", cron="0 * * * *", missed="skip", grace=0)
    clock.set(ms(datetime(2026, 5, 28, 10, 0, 2, tzinfo=UTC)))
    assert tick(queue, schedule, tick_interval_s=5).job_id is not None


@pytest.mark.parametrize(("missed", "enqueued"), [("run_once", 1), ("skip", 0)])
def test_a_new_schedules_first_slot_seen_late_follows_its_policy(
    queue: Queue, clock: FakeClock, missed: str, enqueued: int
) -> None:
    schedule = Schedule("daily", "k", cron="0 2 * * *", missed=missed)  # type: ignore[arg-type]
    clock.set(ms(datetime(2026, 5, 28, 9, tzinfo=UTC)))
    first = tick(queue, schedule)
    assert first.recorded and first.late
    assert queue.count_total() == enqueued


# -- the worker -----------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_a_worker_ticks_its_schedules_and_runs_each_slots_job(
    queue: Queue, clock: FakeClock
) -> None:
    ran: list[tuple[object, str | None]] = []
    schedule = Schedule("minutely", "report", every=60, payload={"to": "ops"})

    def report(ctx: memtree.JobContext) -> None:
        ran.append((ctx.payload, ctx.job.dedupe_key))

    worker = memtree.Worker(
        queue, {"report": report}, schedules=[schedule], schedule_tick_s=0.02, poll_interval_s=0.02
    )
    thread = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False})
    thread.start()
    try:
        first = schedule.slot_at(clock.now_ms)
        wait_for(lambda: len(ran) == 1)
        clock.advance(60_000)
        wait_for(lambda: len(ran) == 2)
        time.sleep(0.2)  # more ticks in the same slot enqueue nothing
    finally:
        worker.stop()
        thread.join(timeout=30)
    assert ran == [
        ({"to": "ops"}, f"schedule:minutely:{first}"),
        ({"to": "ops"}, f"schedule:minutely:{(first or 0) + 60_000}"),
    ]


def test_a_worker_refuses_schedules_it_cannot_run(queue: Queue) -> None:
    handlers = {"report": lambda ctx: None}
    with pytest.raises(ConfigurationError, match="no handler"):
        memtree.Worker(queue, handlers, schedules=[Schedule("s", "other", every=60)])
    twice = [Schedule("s", "report", every=60), Schedule("s", "report", cron="* * * * *")]
    with pytest.raises(ConfigurationError, match="two schedules"):
        memtree.Worker(queue, handlers, schedules=twice)
    with pytest.raises(ConfigurationError, match="schedule_tick_s"):
        memtree.Worker(queue, handlers, schedule_tick_s=0)


# -- the memory tree ------------------------------------------------------------------------


def test_flush_stale_is_a_schedule_keeping_the_crates_dedupe_key() -> None:
    block = ms(datetime(2026, 5, 28, 3, tzinfo=UTC))
    assert FLUSH_STALE_SCHEDULE.cron == "0 */3 * * *" and FLUSH_STALE_SCHEDULE.timezone == "UTC"
    assert FLUSH_STALE_SCHEDULE.slot_at(block + 2 * HOUR_MS) == block
    job = FLUSH_STALE_SCHEDULE.new_job(block)
    assert job.kind == JobKind.FLUSH_STALE
    assert job.dedupe_key == "flush_stale:2026-05-28-h1" == tree_jobs.flush_stale(block).dedupe_key


def test_a_tree_worker_ticks_flush_stale_and_dedupes_with_a_crate_job(
    tree_queue: Queue, clock: FakeClock, engine: Engine
) -> None:
    handlers = {"flush_stale": lambda ctx: None}
    worker = memtree.tree.worker(tree_queue, handlers)
    assert FLUSH_STALE_SCHEDULE in worker.schedules
    assert memtree.tree.worker(tree_queue, {"seal": lambda ctx: None}).schedules == ()
    # The crate enqueued this block's job already: the tick records the block, adds nothing.
    tree_queue.enqueue(tree_jobs.flush_stale(clock.now_ms))
    assert tick(tree_queue, FLUSH_STALE_SCHEDULE).recorded
    assert keys_count(engine) == Counter({tree_jobs.flush_stale(clock.now_ms).dedupe_key: 1})


def test_the_flush_stale_interval_is_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="FLUSH_STALE_INTERVAL_S"):
        assert memtree.tree.FLUSH_STALE_INTERVAL_S == 60.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "FLUSH_STALE_INTERVAL_S" not in memtree.tree.__all__


def test_a_tree_worker_warns_that_flush_stale_interval_s_does_nothing(queue: Queue) -> None:
    with pytest.warns(DeprecationWarning, match="flush_stale_interval_s"):
        memtree.tree.worker(queue, {"k": lambda ctx: None}, flush_stale_interval_s=60)


# -- status ---------------------------------------------------------------------------------


def test_status_shows_each_schedules_last_slot(db_url: str, queue: Queue, clock: FakeClock) -> None:
    schedule = Schedule("nightly", "k", cron="0 2 * * *")
    clock.set(ms(datetime(2026, 5, 28, 9, tzinfo=UTC)))
    tick(queue, schedule)
    env = {k: v for k, v in os.environ.items() if k != "MEMTREE_DATABASE_URL"}
    env["MEMTREE_DATABASE_URL"] = db_url
    memtree_cli = str(Path(sys.executable).parent / "memtree")
    result = subprocess.run(
        [memtree_cli, "status", "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["schedules"] == [
        {
            "name": "nightly",
            "last_slot": "2026-05-28T02:00:00.000+00:00",
            "last_slot_ms": ms(datetime(2026, 5, 28, 2, tzinfo=UTC)),
            "updated_at": "2026-05-28T09:00:00.000+00:00",
            "updated_at_ms": clock.now_ms,
        }
    ]
    shown = subprocess.run(
        [memtree_cli, "status"], capture_output=True, text=True, env=env, timeout=60
    )
    assert "nightly" in shown.stdout and "2026-05-28T02:00:00" in shown.stdout
