"""The demo's handlers: ``extract_chunk``, ``append_buffer``, ``seal`` and ``flush_stale``.

Every handler writes through ``ctx.session``, so its writes, its follow-up jobs and its
completion commit together.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy import update as sql_update
from sqlalchemy.orm import Session

from memtree.tree import jobs
from memtree.tree.demo.database import (
    DemoBuffer,
    DemoChunk,
    DemoSummary,
    DemoTree,
    node_ref,
    node_texts,
    parse_ref,
)
from memtree.tree.demo.llm import (
    llm_extract,
    llm_rate_limit_ms,
    llm_summarise,
    llm_times_out,
    llm_wait_for_timeout,
)
from memtree.tree.kinds import JobKind
from memtree.tree.payloads import (
    AppendBufferPayload,
    ExtractChunkPayload,
    FlushStalePayload,
    Leaf,
    SealPayload,
    SourceTarget,
    Summary,
)
from memtree.types import JobFailure
from memtree.worker import Defer, Handlers, JobContext

__all__ = ["FANOUT", "HandlerStats", "build_handlers"]

#: Nodes per summary: a buffer holding this many is sealed into one node a level up.
FANOUT = 4


@dataclass
class HandlerStats:
    """What the demo's handlers did, counted as they did it (threads share it)."""

    deferrals: int = 0
    transient_failures: int = 0
    seal_requests: int = 0
    #: Jobs under the (global) llm gate running now, and the most that ever ran at once.
    gated_running: int = 0
    gated_peak: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def gated(self) -> Iterator[None]:
        with self._lock:
            self.gated_running += 1
            self.gated_peak = max(self.gated_peak, self.gated_running)
        try:
            yield
        finally:
            with self._lock:
                self.gated_running -= 1

    def add(self, *, deferrals: int = 0, transient_failures: int = 0, seals: int = 0) -> None:
        with self._lock:
            self.deferrals += deferrals
            self.transient_failures += transient_failures
            self.seal_requests += seals


@contextmanager
def _read(ctx: JobContext) -> Iterator[Session]:
    """A short session of its own, outside the job's settlement transaction.

    The stand-in LLM is called between this read and the settlement, and nothing of the
    settlement transaction should be open while the model thinks. (``ctx.session`` would
    do here too: on SQLite it begins its transaction only at its first write or
    ``FOR UPDATE`` read, which the handlers below make after the model call.)
    """
    with Session(ctx.queue.engine) as session:
        yield session


def _buffer(session: Session, tree_id: str, level: int, now_ms: int) -> DemoBuffer:
    """The buffer row of a level, locked for this transaction (made if it is new).

    ``FOR UPDATE`` matters on PostgreSQL, where appends to one buffer run concurrently;
    on SQLite the transaction already holds the database's write lock.
    """
    found = session.scalars(
        select(DemoBuffer)
        .where(DemoBuffer.tree_id == tree_id, DemoBuffer.level == level)
        .with_for_update()
    ).one_or_none()
    if found is None:
        found = DemoBuffer(tree_id=tree_id, level=level, items_json="[]", updated_at_ms=now_ms)
        found.seal_requests = 0
        session.add(found)
        session.flush()
    return found


def _buffers(session: Session, tree_id: str) -> list[DemoBuffer]:
    return list(
        session.scalars(
            select(DemoBuffer)
            .where(DemoBuffer.tree_id == tree_id)
            .order_by(DemoBuffer.level)
            .with_for_update()
        )
    )


def _request_seal(
    ctx: JobContext, stats: HandlerStats, buffer: DemoBuffer, force_now_ms: int | None = None
) -> None:
    ctx.enqueue(jobs.seal(buffer.tree_id, buffer.level, force_now_ms))
    buffer.seal_requests += 1
    stats.add(seals=1)


def _extract_chunk(ctx: JobContext, stats: HandlerStats) -> Defer | None:
    chunk_id = ExtractChunkPayload.from_wire(ctx.payload).chunk_id
    with _read(ctx) as session:
        chunk = session.get(DemoChunk, chunk_id)
        if chunk is None:
            raise JobFailure.unrecoverable("chunk_missing")
        if chunk.extracted_at_ms is not None:
            return None  # already extracted (and its append enqueued with it)
        text, deferrals = chunk.text, chunk.deferrals
    if ctx.job.attempts == 1 and llm_times_out(chunk_id):
        llm_wait_for_timeout(chunk_id)
        stats.add(transient_failures=1)
        raise JobFailure.transient("llm_timeout")
    delay_ms = llm_rate_limit_ms(chunk_id)
    if delay_ms is not None and deferrals == 0:
        # A deferral rolls the settlement session back, so "seen once" is committed on
        # its own: the next run of this job finds it and does not defer again.
        with Session(ctx.queue.engine) as session, session.begin():
            session.execute(
                sql_update(DemoChunk)
                .where(DemoChunk.id == chunk_id)
                .values(deferrals=DemoChunk.deferrals + 1)
            )
        stats.add(deferrals=1)
        return Defer(delay_ms=delay_ms, reason="rate limited")
    entities = llm_extract(chunk_id, text)
    chunk = ctx.session.get(DemoChunk, chunk_id)
    assert chunk is not None  # chunks are never deleted
    chunk.entities_json = json.dumps(entities)
    chunk.extracted_at_ms = ctx.now_ms()
    ctx.enqueue(jobs.append_buffer(Leaf(chunk_id), SourceTarget(chunk.tree_id)))
    return None


def _append_buffer(ctx: JobContext, stats: HandlerStats) -> None:
    payload = AppendBufferPayload.from_wire(ctx.payload)
    if not isinstance(payload.target, SourceTarget):
        raise JobFailure.unrecoverable("unsupported_target")  # the demo has no topic trees
    tree_id, session, now = payload.target.source_id, ctx.session, ctx.now_ms()
    level = 0
    if isinstance(payload.node, Summary):
        summary = session.get(DemoSummary, payload.node.summary_id)
        if summary is None:
            raise JobFailure.unrecoverable("summary_missing")
        level = summary.level
    buffer = _buffer(session, tree_id, level, now)
    items, ref = buffer.items, node_ref(payload.node)
    if ref in items:
        return  # appended already: appends are idempotent
    buffer.items = [*items, ref]
    buffer.updated_at_ms = now
    # A new open node means the tree has no single root until the next flush.
    session.execute(sql_update(DemoTree).where(DemoTree.id == tree_id).values(root_ref=None))
    if len(items) + 1 >= FANOUT:
        # Several appends can fill one buffer before its seal runs: each asks, and the
        # queue keeps one active seal:{tree}:{level} job.
        _request_seal(ctx, stats, buffer)


def _seal(ctx: JobContext, stats: HandlerStats) -> None:
    payload = SealPayload.from_wire(ctx.payload)
    tree_id, level = payload.tree_id, payload.level
    with _read(ctx) as session:
        tree = session.get(DemoTree, tree_id)
        if tree is None:
            raise JobFailure.unrecoverable("tree_missing")
        # A flush in progress makes every seal of the tree a forced one: its follow-up
        # seal may have been deduped into a plain seal already queued for that level.
        flush_ms = (
            payload.force_now_ms if payload.force_now_ms is not None else tree.flush_requested_ms
        )
        buffer = session.get(DemoBuffer, (tree_id, level))
        items = buffer.items if buffer is not None else []
        if flush_ms is not None:
            take = items if len(items) >= 2 else []
        else:
            take = items[:FANOUT] if len(items) >= FANOUT else []
        texts = node_texts(session, take)
    summary_id = hashlib.sha256(f"{tree_id}|{level}|{'|'.join(take)}".encode()).hexdigest()[:20]
    text = llm_summarise(summary_id, texts) if take else ""

    session, now = ctx.session, ctx.now_ms()
    buffer = _buffer(session, tree_id, level, now)
    upper: DemoBuffer | None = None
    if take:
        if buffer.items[: len(take)] != take:
            # Sealed or reshuffled since the snapshot: run again on what is there now.
            raise JobFailure.transient("buffer_changed")
        summary = DemoSummary(
            id=summary_id,
            tree_id=tree_id,
            level=level + 1,
            text=text,
            child_count=len(take),
            created_at_ms=now,
        )
        session.add(summary)
        leaves = [parse_ref(r) for r in take]
        chunk_ids = [n.chunk_id for n in leaves if isinstance(n, Leaf)]
        summary_ids = [n.summary_id for n in leaves if isinstance(n, Summary)]
        session.execute(
            sql_update(DemoChunk).where(DemoChunk.id.in_(chunk_ids)).values(parent_id=summary_id)
        )
        session.execute(
            sql_update(DemoSummary)
            .where(DemoSummary.id.in_(summary_ids))
            .values(parent_id=summary_id)
        )
        buffer.items = buffer.items[len(take) :]
        buffer.updated_at_ms = now
        # The summary joins the level above in this same transaction, not through an
        # append_buffer job: the seal and the append commit together or not at all.
        upper = _buffer(session, tree_id, level + 1, now)
        upper.items = [*upper.items, node_ref(Summary(summary_id))]
        upper.updated_at_ms = now
    if flush_ms is not None:
        _continue_flush(ctx, stats, session, tree_id, level, flush_ms)
        return
    if len(buffer.items) >= FANOUT:
        _request_seal(ctx, stats, buffer)
    if upper is not None and len(upper.items) >= FANOUT:
        _request_seal(ctx, stats, upper)


def _continue_flush(
    ctx: JobContext, stats: HandlerStats, session: Session, tree_id: str, level: int, flush_ms: int
) -> None:
    """One step of a flush: lift a lone node at ``level``, then seal the next level up,
    until the tree has one open node, its root."""
    buffers = {b.level: b for b in _buffers(session, tree_id)}
    open_nodes = sum(len(b.items) for b in buffers.values())
    here = buffers.get(level)
    if here is not None and len(here.items) == 1 and open_nodes > 1:
        upper = buffers.get(level + 1) or _buffer(session, tree_id, level + 1, ctx.now_ms())
        upper.items = [*upper.items, *here.items]
        here.items = []
        buffers[level + 1] = upper
    tree = session.get(DemoTree, tree_id)
    assert tree is not None
    if open_nodes <= 1:
        tree.flush_requested_ms = None
        tree.root_ref = next((i for b in buffers.values() for i in b.items), None)
        return
    lowest = min(b.level for b in buffers.values() if b.items)
    tree.flush_requested_ms = flush_ms
    _request_seal(ctx, stats, buffers[lowest], flush_ms)


def _flush_stale(ctx: JobContext, stats: HandlerStats) -> None:
    payload = FlushStalePayload.from_wire(ctx.payload)
    max_age_ms = (3600 if payload.max_age_secs is None else payload.max_age_secs) * 1000
    session, now = ctx.session, ctx.now_ms()
    for tree in session.scalars(select(DemoTree).order_by(DemoTree.id)).all():
        buffers = _buffers(session, tree.id)
        if not any(b.items and now - b.updated_at_ms >= max_age_ms for b in buffers):
            continue
        # Seal from the bottom: each seal adds a node to the level above, so the flush
        # walks up one level per job (see _continue_flush) instead of sealing every
        # level at once and finding new work above afterwards.
        _continue_flush(ctx, stats, session, tree.id, -1, now)


def _counted(
    handler: Callable[[JobContext, HandlerStats], Any], stats: HandlerStats
) -> Callable[[JobContext], Any]:
    """``handler`` counted as a run under the llm gate while it runs."""

    def run(ctx: JobContext) -> Any:
        with stats.gated():
            return handler(ctx, stats)

    return run


def build_handlers(stats: HandlerStats) -> Handlers:
    """The demo's kind -> handler mapping; ``stats`` counts what the handlers do."""
    handlers = Handlers()
    handlers.register(JobKind.EXTRACT_CHUNK)(_counted(_extract_chunk, stats))
    handlers.register(JobKind.APPEND_BUFFER)(functools.partial(_append_buffer, stats=stats))
    handlers.register(JobKind.SEAL)(_counted(_seal, stats))
    handlers.register(JobKind.FLUSH_STALE)(functools.partial(_flush_stale, stats=stats))
    return handlers
