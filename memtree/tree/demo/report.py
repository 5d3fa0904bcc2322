"""What a demo run did, read back from the database, and its tables for the terminal."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine, case, func, select
from sqlalchemy.orm import Session

from memtree.models import MemTreeJob
from memtree.tree.demo.database import DemoBuffer, DemoChunk, DemoSummary, DemoTree, node_texts
from memtree.tree.demo.handlers import HandlerStats
from memtree.tree.kinds import JobKind

__all__ = ["DemoReport", "TreeReport", "build_report", "render"]


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
    #: The most runs under the llm gate at once (its limit is 1, across every worker).
    gated_peak: int
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


def build_report(
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
                root_text = node_texts(session, [tree.root_ref])[0]
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
        gated_peak=stats.gated_peak,
        summaries=summaries,
        tree_depth=depth,
        trees=trees,
        elapsed_s=elapsed_s,
        throughput=settled / worker_s if worker_s > 0 else 0.0,
    )


def render(console: Console, report: DemoReport) -> None:
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
    run.add_row(
        "llm gate (global, 1 at a time)",
        f"at most {report.gated_peak} ran at once",
    )
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
