"""The time memtree reads: the database's clock, wherever the database has one.

Leases, recoveries, due times, backoff, deferrals and schedules are all compared across
processes, so they must be read from one clock. A database server has one: memtree reads
PostgreSQL's ``clock_timestamp()`` and carries the reading forward on this process's own
steady clock (``CLOCK_BOOTTIME``, which also counts a suspended machine's sleep), reading
it again every :data:`RESYNC_S`. A worker whose wall clock is off by minutes therefore
keeps the database's time: its error is half the round trip of the reading, plus the
drift of a steady clock over a few seconds (parts per million). SQLite has no server:
every process on the file shares the host's clock, so on SQLite the time is the host's
wall clock, read directly.

The values stay epoch milliseconds in the same columns, so the wire format, and the
original crate sharing a SQLite file, are unaffected.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from memtree import store
from memtree.dialects import dialect_for

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

__all__ = ["RESYNC_S", "Clock", "DatabaseClock", "clock_for", "wall_clock_ms"]

log = logging.getLogger("memtree.clock")

#: A zero-argument callable returning epoch milliseconds.
Clock = Callable[[], int]

#: Seconds a reading of the database's clock is carried forward before the next one.
RESYNC_S = 10.0
#: Seconds before a failed reading is tried again (the last good one is used meanwhile).
_RETRY_S = 1.0

_STEADY = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def wall_clock_ms() -> int:
    """This host's wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def _steady_ms() -> float:
    return time.clock_gettime(_STEADY) * 1000.0


class DatabaseClock:
    """Epoch milliseconds on the clock of the database behind ``engine``.

    Calling it returns the database's time as of the last reading plus the steady time
    since; a reading older than ``resync_s`` is taken again first, on a connection of its
    own or, through :meth:`now_ms`, on the caller's. A reading that fails leaves the last
    good one in use (and is retried a second later); with none yet, the error is raised,
    as any statement to that database would.
    """

    def __init__(self, engine: Engine, *, resync_s: float = RESYNC_S) -> None:
        self.engine = engine
        self.resync_s = resync_s
        self._statement = dialect_for(engine.dialect.name).clock_statement()
        self._offset_ms: float | None = None  # database ms minus steady ms
        self._next_read = 0.0  # steady ms
        self._lock = threading.Lock()

    @property
    def has_own_clock(self) -> bool:
        """Whether the database has a clock of its own (False on SQLite: the host's)."""
        return self._statement is not None

    def __call__(self) -> int:
        return self.now_ms()

    def now_ms(self, executor: Connection | Session | None = None) -> int:
        """The database's time; a due reading is taken on ``executor`` when given (inside
        the caller's transaction: a read of the clock, nothing else)."""
        if self._statement is None:
            return wall_clock_ms()
        if _steady_ms() >= self._next_read:
            self._read(executor)
        assert self._offset_ms is not None
        return int(_steady_ms() + self._offset_ms)

    async def now_ms_async(self, executor: AsyncSession | AsyncConnection) -> int:
        """:meth:`now_ms`, reading through an ``AsyncSession`` or ``AsyncConnection``."""
        if self._statement is None:
            return wall_clock_ms()
        if _steady_ms() >= self._next_read:
            before = _steady_ms()
            with store.translate_errors():
                database_ms = (await executor.execute(self._statement)).scalar_one()
            self._record(before, int(database_ms))
        assert self._offset_ms is not None
        return int(_steady_ms() + self._offset_ms)

    def skew_ms(self) -> int | None:
        """How far this host's wall clock is ahead of the database's (negative: behind);
        None on a database without a clock of its own."""
        if self._statement is None:
            return None
        return wall_clock_ms() - self.now_ms()

    def _read(self, executor: Connection | Session | None) -> None:
        statement = self._statement
        assert statement is not None
        with self._lock:
            if _steady_ms() < self._next_read:
                return  # another thread read it meanwhile
            before = _steady_ms()
            try:
                with store.translate_errors():
                    if executor is not None:
                        database_ms = executor.execute(statement).scalar_one()
                    else:
                        with self.engine.connect() as conn:
                            before = _steady_ms()
                            database_ms = conn.execute(statement).scalar_one()
            except Exception:
                if self._offset_ms is None:
                    raise
                self._next_read = _steady_ms() + _RETRY_S * 1000
                log.warning("memtree could not read the database's clock; using the last reading")
                return
            self._record(before, int(database_ms))

    def _record(self, before: float, database_ms: int) -> None:
        after = _steady_ms()
        # The server read its clock somewhere in the round trip: assume its middle.
        self._offset_ms = database_ms - (before + after) / 2
        self._next_read = after + self.resync_s * 1000


_CLOCKS: weakref.WeakKeyDictionary[Engine, DatabaseClock] = weakref.WeakKeyDictionary()
_CLOCKS_LOCK = threading.Lock()


def clock_for(bind: Engine | Connection | Session | Any) -> DatabaseClock:
    """The one :class:`DatabaseClock` of the engine behind ``bind`` (shared by every queue
    and free function on it)."""
    engine = _engine_of(bind)
    with _CLOCKS_LOCK:
        clock = _CLOCKS.get(engine)
        if clock is None:
            clock = _CLOCKS[engine] = DatabaseClock(engine)
        return clock


def _engine_of(bind: Any) -> Engine:
    if isinstance(bind, Session):
        from memtree.models import MemTreeJob

        bind = bind.get_bind(MemTreeJob)
    if isinstance(bind, Connection):
        return bind.engine
    if isinstance(bind, Engine):
        return bind
    sync = getattr(bind, "sync_engine", None) or getattr(bind, "sync_connection", None)
    if sync is not None:
        return _engine_of(sync)
    get_bind = getattr(bind, "get_bind", None)  # an AsyncSession
    if get_bind is not None:
        return _engine_of(get_bind())
    raise TypeError(f"no engine behind {bind!r}")
