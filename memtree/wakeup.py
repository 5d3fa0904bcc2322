"""Waking idle workers: in-process at once, across processes by PostgreSQL LISTEN/NOTIFY.

Workers in this process register a ``threading.Event`` per database; an enqueue that
commits through memtree in this process sets them. On PostgreSQL every enqueue also
sends ``NOTIFY memtree_jobs, '<kind>'`` inside its transaction (see
:mod:`memtree.dialects`), and :class:`Listener` turns those into the same event for
workers in other processes. SQLite has no cross-process signal: its workers poll
with a read (:func:`memtree.store.next_due_ms`) instead.

This module never runs a statement of the queue's own; the listener only LISTENs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import Session, SessionTransaction

from memtree.dialects import NOTIFY_CHANNEL
from memtree.models import MemTreeJob

__all__ = ["Listener", "after_commit", "signal", "subscribe", "unsubscribe"]

log = logging.getLogger("memtree.wakeup")

_lock = threading.Lock()
_events: dict[str, set[threading.Event]] = defaultdict(set)


def _key(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def subscribe(engine: Engine, wake: threading.Event) -> None:
    with _lock:
        _events[_key(engine)].add(wake)


def unsubscribe(engine: Engine, wake: threading.Event) -> None:
    key = _key(engine)
    with _lock:
        waiting = _events.get(key)
        if waiting is not None:
            waiting.discard(wake)
            if not waiting:
                del _events[key]  # so a process with no worker skips even the lookup


def signal(engine: Engine) -> None:
    """Wake every worker of this process that works the database behind ``engine``."""
    with _lock:
        waiting = list(_events.get(_key(engine), ()))
    for wake in waiting:
        wake.set()


def after_commit(executor: Session | Connection) -> None:
    """Wake this process's workers once the caller's transaction commits (never on rollback)."""
    if not _events:
        return  # no worker in this process: nothing to wake, nothing to pay for
    if isinstance(executor, Session):
        bind: Engine | Connection = executor.get_bind(MemTreeJob)
        engine = bind.engine if isinstance(bind, Connection) else bind
        if _events.get(_key(engine)):
            _watch_sessions()
            executor.info[_WAKE_ON_COMMIT] = engine
        return
    engine = executor.engine
    if not _events.get(_key(engine)):
        return

    def _fire(*_: Any) -> None:
        signal(engine)

    event.listen(executor, "commit", _fire, once=True)


#: ``Session.info`` key: the engine whose workers this session's next commit wakes.
_WAKE_ON_COMMIT = "memtree.wake_on_commit"
_sessions_watched = False


def _watch_sessions() -> None:
    """Listen on every ``Session`` once, instead of on each session that enqueues: a
    listener on one session object costs more than the enqueue itself."""
    global _sessions_watched
    if _sessions_watched:
        return
    with _lock:
        if not _sessions_watched:
            event.listen(Session, "after_commit", _on_session_commit)
            event.listen(Session, "after_transaction_end", _on_session_transaction_end)
            _sessions_watched = True


def _on_session_commit(session: Session) -> None:
    # Releasing a savepoint commits nothing yet: the outer transaction may still roll back.
    if session.in_nested_transaction():
        return
    engine = session.info.pop(_WAKE_ON_COMMIT, None)
    if engine is not None:
        signal(engine)


def _on_session_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    # The outermost transaction ended without a commit (a commit popped the key first).
    if transaction.parent is None:
        session.info.pop(_WAKE_ON_COMMIT, None)


class Listener:
    """LISTENs on PostgreSQL for enqueues and calls ``on_notify(kind)`` for each.

    Runs in a daemon thread on a connection of its own, reconnecting with a backoff
    when the server goes away; a worker keeps polling meanwhile, so nothing is missed.
    """

    def __init__(
        self, engine: Engine, on_notify: Callable[[str], None], *, reconnect_s: float = 1.0
    ) -> None:
        self._engine = engine
        self._on_notify = on_notify
        self._reconnect_s = reconnect_s
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memtree-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def wait_listening(self, timeout: float) -> bool:
        """True once LISTEN is in place (for tests and for a clean start)."""
        return self._listening.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception as exc:  # the server went away: reconnect after a pause
                self._listening.clear()
                log.warning("listener lost its connection (%s); reconnecting", type(exc).__name__)
                self._stop.wait(self._reconnect_s)

    def _listen(self) -> None:
        raw = self._engine.raw_connection()
        try:
            conn = raw.driver_connection
            assert conn is not None
            conn.autocommit = True
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self._listening.set()
            # Each notification is handed on as it arrives; the timeout only bounds how
            # long a stop() or a dead connection goes unnoticed.
            last_check = time.monotonic()
            while not self._stop.is_set():
                for notification in conn.notifies(timeout=0.5):
                    self._on_notify(notification.payload)
                if time.monotonic() - last_check > 5.0:
                    conn.execute("SELECT 1")
                    last_check = time.monotonic()
        finally:
            self._listening.clear()
            raw.invalidate()  # its session state (autocommit, LISTEN) must not be reused
