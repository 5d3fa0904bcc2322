"""Every exception memtree raises on purpose.

The hierarchy::

    MemtreeError
    ├── InvalidJobError          bad input to enqueue; nothing was written
    ├── ConfigurationError       a setting, handler or argument memtree cannot work with
    ├── SchemaError              the database and this memtree disagree on the schema
    │   ├── SchemaMissingError   no memtree schema at all: run ``memtree db upgrade``
    │   ├── SchemaOutdatedError  an older memtree schema: run ``memtree db upgrade``
    │   │                        (a lost revision record: run ``memtree db stamp``)
    │   └── SchemaNewerError     the database was migrated by a newer memtree
    ├── CorruptJobError          a stored row memtree cannot read (reported with its id)
    ├── UnsupportedDatabaseError a database memtree has no dialect for
    └── DatabaseError            the database failed underneath an operation
        └── DatabaseFileChangedError  a worker's SQLite file was deleted or replaced

Driver exceptions are translated once, at the store boundary, by
:func:`memtree.dberrors.translate`: into :class:`SchemaMissingError` (when the table is
absent) or :class:`DatabaseError` (with the original exception as ``__cause__`` and what
it means as ``fault``). :class:`JobFailure`, which handlers
raise to classify a failure, lives in :mod:`memtree.types`: it is a value the queue
records, not an error of memtree's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memtree.dberrors import Fault

__all__ = [
    "ConfigurationError",
    "CorruptJobError",
    "DatabaseError",
    "DatabaseFileChangedError",
    "InvalidJobError",
    "MemtreeError",
    "SchemaError",
    "SchemaMissingError",
    "SchemaNewerError",
    "SchemaOutdatedError",
    "UnsupportedDatabaseError",
]


class MemtreeError(Exception):
    """Base class of every error memtree raises."""


class InvalidJobError(MemtreeError, ValueError):
    """A job that cannot be stored: empty or retired kind, non-JSON payload, bad times."""


class ConfigurationError(MemtreeError, ValueError):
    """A setting, handler or argument rejected where it was given (a Queue or Worker
    setting when it is built, a handler when it is registered, a session of the wrong
    kind when it is passed)."""


class SchemaError(MemtreeError):
    """The database's memtree schema is not the one this version expects."""


class SchemaMissingError(SchemaError):
    """The database has no memtree schema."""

    def __init__(self, detail: str = "") -> None:
        message = (
            "the database has no memtree schema: run `memtree db upgrade` "
            "(or Queue.migrate()) first"
        )
        super().__init__(f"{message} ({detail})" if detail else message)


class SchemaOutdatedError(SchemaError):
    """The database was migrated by an older memtree, or its revision record was lost.

    ``message``, when given, replaces the advice to upgrade (a lost record is mended
    with ``memtree db stamp`` first).
    """

    def __init__(self, current: str, head: str, message: str | None = None) -> None:
        super().__init__(
            message
            or f"the database's memtree schema is at revision {current}, this memtree needs "
            f"{head}: run `memtree db upgrade` (or Queue.migrate())"
        )
        self.current = current
        self.head = head


class SchemaNewerError(SchemaError):
    """The database was migrated by a newer memtree than this one."""

    def __init__(self, current: str) -> None:
        super().__init__(
            f"the database's memtree schema is at revision {current}, which this memtree "
            "does not know: memtree is older than the database, upgrade the memtree package"
        )
        self.current = current


class CorruptJobError(MemtreeError):
    """A stored row that memtree cannot read, such as an unknown status."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id!r} cannot be read: {reason}")
        self.job_id = job_id
        self.reason = reason


class UnsupportedDatabaseError(MemtreeError):
    """memtree has no dialect for this database."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"memtree does not support the {name!r} database; it supports sqlite and postgresql"
        )
        self.name = name


class DatabaseError(MemtreeError):
    """The database failed underneath a memtree operation (see ``__cause__``).

    ``fault`` is what :mod:`memtree.dberrors` made of the driver's error when it was
    translated (None when memtree raised this without one), so nobody reads its text again.
    """

    def __init__(self, *args: object, fault: Fault | None = None) -> None:
        super().__init__(*args)
        self.fault = fault


class DatabaseFileChangedError(DatabaseError):
    """The SQLite file a worker works was deleted or replaced by another file under it.

    The worker stops rather than go on settling jobs into a file nobody can see any more
    (the connections it holds still write to the deleted one) or into a different one.
    """

    def __init__(self, path: str, change: str) -> None:
        super().__init__(
            f"the SQLite database file {path} was {change} while the worker ran; it stopped "
            "without settling anything more there: start the worker again to work the file "
            "now at that path"
        )
        self.path = path
        self.change = change
