"""memtree's pytest plugin: a migrated SQLite queue on a fake clock, per test.

Installed with the package (entry point ``pytest11``); the fixtures are
``memtree_clock`` (a :class:`memtree.testing.FakeClock`) and ``memtree_queue``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from memtree.engine import create_engine
from memtree.queue import Queue
from memtree.testing import FakeClock


@pytest.fixture
def memtree_clock() -> FakeClock:
    """A clock the test moves by hand."""
    return FakeClock()


@pytest.fixture
def memtree_queue(tmp_path: Path, memtree_clock: FakeClock) -> Iterator[Queue]:
    """A memtree queue on a fresh, migrated SQLite file, with ``memtree_clock`` as its clock."""
    engine = create_engine(f"sqlite:///{tmp_path / 'memtree-test.db'}")
    queue = Queue(engine, clock=memtree_clock)
    queue.migrate()
    try:
        yield queue
    finally:
        engine.dispose()
