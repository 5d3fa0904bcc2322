"""memtree.testing and the pytest plugin, used the way an application's test suite uses them."""

from __future__ import annotations

import pytest
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import memtree
from memtree import JobFailure, JobStatus, NewJob, Queue
from memtree.testing import ANY, FakeClock, assert_enqueued, drain
from memtree.worker import Defer, Handlers, JobContext


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "testing_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(String(20), default="new")


# -- the application under test -------------------------------------------------------------

handlers = Handlers()
attempts: list[int] = []


def pay(session: Session, order_id: int) -> None:
    session.add(Order(id=order_id, state="paid"))
    memtree.enqueue(
        session, NewJob("send_receipt", {"order_id": order_id}, dedupe_key=f"receipt:{order_id}")
    )


@handlers.register("send_receipt")
def send_receipt(ctx: JobContext) -> Defer | None:
    attempts.append(ctx.job.attempts)
    if len(attempts) == 1:
        raise JobFailure.transient("smtp_down")  # retried after a minute of backoff
    if len(attempts) == 2:
        return Defer(delay_ms=3_600_000, reason="quiet hours")
    order = ctx.session.get_one(Order, ctx.payload["order_id"])
    order.state = "receipted"
    ctx.enqueue(NewJob("audit", {"order_id": order.id}))
    return None


handlers.register("audit")(lambda ctx: None)


# -- the example test, as in docs/testing.md --------------------------------------------------


def test_paying_sends_a_receipt_despite_a_retry_and_a_deferral(
    memtree_queue: Queue, memtree_clock: FakeClock
) -> None:
    attempts.clear()
    Base.metadata.create_all(memtree_queue.engine)
    with Session(memtree_queue.engine) as session, session.begin():
        pay(session, 42)
        assert_enqueued(session, kind="send_receipt", payload={"order_id": 42})
    start = memtree_clock.now_ms
    assert drain(memtree_queue, handlers) == 4, "receipt x3 (fail, defer, done) and the audit"
    assert memtree_clock.now_ms >= start + 3_600_000, "the clock jumped past the deferral"
    with Session(memtree_queue.engine) as session:
        assert session.get_one(Order, 42).state == "receipted"
    assert_enqueued(memtree_queue, kind="audit", status=JobStatus.DONE)
    assert attempts == [1, 2, 2]


def test_assert_enqueued_reports_what_is_there(memtree_queue: Queue) -> None:
    memtree_queue.enqueue(NewJob("a", {"x": 1}, dedupe_key="k"))
    assert len(assert_enqueued(memtree_queue, kind="a", dedupe_key="k", payload=ANY)) == 1
    with pytest.raises(AssertionError, match=r'a \{"x":1\}'):
        assert_enqueued(memtree_queue, kind="a", payload={"x": 2})
    with pytest.raises(AssertionError, match="none"):
        assert_enqueued(memtree_queue.engine, kind="b")


def test_drain_without_a_fake_clock_stops_at_the_first_scheduled_job(
    wall_queue: Queue,
) -> None:
    wall_queue.enqueue(NewJob("audit"))
    wall_queue.enqueue(NewJob("audit", available_at_ms=wall_queue.now_ms() + 3_600_000))
    assert drain(wall_queue, {"audit": lambda ctx: None}) == 1
    assert wall_queue.count_by_status(JobStatus.READY) == 1


def test_drain_gives_up_on_a_job_that_loops_forever(memtree_queue: Queue) -> None:
    memtree_queue.enqueue(NewJob("loop"))
    with pytest.raises(AssertionError, match="looping"):
        drain(memtree_queue, {"loop": lambda ctx: Defer(delay_ms=1)}, max_rounds=20)
