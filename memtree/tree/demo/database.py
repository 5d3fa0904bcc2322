"""The demo's database: its own ``demo_*`` tables, and a fresh, migrated copy for each run.

A SQLite file is deleted and rebuilt, but never one that holds tables the demo did not
make; a PostgreSQL URL gets a schema of its own, :data:`PG_SCHEMA`, dropped and recreated.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from pathlib import Path

import sqlalchemy
from sqlalchemy import Engine, ForeignKey, Integer, String
from sqlalchemy import Text as SqlText
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import memtree
from memtree.migration import VERSION_TABLE
from memtree.models import Base
from memtree.queue import Queue
from memtree.tree.demo.errors import DemoError
from memtree.tree.payloads import Leaf, NodeRef, Summary
from memtree.types import JobFailure

__all__ = [
    "PG_SCHEMA",
    "DemoBase",
    "DemoBuffer",
    "DemoChunk",
    "DemoSummary",
    "DemoTree",
    "node_ref",
    "node_texts",
    "parse_ref",
    "prepare",
]

#: The PostgreSQL schema the demo owns when it is given an explicit PostgreSQL URL.
PG_SCHEMA = "memtree_demo"


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


def node_texts(session: Session, refs: Iterable[str]) -> list[str]:
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


# -- the database --------------------------------------------------------------------------

# memtree's own tables, every one its migrations make (memtree_0006 added two).
_OWN_TABLES = (*Base.metadata.tables, VERSION_TABLE)


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


def prepare(db_path: str, database_url: str | None) -> tuple[Engine, str, str]:
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
