"""The SQLite file behind an engine, watched for being deleted or replaced."""

from __future__ import annotations

import os

from sqlalchemy import Engine

from memtree.engine import sqlite_file

__all__ = ["DatabaseFile"]


class DatabaseFile:
    """The SQLite file behind an engine, known by its device and inode.

    A file deleted or replaced (``rm``, a restored backup moved into place) under a
    running process is invisible to SQLite: the connections already open go on reading
    and writing the old inode, new ones open whatever is at the path now. So the worker
    compares the path's identity with the one it recorded at start, before it settles or
    claims anything; a ``stat`` costs about a microsecond.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None

    @classmethod
    def of(cls, engine: Engine) -> DatabaseFile | None:
        """The file of a SQLite engine; None for PostgreSQL, in-memory and URI databases."""
        path = sqlite_file(engine.url)
        return None if path is None else cls(path)

    def _stat(self) -> tuple[int, int] | None:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return None
        return status.st_dev, status.st_ino

    def change(self) -> str | None:
        """How the file changed since it was first seen (``deleted``, ``replaced by another
        file``), or None. A file that did not exist yet is recorded when it appears."""
        identity = self._stat()
        if self._identity is None:
            self._identity = identity
            return None
        if identity == self._identity:
            return None
        return "deleted" if identity is None else "replaced by another file"
