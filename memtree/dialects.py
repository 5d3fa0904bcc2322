"""What differs per database, chosen explicitly by ``engine.dialect.name``.

A shared statement would be a trap: SQLAlchemy's SQLite compiler silently drops
``FOR UPDATE``, so a claim written once would "work" on SQLite and lose its
guarantee on PostgreSQL, or the reverse. Each supported database registers one
:class:`Dialect` here; an unknown database is an error, never a fallback.

Only statement *shapes* live here. Which statements run, and when, is the business
of :mod:`memtree.store` and :mod:`memtree.settle`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import (
    BindParameter,
    Executable,
    Insert,
    Select,
    Text,
    Update,
    bindparam,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql.elements import ColumnElement

from memtree.errors import UnsupportedDatabaseError
from memtree.models import ACTIVE_DEDUPE_PREDICATE, jobs

__all__ = [
    "INSERT_COLUMNS",
    "NOTIFY_CHANNEL",
    "Dialect",
    "PostgresDialect",
    "SQLiteDialect",
    "dialect_for",
]


#: The PostgreSQL channel enqueues notify and idle workers listen on; the payload is the kind.
NOTIFY_CHANNEL = "memtree_jobs"

#: The columns an enqueue writes; every other column takes its default.
INSERT_COLUMNS = (
    "id",
    "kind",
    "payload_json",
    "dedupe_key",
    "status",
    "attempts",
    "max_attempts",
    "available_at_ms",
    "created_at_ms",
)


class Dialect:
    """The per-database strategy: how to insert-unless-deduped, claim, and wake workers."""

    name: ClassVar[str]
    #: Whether claims lock their rows and skip rows other transactions hold.
    skip_locked: ClassVar[bool] = False
    #: Whether enqueues notify listening workers (at commit) through the database.
    notifies: ClassVar[bool] = False

    def insert_unless_active_key(self) -> Insert:
        """An INSERT that silently does nothing when the dedupe key is active."""
        raise NotImplementedError

    def enqueue_one(self) -> Executable:
        """One job in, returning its id when inserted (and notifying, where the database can)."""
        return self.insert_unless_active_key().values(_insert_binds()).returning(jobs.c.id)

    def notify(self) -> Executable | None:
        """A statement that wakes listening workers for the kind in ``:kind``, if any."""
        return None

    def claim(self, picked: Select[tuple[str]], values: dict[str, ColumnElement[object]]) -> Update:
        """An UPDATE that applies ``values`` to the rows ``picked`` selects, returning them."""
        raise NotImplementedError


class SQLiteDialect(Dialect):
    """SQLite serialises writers, so a claim is one UPDATE of the picked ids."""

    name = "sqlite"

    def insert_unless_active_key(self) -> Insert:
        # Input is validated before it gets here, so the dedupe index is the only
        # constraint OR IGNORE can ever swallow.
        return insert(jobs).prefix_with("OR IGNORE")

    def claim(self, picked: Select[tuple[str]], values: dict[str, ColumnElement[object]]) -> Update:
        return update(jobs).where(jobs.c.id.in_(picked.scalar_subquery())).values(values)


class PostgresDialect(Dialect):
    """PostgreSQL claims lock their rows and skip locked ones, so workers never collide."""

    name = "postgresql"
    skip_locked = True
    notifies = True

    def enqueue_one(self) -> Executable:
        # Insert and NOTIFY in one round trip; NOTIFY is delivered when the caller's
        # transaction commits, and only for a row that was really inserted.
        inserted = (
            self.insert_unless_active_key()
            .values(_insert_binds())
            .returning(jobs.c.id, jobs.c.kind)
            .cte("inserted")
        )
        return select(inserted.c.id, func.pg_notify(literal(NOTIFY_CHANNEL), inserted.c.kind))

    def notify(self) -> Executable:
        return select(func.pg_notify(literal(NOTIFY_CHANNEL), bindparam("kind", type_=Text)))

    def insert_unless_active_key(self) -> Insert:
        # The conflict target names the partial index by its literal predicate, so the
        # planner can infer it even from a generic plan of a prepared statement.
        return pg_insert(jobs).on_conflict_do_nothing(
            index_elements=[jobs.c.dedupe_key], index_where=text(ACTIVE_DEDUPE_PREDICATE)
        )

    def claim(self, picked: Select[tuple[str]], values: dict[str, ColumnElement[object]]) -> Update:
        # A materialised CTE runs the locking pick exactly once; an IN (subquery) may be
        # re-run by the planner and lock more rows than it claims.
        chosen = picked.cte("picked").prefix_with("MATERIALIZED")
        return update(jobs).where(jobs.c.id == chosen.c.id).values(values)


_DIALECTS: dict[str, Dialect] = {d.name: d for d in (SQLiteDialect(), PostgresDialect())}


def _insert_binds() -> dict[str, BindParameter[Any]]:
    return {name: bindparam(name, type_=jobs.c[name].type) for name in INSERT_COLUMNS}


def dialect_for(name: str) -> Dialect:
    """The registered dialect for ``engine.dialect.name``, or :class:`UnsupportedDatabaseError`."""
    try:
        return _DIALECTS[name]
    except KeyError:
        raise UnsupportedDatabaseError(name) from None
