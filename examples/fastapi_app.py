"""memtree in a FastAPI application: enqueue in the request's AsyncSession, work in the lifespan.

A signup request writes its row and enqueues the welcome email in one transaction (both
commit, or neither does). The worker runs inside the application's own event loop, started
and stopped by the lifespan; its ``async def`` handler writes the email to an outbox table
through ``ctx.session``, an ``AsyncSession`` whose transaction is also the job's completion,
so each signup gets exactly one outbox row even if a handler runs twice.

The mail provider allows ``MAIL_RATE`` sends in any 2 seconds, across the whole fleet:
the worker's welcome jobs start within that budget, and a request that sends a mail
itself (``POST /signups/{id}/resend``) takes from the same budget in its own
transaction, answering 429 when there is none left.

Run it with::

    pip install 'memtree[async]' fastapi uvicorn
    uvicorn examples.fastapi_app:app

    curl -X POST localhost:8000/signups -H 'content-type: application/json' \\
         -d '{"email": "ada@example.com"}'

The queue's dashboard is mounted at ``/ops/queue/`` (read-only; with
``EXAMPLE_DASHBOARD_TOKEN`` set, retry and cancel after signing in with it). Put it
behind your own login in a real application.

``MEMTREE_DATABASE_URL`` picks the database (a SQLite file ``fastapi-example.db`` by
default; ``postgresql://...`` works the same).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import ForeignKey, String, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import memtree
from memtree import NewJob, Queue, RateLimit, Worker
from memtree.dashboard import create_app
from memtree.worker import AsyncJobContext, Handlers

DATABASE_URL = os.environ.get("MEMTREE_DATABASE_URL", "sqlite:///fastapi-example.db")


class Base(DeclarativeBase):
    pass


class Signup(Base):
    __tablename__ = "example_signups"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    welcomed: Mapped[bool] = mapped_column(default=False)


class OutboxEmail(Base):
    """What a mail relay would send: one row per welcome, written by the job."""

    __tablename__ = "example_outbox"
    id: Mapped[int] = mapped_column(primary_key=True)
    signup_id: Mapped[int] = mapped_column(ForeignKey("example_signups.id"))
    subject: Mapped[str] = mapped_column(String(200))


# The application's own async engine and sessions, built its way. On SQLite,
# memtree.configure_engine gives its connections a busy timeout, so a request waits for
# the worker's write instead of failing "database is locked".
async_engine = memtree.configure_engine(create_async_engine(memtree.async_url(DATABASE_URL)))
Sessions = async_sessionmaker(async_engine, expire_on_commit=False)

handlers = Handlers()

#: What the mail provider allows: sends in any 2 s, shared by workers and requests.
MAIL_RATE = RateLimit("mail", int(os.environ.get("EXAMPLE_MAIL_RATE", "20")), 2.0, ["send_welcome"])


@handlers.register("send_welcome")
async def send_welcome(ctx: AsyncJobContext) -> None:
    signup = await ctx.session.get(Signup, ctx.payload["signup_id"])
    if signup is None:  # the signup is gone: nothing to send
        return
    ctx.session.add(OutboxEmail(signup_id=signup.id, subject=f"Welcome, {signup.email}"))
    signup.welcomed = True


# memtree's own statements get a sync engine to the same database (no connection yet).
queue = Queue(async_engine)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    await asyncio.to_thread(queue.migrate)  # in production: `memtree db upgrade` in CI
    async with async_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with Worker(queue, handlers, gates=(), rate_limits=[MAIL_RATE], concurrency=8):
        yield
    queue.close()
    await async_engine.dispose()


app = FastAPI(lifespan=lifespan)
app.mount(
    "/ops/queue",
    create_app(queue, limits=[MAIL_RATE], token=os.environ.get("EXAMPLE_DASHBOARD_TOKEN")),
)


async def session() -> AsyncIterator[AsyncSession]:
    async with Sessions() as s:
        yield s


DbSession = Annotated[AsyncSession, Depends(session)]


class SignupIn(BaseModel):
    email: str


@app.post("/signups", status_code=201)
async def create_signup(body: SignupIn, db: DbSession) -> dict[str, object]:
    signup = Signup(email=body.email)
    db.add(signup)
    await db.flush()  # the signup's id, for the job's payload
    job_id = await memtree.enqueue_async(db, NewJob("send_welcome", {"signup_id": signup.id}))
    await db.commit()  # the signup and its job, together
    return {"id": signup.id, "job_id": job_id}


@app.post("/signups/{signup_id}/resend", status_code=201)
async def resend_welcome(signup_id: int, db: DbSession) -> dict[str, object]:
    signup = await db.get(Signup, signup_id)
    if signup is None:
        raise HTTPException(404)
    # The send and its share of the budget commit together, or neither does.
    if not await memtree.consume_async(db, MAIL_RATE):
        raise HTTPException(429, "the mail budget is spent for now")
    db.add(OutboxEmail(signup_id=signup.id, subject=f"Welcome again, {signup.email}"))
    await db.commit()
    return {"id": signup.id}


@app.get("/signups/{signup_id}")
async def read_signup(signup_id: int, db: DbSession) -> dict[str, object]:
    signup = await db.get(Signup, signup_id)
    if signup is None:
        raise HTTPException(404)
    emails = await db.scalar(
        select(func.count()).select_from(OutboxEmail).where(OutboxEmail.signup_id == signup_id)
    )
    return {"id": signup.id, "welcomed": signup.welcomed, "emails": emails}
