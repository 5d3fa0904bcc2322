"""The demo's one error."""

from __future__ import annotations

from memtree.errors import MemtreeError

__all__ = ["DemoError"]


class DemoError(MemtreeError):
    """The demo cannot run as asked (a file it will not delete, an empty corpus, ...)."""
