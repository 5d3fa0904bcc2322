"""Running the demo: ingest the corpus, drain the queue with a tree worker in a thread of
its own while the caller's thread draws the progress, flush, and report."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

import memtree
import memtree.tree
from memtree.models import MemTreeJob
from memtree.queue import Queue
from memtree.tree import jobs
from memtree.tree.demo.corpus import Source, chunk_id, chunk_text, load_corpus
from memtree.tree.demo.database import DemoBuffer, DemoChunk, DemoTree, prepare
from memtree.tree.demo.errors import DemoError
from memtree.tree.demo.handlers import HandlerStats, build_handlers
from memtree.tree.demo.report import DemoReport, build_report, render
from memtree.worker import Worker

__all__ = ["DEFAULT_DB", "run_demo"]

#: The demo's SQLite file when ``--db`` is not given, relative to the current directory.
DEFAULT_DB = "memtree-demo.db"

# memtree's default first retry waits a minute; the demo's stand-in times out for a
# moment, so it retries after a tenth of a second and keeps the run short.
RETRY_BASE_MS = 100
RETRY_CAP_MS = 1_000
#: A run that has not finished after this long is a bug, not a slow machine.
DEADLINE_S = 120.0


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
                if memtree.enqueue(session, jobs.extract_chunk(ident)) is None:
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
            self.queue.enqueue(jobs.flush_stale(now, max_age_secs=0))
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
    engine, where, hint_url = prepare(db_path, database_url)
    warnings = _ShowWarnings(out)
    memtree_log = logging.getLogger("memtree")
    memtree_log.addHandler(warnings)
    try:
        ingest = _ingest(engine, sources)
        queue = memtree.tree.queue(engine, retry_base_ms=RETRY_BASE_MS, retry_cap_ms=RETRY_CAP_MS)
        stats = HandlerStats()
        worker = memtree.tree.worker(queue, build_handlers(stats), concurrency=4)
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
        report = build_report(
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
        render(out, report)
    return report
