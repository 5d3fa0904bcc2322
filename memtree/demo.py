"""``memtree demo``: the memory tree's own pipeline, end to end, on a fresh SQLite file.

The demo owns three things and nothing else:

- **Its database.** A SQLite file (``memtree-demo.db`` in the current directory by
  default) that it deletes and rebuilds on every run: memtree's ``mem_tree_jobs`` table
  (migrated as ``memtree db upgrade`` would) plus the demo's own ``demo_*`` tables for
  trees, chunks, summaries and buffers. It refuses to delete a file that holds anything
  else. An explicit PostgreSQL URL runs the demo in a schema of its own,
  ``memtree_demo``, which it drops and recreates; the application's tables are never read.
- **Its handlers.** ``extract_chunk``, ``append_buffer``, ``seal`` and ``flush_stale``
  built on a deterministic stand-in LLM that is slow, sometimes times out and
  sometimes asks to be called later, so the run shows retries, deferrals and dedupe.
- **Its corpus.** A few short notes shipped in :mod:`memtree.demo_corpus`, or any
  directory of ``.txt`` files.

The pipeline is the original's: ingest writes chunks and enqueues ``extract_chunk`` in
the same transaction; extraction appends each leaf to its source tree's level-0
buffer; a buffer holding ``FANOUT`` nodes is sealed into a summary one level up; at the
end ``flush_stale`` seals what is left open until every tree has exactly one root.
Every handler writes through ``ctx.session``, so its writes, its follow-up jobs and its
completion commit together.

:func:`run_demo` does it all and returns a :class:`DemoReport`; ``memtree demo`` calls it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import shlex
import sqlite3
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import sqlalchemy
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine, ForeignKey, Integer, String, case, func, select
from sqlalchemy import Text as SqlText
from sqlalchemy import update as sql_update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import memtree
from memtree.errors import MemtreeError
from memtree.models import MemTreeJob
from memtree.payloads import (
    AppendBufferPayload,
    ExtractChunkPayload,
    FlushStalePayload,
    Leaf,
    NodeRef,
    SealPayload,
    SourceTarget,
    Summary,
)
from memtree.queue import Queue
from memtree.types import JobFailure, JobKind, NewJob
from memtree.worker import Defer, Handlers, JobContext, Worker

__all__ = [
    "DEFAULT_DB",
    "FANOUT",
    "DemoError",
    "DemoReport",
    "build_handlers",
    "chunk_id",
    "chunk_text",
    "run_demo",
]

#: The demo's SQLite file when ``--db`` is not given, relative to the current directory.
DEFAULT_DB = "memtree-demo.db"
#: Nodes per summary: a buffer holding this many is sealed into one node a level up.
FANOUT = 4
#: Target words per chunk; a paragraph is split into pieces of at most this many.
CHUNK_WORDS = 40
#: One chunk in this many times out on its first extraction attempt (a transient failure).
FAIL_ONE_IN = 10
#: One chunk in this many is rate limited on first sight (a deferral, not an attempt).
DEFER_ONE_IN = 10
#: The stand-in LLM's latency per call, in milliseconds (inclusive range).
LLM_LATENCY_MS = (1, 5)
# memtree's default first retry waits a minute; the demo's stand-in times out for a
# moment, so it retries after a tenth of a second and keeps the run short.
RETRY_BASE_MS = 100
RETRY_CAP_MS = 1_000
#: A run that has not finished after this long is a bug, not a slow machine.
DEADLINE_S = 120.0
#: The PostgreSQL schema the demo owns when it is given an explicit PostgreSQL URL.
PG_SCHEMA = "memtree_demo"

log = logging.getLogger("memtree.demo")


class DemoError(MemtreeError):
    """The demo cannot run as asked (a file it will not delete, an empty corpus, ...)."""


# -- the demo's tables ---------------------------------------------------------------------


class DemoBase(DeclarativeBase):
    """The demo's own declarative base: its tables are not memtree's and never migrated."""


class DemoTree(DemoBase):
    """One source tree: the notes of one corpus file."""

    __tablename__ = "demo_trees"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    source: Mapped[str] = mapped_column(String(500))
    # Set while a flush collapses the tree: every seal of the tree then seals what it
    # finds, even a seal enqueued as a plain one (see _seal).
    flush_requested_ms: Mapped[int | None] = mapped_column(sqlalchemy.BigInteger)
    #: The root the last flush left (a node ref such as ``summary:…``).
    root_ref: Mapped[str | None] = mapped_column(String(300))


class DemoChunk(DemoBase):
    """A leaf: one piece of a note, keyed by a hash of its text."""

    __tablename__ = "demo_chunks"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tree_id: Mapped[str] = mapped_column(ForeignKey("demo_trees.id"))
    seq: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(SqlText)
    entities_json: Mapped[str | None] = mapped_column(SqlText)
    extracted_at_ms: Mapped[int | None] = mapped_column(sqlalchemy.BigInteger)
    # How often extraction was told "later": kept on the row, because a deferring
    # handler's session is rolled back and the next run must know it was seen.
    deferrals: Mapped[int] = mapped_column(Integer, default=0)
    parent_id: Mapped[str | None] = mapped_column(String(64))


class DemoSummary(DemoBase):
    """A sealed node at ``level`` >= 1, summarising its children."""

    __tablename__ = "demo_summaries"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tree_id: Mapped[str] = mapped_column(ForeignKey("demo_trees.id"))
    level: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(SqlText)
    child_count: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[str | None] = mapped_column(String(64))
    created_at_ms: Mapped[int] = mapped_column(sqlalchemy.BigInteger)


class DemoBuffer(DemoBase):
    """The open nodes of one tree level, oldest first, waiting to be sealed."""

    __tablename__ = "demo_buffers"
    tree_id: Mapped[str] = mapped_column(ForeignKey("demo_trees.id"), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    items_json: Mapped[str] = mapped_column(SqlText, default="[]")
    updated_at_ms: Mapped[int] = mapped_column(sqlalchemy.BigInteger)
    # Seal jobs asked for at this level, counted in the transaction that asks, so the
    # count commits exactly when the request does; minus the seal rows in the queue,
    # it is how many requests the dedupe key suppressed.
    seal_requests: Mapped[int] = mapped_column(Integer, default=0)

    @property
    def items(self) -> list[str]:
        items: list[str] = json.loads(self.items_json)
        return items

    @items.setter
    def items(self, value: Sequence[str]) -> None:
        self.items_json = json.dumps(list(value))


def node_ref(node: NodeRef) -> str:
    """A node as it sits in a buffer: ``leaf:<chunk id>`` or ``summary:<summary id>``."""
    return node.dedupe_fragment()


def parse_ref(ref: str) -> NodeRef:
    kind, _, ident = ref.partition(":")
    return Leaf(ident) if kind == "leaf" else Summary(ident)


# -- the corpus ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    id: str
    name: str
    text: str


def chunk_text(text: str, max_words: int = CHUNK_WORDS) -> list[str]:
    """Paragraphs (blank-line separated), each split into even pieces of <= ``max_words``.

    Pieces never cross a paragraph, so a paragraph repeated anywhere in the corpus
    yields the very same chunks, and so the same chunk ids.
    """
    pieces: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        words = paragraph.split()
        if not words:
            continue
        count = math.ceil(len(words) / max_words)
        size = math.ceil(len(words) / count)
        pieces.extend(" ".join(words[i : i + size]) for i in range(0, len(words), size))
    return pieces


def chunk_id(text: str) -> str:
    """A content hash: the same text is the same chunk, wherever it appears."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _source_id(name: str) -> str:
    stem = name.rsplit(".", 1)[0].lower()
    return re.sub(r"[^a-z0-9]+", "-", stem).strip("-") or "source"


def load_corpus(corpus: str | None) -> list[Source]:
    """The ``.txt`` files of ``corpus`` (a directory), or the built-in notes; by name."""
    if corpus is None:
        root = resources.files("memtree.demo_corpus")
        files = [
            (entry.name, entry.read_text(encoding="utf-8"))
            for entry in root.iterdir()
            if entry.name.endswith(".txt")
        ]
        where = "the built-in corpus"
    else:
        directory = Path(corpus)
        if not directory.is_dir():
            raise DemoError(f"--corpus {corpus}: not a directory")
        files = [
            (path.name, path.read_text(encoding="utf-8", errors="replace"))
            for path in directory.iterdir()
            if path.suffix == ".txt" and path.is_file()
        ]
        where = str(directory)
    sources: list[Source] = []
    taken: set[str] = set()
    for name, text in sorted(files):
        ident = base = _source_id(name)
        n = 1
        while ident in taken:  # notes.txt and Notes.txt are two trees
            n += 1
            ident = f"{base}-{n}"
        taken.add(ident)
        sources.append(Source(ident, name, text))
    if not sources:
        raise DemoError(f"no .txt files in {where}")
    return sources


# -- the stand-in LLM ----------------------------------------------------------------------

_STOPWORDS = frozenset(
    {
        "about",
        "above",
        "after",
        "again",
        "along",
        "always",
        "another",
        "because",
        "before",
        "below",
        "being",
        "between",
        "could",
        "every",
        "first",
        "found",
        "going",
        "might",
        "never",
        "other",
        "their",
        "there",
        "these",
        "those",
        "though",
        "three",
        "through",
        "under",
        "until",
        "where",
        "which",
        "while",
        "would",
        "still",
        "since",
    }
)


def _seed(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _think(seed: int) -> None:
    low, high = LLM_LATENCY_MS
    time.sleep((low + seed % (high - low + 1)) / 1000)


def _keywords(text: str, limit: int) -> list[str]:
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z'-]*[A-Za-z]", text)]
    counts = Counter(w for w in words if len(w) >= 5 and w not in _STOPWORDS)
    # Ties go by a hash, not the alphabet, so a summary is not all words in "a".
    return sorted(counts, key=lambda w: (-counts[w], _seed(w)))[:limit]


def llm_times_out(chunk: str) -> bool:
    """Whether the stand-in times out on this chunk's first attempt (seeded by its id)."""
    return _seed(chunk) % FAIL_ONE_IN == 0


def llm_rate_limit_ms(chunk: str) -> int | None:
    """How long the stand-in asks to wait on first sight of this chunk, if it does."""
    seed = _seed(f"rate:{chunk}")
    return 50 + seed % 101 if seed % DEFER_ONE_IN == 0 else None


def llm_extract(chunk: str, text: str) -> list[str]:
    """The chunk's "entities": its most frequent long words, after a model-like pause."""
    _think(_seed(chunk))
    return _keywords(text, 4)


def llm_summarise(key: str, texts: Sequence[str]) -> str:
    """A summary: the children's most frequent long words (a summary's children are
    summaries too, so the words climb the tree)."""
    _think(_seed(key))
    return ", ".join(_keywords(" ".join(texts), 6))


# -- handlers ------------------------------------------------------------------------------


@dataclass
class HandlerStats:
    """What the demo's handlers did, counted as they did it (threads share it)."""

    deferrals: int = 0
    transient_failures: int = 0
    seal_requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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
    ctx.enqueue(NewJob.seal(buffer.tree_id, buffer.level, force_now_ms))
    buffer.seal_requests += 1
    stats.add(seals=1)


def _texts(session: Session, refs: Iterable[str]) -> list[str]:
    texts: list[str] = []
    for ref in refs:
        node = parse_ref(ref)
        row = (
            session.get(DemoChunk, node.chunk_id)
            if isinstance(node, Leaf)
            else session.get(DemoSummary, node.summary_id)
        )
        if row is None:
            raise JobFailure.unrecoverable("node_missing")
        texts.append(row.text)
    return texts


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
        _think(_seed(chunk_id))  # a timeout still costs the wait
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
    ctx.enqueue(NewJob.append_buffer(Leaf(chunk_id), SourceTarget(chunk.tree_id)))
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
        texts = _texts(session, take)
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


def build_handlers(stats: HandlerStats) -> Handlers:
    """The demo's kind -> handler mapping; ``stats`` counts what the handlers do."""
    handlers = Handlers()
    handlers.register(JobKind.EXTRACT_CHUNK)(functools.partial(_extract_chunk, stats=stats))
    handlers.register(JobKind.APPEND_BUFFER)(functools.partial(_append_buffer, stats=stats))
    handlers.register(JobKind.SEAL)(functools.partial(_seal, stats=stats))
    handlers.register(JobKind.FLUSH_STALE)(functools.partial(_flush_stale, stats=stats))
    return handlers


# -- the database --------------------------------------------------------------------------

_OWN_TABLES = ("mem_tree_jobs", "memtree_alembic_version")


def _sqlite_path(url: str) -> str | None:
    """The file of a ``sqlite://`` URL; None for other databases."""
    parsed = sqlalchemy.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise DemoError("the demo needs a SQLite file (its worker threads share it), not memory")
    return database


def _wipe_sqlite(path: Path) -> None:
    """Delete the demo's previous file, but never a database that holds anything else."""
    if path.exists():
        try:
            with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
                names = [
                    row[0]
                    for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                ]
        except sqlite3.DatabaseError:
            raise DemoError(f"{path} is not a SQLite database; not deleting it") from None
        foreign = [
            n for n in names if not n.startswith(("demo_", "sqlite_")) and n not in _OWN_TABLES
        ]
        if foreign:
            raise DemoError(
                f"{path} holds tables the demo did not make ({', '.join(sorted(foreign)[:3])}); "
                "not deleting it: give the demo a file of its own with --db"
            )
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _prepare(db_path: str, database_url: str | None) -> tuple[Engine, str, str]:
    """A fresh, migrated database: (engine, where to show, URL for the hint)."""
    url = database_url or f"sqlite:///{db_path}"
    file = _sqlite_path(url)
    if file is not None:
        path = Path(file).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        _wipe_sqlite(path)
        engine = memtree.create_engine(f"sqlite:///{path}")
        where, hint_url = str(path), f"sqlite:///{path}"
    else:
        admin = memtree.create_engine(url)
        try:
            with admin.begin() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")
                conn.exec_driver_sql(f"CREATE SCHEMA {PG_SCHEMA}")
        finally:
            admin.dispose()
        # Every table, memtree's included, lands in the demo's own schema; the option
        # rides in the URL, so the hint printed at the end finds the same tables.
        demo_url = sqlalchemy.make_url(url).update_query_dict(
            {"options": f"-csearch_path={PG_SCHEMA}"}
        )
        engine = memtree.create_engine(demo_url)
        hint_url = engine.url.render_as_string(hide_password=True)
        where = f"schema {PG_SCHEMA} of {hint_url}"
    Queue(engine).migrate()
    DemoBase.metadata.create_all(engine)
    return engine, where, hint_url


# -- running -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeReport:
    """One source tree at the end of the run."""

    chunks: int
    summaries: int
    #: The root the flush left (``summary:…``, or ``leaf:…`` for a one-chunk note).
    root: str | None
    root_text: str


@dataclass(frozen=True)
class DemoReport:
    """What a demo run did. Every count but the handlers' own was read from the database."""

    database: str
    database_url: str
    sources: int
    #: Chunks read from the corpus, repeats included, and the distinct ones stored.
    pieces: int
    chunks: int
    #: ``extract_chunk`` enqueues the dedupe key suppressed (repeated paragraphs).
    duplicate_chunks: int
    #: Seal jobs the handlers asked for (counted by the handlers, and on the buffers),
    #: and how many of them the dedupe key suppressed (asked for, minus seal rows).
    seal_requests: int
    suppressed_seals: int
    #: kind -> status -> jobs.
    jobs: dict[str, dict[str, int]]
    #: Attempts beyond the first, over every job (from ``mem_tree_jobs``).
    retries: int
    #: Timeouts the stand-in LLM raised (each one should be one retry).
    transient_failures: int
    #: Times a handler returned ``Defer`` (counted by the handlers; also on the chunks).
    deferrals: int
    summaries: int
    #: The highest summary level of any tree (0: no summaries).
    tree_depth: int
    #: tree id -> its size and root.
    trees: dict[str, TreeReport]
    elapsed_s: float
    #: Jobs settled per second while the worker ran.
    throughput: float

    @property
    def total_jobs(self) -> int:
        return sum(sum(by_status.values()) for by_status in self.jobs.values())

    def count(self, status: str) -> int:
        return sum(by_status.get(status, 0) for by_status in self.jobs.values())

    @property
    def suppressed_duplicates(self) -> int:
        return self.duplicate_chunks + self.suppressed_seals


def _ingest(engine: Engine, sources: Sequence[Source]) -> tuple[int, int, int]:
    """Chunks and their ``extract_chunk`` jobs, one transaction per file.

    Returns (pieces, distinct chunks, duplicate enqueues suppressed).
    """
    seen: set[str] = set()
    pieces = duplicates = 0
    now = memtree.wall_clock_ms()
    for source in sources:
        texts = chunk_text(source.text)
        if not texts:
            continue
        pieces += len(texts)
        with Session(engine) as session, session.begin():
            if any(chunk_id(t) not in seen for t in texts):
                session.add(DemoTree(id=source.id, source=source.name))
                session.flush()  # the tree first: its buffer and chunks refer to it
                session.add(
                    DemoBuffer(
                        tree_id=source.id,
                        level=0,
                        items_json="[]",
                        updated_at_ms=now,
                        seal_requests=0,
                    )
                )
            for seq, text in enumerate(texts):
                ident = chunk_id(text)
                if ident not in seen:
                    seen.add(ident)
                    session.add(
                        DemoChunk(id=ident, tree_id=source.id, seq=seq, text=text, deferrals=0)
                    )
                # A repeated paragraph has the same id, so the same dedupe key: the
                # queue keeps the first job and returns None for this one.
                if memtree.enqueue(session, NewJob.extract_chunk(ident)) is None:
                    duplicates += 1
    return pieces, len(seen), duplicates


def _progress_counts(engine: Engine) -> tuple[int, int]:
    """(settled, total) jobs, for the progress bar."""
    with Session(engine) as session:
        rows = session.execute(
            select(MemTreeJob.status, func.count()).group_by(MemTreeJob.status)
        ).all()
    total = sum(n for _, n in rows)
    settled = sum(n for status, n in rows if status in ("done", "failed", "cancelled"))
    return settled, total


class _Runner:
    """Drains the queue in a background thread; the caller's thread draws the progress."""

    def __init__(self, queue: Queue, worker: Worker) -> None:
        self.queue = queue
        self.worker = worker
        self.phase = "extracting and sealing"
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="memtree-demo", daemon=True)
        self.deadline = time.monotonic() + DEADLINE_S

    def _drain(self) -> None:
        # run_until_idle returns when nothing is due *now*; a retry or a deferral due
        # later is still work, so sleep until it is due and drain again.
        while not self.stopped.is_set():
            self.worker.run_until_idle()
            due = self.queue.next_due_ms()
            if due is None:
                return
            if time.monotonic() > self.deadline:
                raise DemoError(f"the demo did not finish in {DEADLINE_S:.0f} s")
            self.stopped.wait(max(due - self.queue.now_ms(), 0) / 1000)

    def _run(self) -> None:
        try:
            self._drain()
            if self.stopped.is_set():
                return
            self.phase = "flushing open buffers"
            now = self.queue.now_ms()
            self.queue.enqueue(NewJob.flush_stale(now, max_age_secs=0))
            self._drain()
            self.phase = "done"
        except BaseException as exc:  # handed to the caller's thread
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def wait(self, on_tick: Callable[[], None]) -> None:
        try:
            while self.thread.is_alive():
                self.thread.join(0.1)
                on_tick()
        except KeyboardInterrupt:
            # Both: run_until_idle clears a pending stop() when the drain loop calls it again.
            self.stopped.set()
            self.worker.stop()
            self.thread.join(10)
            raise
        if self.error is not None:
            raise self.error


class _ShowWarnings(logging.Handler):
    """memtree's warnings during the run, minus the faults the demo injects on purpose.

    Without a handler of its own, Python would print every expected ``llm_timeout``
    through its last-resort handler, over the progress bar.
    """

    def __init__(self, console: Console | None) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.console is not None and "llm_timeout" not in message:
            self.console.print(Text(f"warning: {message}", style="yellow"))


def _report(
    engine: Engine,
    where: str,
    hint_url: str,
    ingest: tuple[int, int, int],
    sources: int,
    stats: HandlerStats,
    elapsed_s: float,
    worker_s: float,
) -> DemoReport:
    pieces, chunks, duplicates = ingest
    with Session(engine) as session:
        rows = session.execute(
            select(
                MemTreeJob.kind,
                MemTreeJob.status,
                func.count(),
                func.sum(case((MemTreeJob.attempts > 1, MemTreeJob.attempts - 1), else_=0)),
            ).group_by(MemTreeJob.kind, MemTreeJob.status)
        ).all()
        seal_requests = session.scalar(select(func.sum(DemoBuffer.seal_requests))) or 0
        summaries = session.scalar(select(func.count()).select_from(DemoSummary)) or 0
        depth = session.scalar(select(func.max(DemoSummary.level))) or 0
        chunks_per = {
            tree_id: n
            for tree_id, n in session.execute(
                select(DemoChunk.tree_id, func.count()).group_by(DemoChunk.tree_id)
            )
        }
        summaries_per = {
            tree_id: n
            for tree_id, n in session.execute(
                select(DemoSummary.tree_id, func.count()).group_by(DemoSummary.tree_id)
            )
        }
        trees: dict[str, TreeReport] = {}
        for tree in session.scalars(select(DemoTree).order_by(DemoTree.id)):
            root_text = ""
            if tree.root_ref is not None:
                root_text = _texts(session, [tree.root_ref])[0]
            trees[tree.id] = TreeReport(
                chunks=chunks_per.get(tree.id, 0),
                summaries=summaries_per.get(tree.id, 0),
                root=tree.root_ref,
                root_text=root_text,
            )
    jobs: dict[str, dict[str, int]] = {}
    retries = 0
    for kind, status, count, extra in rows:
        jobs.setdefault(kind, {})[status] = count
        retries += int(extra or 0)
    seal_jobs = sum(jobs.get(JobKind.SEAL, {}).values())
    settled = sum(n for by in jobs.values() for s, n in by.items() if s in ("done", "failed"))
    return DemoReport(
        database=where,
        database_url=hint_url,
        sources=sources,
        pieces=pieces,
        chunks=chunks,
        duplicate_chunks=duplicates,
        seal_requests=stats.seal_requests,
        suppressed_seals=int(seal_requests) - seal_jobs,
        jobs=jobs,
        retries=retries,
        transient_failures=stats.transient_failures,
        deferrals=stats.deferrals,
        summaries=summaries,
        tree_depth=depth,
        trees=trees,
        elapsed_s=elapsed_s,
        throughput=settled / worker_s if worker_s > 0 else 0.0,
    )


def _render(console: Console, report: DemoReport) -> None:
    statuses = ("ready", "running", "done", "failed", "cancelled")
    jobs = Table(title="jobs by kind and status", title_justify="left")
    jobs.add_column("kind")
    for status in statuses:
        jobs.add_column(status, justify="right")
    for kind in sorted(report.jobs):
        by = report.jobs[kind]
        jobs.add_row(kind, *(str(by.get(s, 0) or "") for s in statuses))
    jobs.add_row("total", *(str(report.count(s) or "") for s in statuses), style="bold")
    console.print(jobs)

    run = Table(title="the run", title_justify="left", show_header=False)
    run.add_column("what")
    run.add_column("value", justify="right")
    run.add_row("sources / trees", f"{report.sources} / {len(report.trees)}")
    run.add_row("chunks stored / read", f"{report.chunks} / {report.pieces}")
    run.add_row(
        "suppressed duplicates",
        f"{report.suppressed_duplicates} "
        f"({report.duplicate_chunks} extract, {report.suppressed_seals} of "
        f"{report.seal_requests} seal requests)",
    )
    run.add_row("retries", f"{report.retries} ({report.transient_failures} stand-in LLM timeouts)")
    run.add_row("deferrals (rate limited)", str(report.deferrals))
    run.add_row("summaries", str(report.summaries))
    run.add_row("tree depth", str(report.tree_depth))
    run.add_row("throughput", f"{report.throughput:.0f} jobs/s")
    run.add_row("elapsed", f"{report.elapsed_s:.2f} s")
    console.print(run)

    trees = Table(title="the trees", title_justify="left")
    for column in ("tree", "chunks", "summaries", "root"):
        trees.add_column(column, justify="left" if column in ("tree", "root") else "right")
    for tree_id, tree in report.trees.items():
        root = f"{tree.root.split(':', 1)[0]}: {tree.root_text}" if tree.root else "(none)"
        trees.add_row(tree_id, str(tree.chunks), str(tree.summaries), Text(root))
    console.print(trees)

    # Printed unwrapped, so a long path stays one line to copy and paste.
    url = shlex.quote(report.database_url)
    console.print(Text.assemble("database: ", (report.database, "bold")), soft_wrap=True)
    console.print(Text(f"inspect it: memtree --database-url {url} status"), soft_wrap=True)
    console.print(Text(f"        or: memtree --database-url {url} db current"), soft_wrap=True)


def run_demo(
    db_path: str,
    corpus: str | None = None,
    *,
    console: Console | None = None,
    quiet: bool = False,
    database_url: str | None = None,
) -> DemoReport:
    """Run the demo on a fresh database at ``db_path`` (a SQLite file) and report.

    ``corpus`` is a directory of ``.txt`` files (the built-in notes by default).
    ``database_url`` runs on that database instead: a ``sqlite://`` file is treated
    like ``db_path``; a PostgreSQL URL gets the demo's own schema, ``memtree_demo``.
    ``quiet`` prints nothing; otherwise a progress bar and the summary go to ``console``.
    """
    out = None if quiet else (console or Console())
    started = time.monotonic()
    sources = load_corpus(corpus)
    engine, where, hint_url = _prepare(db_path, database_url)
    warnings = _ShowWarnings(out)
    memtree_log = logging.getLogger("memtree")
    memtree_log.addHandler(warnings)
    try:
        ingest = _ingest(engine, sources)
        queue = Queue(engine, retry_base_ms=RETRY_BASE_MS, retry_cap_ms=RETRY_CAP_MS)
        stats = HandlerStats()
        worker = Worker(queue, build_handlers(stats), concurrency=4)
        runner = _Runner(queue, worker)
        worker_started = time.monotonic()
        runner.start()
        if out is None:
            runner.wait(lambda: None)
        else:
            with Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("jobs settled"),
                TimeElapsedColumn(),
                console=out,
            ) as progress:
                task = progress.add_task(runner.phase, total=None)

                def tick() -> None:
                    settled, total = _progress_counts(engine)
                    progress.update(task, description=runner.phase, completed=settled, total=total)

                runner.wait(tick)
                tick()
        worker_s = time.monotonic() - worker_started
        report = _report(
            engine,
            where,
            hint_url,
            ingest,
            len(sources),
            stats,
            time.monotonic() - started,
            worker_s,
        )
    finally:
        memtree_log.removeHandler(warnings)
        engine.dispose()
    if out is not None:
        _render(out, report)
    return report
