"""memtree inside the application's own session objects: a real Flask + Flask-SQLAlchemy
app driven through its test client, ``scoped_session`` and ``async_scoped_session``,
and sessions of the wrong kind refused where they are passed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy
from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker
from sqlalchemy.pool import NullPool

import memtree
from memtree import ConfigurationError, JobStatus, NewJob, Queue, Worker
from memtree.worker import JobContext
from tests.test_transactional import _async_url


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Order(db.Model):  # type: ignore[name-defined, misc]
    __tablename__ = "flask_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str] = mapped_column(String(100))
    receipt_sent: Mapped[bool] = mapped_column(default=False)


def flask_app(db_url: str) -> tuple[Flask, SQLAlchemy, Any]:
    """A Flask app the way its own developers write one: Flask-SQLAlchemy owns the engine."""
    app = Flask("shop")
    app.config["SQLALCHEMY_DATABASE_URI"] = db_url
    db.init_app(app)

    @app.post("/orders")
    def create_order() -> Any:
        order = Order(note=request.json["note"])  # type: ignore[index]
        db.session.add(order)
        db.session.flush()
        job_id = memtree.enqueue(
            db.session, NewJob("send_receipt", {"order_id": order.id}, f"receipt:{order.id}")
        )
        if request.json.get("fail"):  # type: ignore[union-attr]
            raise RuntimeError("the payment provider said no")
        db.session.commit()
        return jsonify(order_id=order.id, job_id=job_id)

    @app.post("/orders/<int:order_id>/settle")
    def settle_by_hand(order_id: int) -> Any:
        # A request that settles a job it claimed in the same transaction as its writes.
        queue = Queue(db.engine)
        job = queue.claim_next(kinds=["send_receipt"])
        assert job is not None and job.payload["order_id"] == order_id
        db.session.get(Order, order_id).receipt_sent = True
        settled = memtree.mark_done(db.session, job, [NewJob("notify", {"order_id": order_id})])
        db.session.commit()
        return jsonify(settled=settled)

    return app, db, Order


@pytest.fixture
def flask_db_url(db_url: str) -> str:
    return memtree.engine.normalize_url(db_url).render_as_string(hide_password=False)


def test_a_flask_request_enqueues_in_its_own_transaction_and_its_rollback_drops_the_job(
    flask_db_url: str,
) -> None:
    app, db, order_model = flask_app(flask_db_url)
    app.config["TESTING"] = False  # errors become 500s, as in production
    with app.app_context():
        db.create_all()
        queue = Queue(db.engine)  # the application's own engine, built by Flask-SQLAlchemy
        queue.migrate()
    client = app.test_client()

    paid = client.post("/orders", json={"note": "paid"})
    assert paid.status_code == 200, paid.text
    doomed = client.post("/orders", json={"note": "doomed", "fail": True})
    assert doomed.status_code == 500

    with app.app_context():
        notes = list(db.session.scalars(select(order_model.note)))
        jobs = queue.list_jobs()
    assert notes == ["paid"]
    assert [(job.kind, job.payload) for job in jobs] == [
        ("send_receipt", {"order_id": paid.json["order_id"]})  # type: ignore[index]
    ]

    settled = client.post(f"/orders/{paid.json['order_id']}/settle")  # type: ignore[index]
    assert settled.json == {"settled": True}
    with app.app_context():
        assert db.session.get(order_model, paid.json["order_id"]).receipt_sent  # type: ignore[index]
        assert queue.count_by_status(JobStatus.DONE) == 1
        assert [job.kind for job in queue.list_jobs(status=JobStatus.READY)] == ["notify"]
        db.session.remove()
        db.engine.dispose()


def test_a_worker_on_flask_sqlalchemys_engine_settles_with_the_handlers_writes(
    flask_db_url: str,
) -> None:
    app, db, order_model = flask_app(flask_db_url)
    with app.app_context():
        db.create_all()
        queue = Queue(db.engine)
        queue.migrate()
    client = app.test_client()
    order_id = client.post("/orders", json={"note": "paid"}).json["order_id"]  # type: ignore[index]

    def send_receipt(ctx: JobContext) -> None:
        ctx.session.get(order_model, ctx.payload["order_id"]).receipt_sent = True

    with app.app_context():
        worker = Worker(queue, {"send_receipt": send_receipt}, gates=())
        assert worker.run_until_idle() == 1
        assert db.session.get(order_model, order_id).receipt_sent
        db.session.remove()
        db.engine.dispose()


def test_every_free_function_takes_a_scoped_session(db_url: str) -> None:
    engine = memtree.create_engine(db_url)
    queue = Queue(engine)
    queue.migrate()
    session = scoped_session(sessionmaker(bind=engine))
    try:
        first = memtree.enqueue(session, NewJob("k", {"n": 1}))
        ids = memtree.enqueue_many(session, [NewJob("k", {"n": 2}), NewJob("k", {"n": 3})])
        session.rollback()
        assert queue.count_total() == 0, "a rolled-back scoped session leaves no job"

        first = memtree.enqueue(session, NewJob("k", {"n": 1}))
        ids = memtree.enqueue_many(session, [NewJob("k", {"n": 2}), NewJob("k", {"n": 3})])
        session.commit()
        assert first is not None and all(ids)
        job = queue.claim_next()
        assert job is not None
        assert memtree.mark_done(session, job, [NewJob("after")])
        session.commit()
        assert queue.count_by_status(JobStatus.DONE) == 1
        assert queue.count_by_status(JobStatus.READY) == 3
    finally:
        session.remove()
        engine.dispose()


def test_enqueue_async_takes_an_async_scoped_session(db_url: str) -> None:
    queue = Queue(memtree.create_engine(db_url))
    queue.migrate()

    async def scenario() -> None:
        async_engine = create_async_engine(_async_url(db_url))
        factory = async_sessionmaker(async_engine, class_=AsyncSession)
        session = async_scoped_session(factory, scopefunc=asyncio.current_task)
        try:
            assert await memtree.enqueue_async(session, NewJob("k", {"n": 1})) is not None
            await session.rollback()
            assert await memtree.enqueue_async(session, NewJob("k", {"n": 2})) is not None
            await session.commit()
        finally:
            await session.remove()
            await async_engine.dispose()

    asyncio.run(scenario())
    assert [job.payload for job in queue.list_jobs()] == [{"n": 2}]
    queue.engine.dispose()


def test_a_session_of_the_wrong_kind_is_refused_where_it_is_passed(db_url: str) -> None:
    engine = memtree.create_engine(db_url)
    Queue(engine).migrate()
    try:
        with pytest.raises(ConfigurationError, match=r"not an Engine .*Queue\(engine\)\.enqueue"):
            memtree.enqueue(engine, NewJob("k"))  # type: ignore[arg-type]
        async_engine = create_async_engine(_async_url(db_url))
        with pytest.raises(ConfigurationError, match=r"use memtree\.enqueue_async"):
            memtree.enqueue(AsyncSession(async_engine), NewJob("k"))  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"use memtree\.enqueue for a Session"):
            asyncio.run(
                memtree.enqueue_async(sessionmaker(bind=engine)(), NewJob("k"))  # type: ignore[arg-type]
            )
        asyncio.run(async_engine.dispose())
        with pytest.raises(ConfigurationError, match="not str"):
            memtree.mark_done("session", None)  # type: ignore[arg-type]
    finally:
        engine.dispose()


def test_a_fastapi_dependency_session_enqueues_with_the_request_sync_and_async(
    flask_db_url: str,
) -> None:
    """A FastAPI app whose endpoints get their session from a dependency (sync) and an
    ``AsyncSession`` from another (async): each enqueue commits with the request's writes
    or rolls back with them."""
    from collections.abc import AsyncIterator, Iterator

    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.testclient import TestClient
    from sqlalchemy.orm import Session

    engine = sqlalchemy.create_engine(flask_db_url)
    Base.metadata.create_all(engine, tables=[Order.__table__])
    queue = Queue(engine)
    queue.migrate()
    # The TestClient serves the app on a loop of its own, gone before the engine is
    # disposed: no pool, so no connection outlives the loop it was made on (aiomysql
    # cannot close one from another loop).
    async_engine = create_async_engine(_async_url(flask_db_url), poolclass=NullPool)
    async_factory = async_sessionmaker(async_engine)

    def get_session() -> Iterator[Session]:
        with Session(engine) as session, session.begin():
            yield session

    async def get_async_session() -> AsyncIterator[AsyncSession]:
        async with async_factory() as session, session.begin():
            yield session

    api = FastAPI()

    @api.post("/orders/{note}")
    def create(note: str, session: Session = Depends(get_session)) -> dict[str, Any]:  # noqa: B008
        session.add(Order(note=note))
        job_id = memtree.enqueue(session, NewJob("send_receipt", {"note": note}))
        if note == "doomed":
            raise HTTPException(status_code=402, detail="payment refused")
        return {"job_id": job_id}

    @api.post("/async-orders/{note}")
    async def create_async(
        note: str,
        session: AsyncSession = Depends(get_async_session),  # noqa: B008
    ) -> dict[str, Any]:
        session.add(Order(note=note))
        job_id = await memtree.enqueue_async(session, NewJob("send_receipt", {"note": note}))
        if note == "doomed-async":
            raise HTTPException(status_code=402, detail="payment refused")
        return {"job_id": job_id}

    try:
        with TestClient(api) as client:
            assert client.post("/orders/paid").status_code == 200
            assert client.post("/orders/doomed").status_code == 402
            assert client.post("/async-orders/paid-async").status_code == 200
            assert client.post("/async-orders/doomed-async").status_code == 402
        with Session(engine) as session:
            notes = sorted(session.scalars(select(Order.note)))
        assert notes == ["paid", "paid-async"]
        assert sorted(job.payload["note"] for job in queue.list_jobs()) == notes
    finally:
        asyncio.run(async_engine.dispose())
        engine.dispose()
