"""The ``memtree`` command: schema management today; the worker and operations commands build on it.

Every error is one line on stderr and a non-zero exit, never a traceback, and a
database password never appears in output.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click
from alembic.util import CommandError
from rich.console import Console, Group
from rich.live import Live
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine, make_url
from sqlalchemy import exc as sa_exc

from memtree import dberrors, explanation, maintenance, migration, overview, store
from memtree.doctor import Finding, Severity, diagnose, worst
from memtree.engine import DEFAULT_DATABASE_URL, create_engine, normalize_url, sqlite_file
from memtree.errors import ConfigurationError, DatabaseError, MemtreeError
from memtree.limits import Gate, RateLimit
from memtree.queue import Queue
from memtree.redact import scrub
from memtree.types import CancelOutcome, JobStatus, NewJob, decode_payload

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return "<unparseable URL>"


def _one_line(error: Exception) -> str:
    """The first line of an error; a driver's error is translated as the store would."""
    if isinstance(error, sa_exc.DBAPIError):
        error = dberrors.translate(error)
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"database error: {line}" if isinstance(error, DatabaseError) else line


def _one_line_errors(func: F) -> F:
    """Report memtree, Alembic and database errors as one line and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (MemtreeError, CommandError, sa_exc.DBAPIError) as exc:
            raise click.ClickException(_one_line(exc)) from None
        except sa_exc.ArgumentError as exc:
            raise click.ClickException(f"bad database URL: {exc}") from None
        except ModuleNotFoundError as exc:
            raise click.ClickException(f"a database driver is missing: {exc.name}") from None

    return wrapper  # type: ignore[return-value]


class Context:
    def __init__(self, database_url: str, sqlite_journal_mode: str | None = "AUTO") -> None:
        self.database_url = database_url
        self.sqlite_journal_mode = sqlite_journal_mode

    def engine(self) -> Engine:
        """An engine on the URL; SQLite creates a missing file (``db upgrade`` relies on it)."""
        return create_engine(self.database_url, sqlite_journal_mode=self.sqlite_journal_mode)

    def existing_engine(self) -> Engine:
        """An engine on a database that must exist already: a missing SQLite file is an
        error, not a new empty file, since it cannot hold memtree's schema."""
        missing = _missing_sqlite_file(self.database_url)
        if missing is not None:
            raise ConfigurationError(
                f"the SQLite file {missing} does not exist (create it with `memtree db upgrade`)"
            )
        return self.engine()


def _missing_sqlite_file(url: str) -> str | None:
    path = sqlite_file(url)
    return path if path is not None and not os.path.exists(path) else None


database_url_option = click.option(
    "--database-url",
    envvar="MEMTREE_DATABASE_URL",
    default=DEFAULT_DATABASE_URL,
    show_default=True,
    help="SQLAlchemy URL of the database (env MEMTREE_DATABASE_URL).",
)


journal_mode_option = click.option(
    "--sqlite-journal-mode",
    envvar="MEMTREE_SQLITE_JOURNAL_MODE",
    type=click.Choice(
        ["auto", "wal", "delete", "truncate", "persist", "keep"], case_sensitive=False
    ),
    default="auto",
    show_default=True,
    help="SQLite journal mode: 'auto' is WAL except on a file that already holds the queue "
    "in a rollback journal (the TinyCortex crate's), which keeps its mode; 'keep' never "
    "sets one (env MEMTREE_SQLITE_JOURNAL_MODE).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@database_url_option
@journal_mode_option
@click.version_option(package_name="memtree")
@click.pass_context
def main(ctx: click.Context, database_url: str, sqlite_journal_mode: str) -> None:
    """memtree: a durable job queue in your application's own SQL database."""
    mode = sqlite_journal_mode.upper()
    ctx.obj = Context(database_url, None if mode == "KEEP" else mode)


@main.group()
def db() -> None:
    """Manage memtree's schema (its own Alembic history and version table)."""


@db.command()
@click.argument("revision", default="head")
@click.pass_obj
@_one_line_errors
def upgrade(obj: Context, revision: str) -> None:
    """Migrate to REVISION (default: head), adopting an original TinyCortex table."""
    engine = obj.engine()
    try:
        with Console(stderr=True).status(f"migrating to {revision}"):
            adopted = migration.upgrade(engine, revision)
        if adopted:
            click.echo(f"adopted the original's mem_tree_jobs table at {adopted}")
        click.echo(f"{_safe_url(obj.database_url)} is at {migration.current(engine)}")
    finally:
        engine.dispose()


@db.command()
@click.argument("revision")
@click.pass_obj
@_one_line_errors
def downgrade(obj: Context, revision: str) -> None:
    """Step the schema down to REVISION (``base`` drops memtree's table)."""
    engine = obj.engine()
    try:
        migration.downgrade(engine, revision)
        click.echo(f"{_safe_url(obj.database_url)} is at {migration.current(engine) or 'base'}")
    finally:
        engine.dispose()


@db.command()
@click.pass_obj
@_one_line_errors
def stamp(obj: Context) -> None:
    """Record the revision mem_tree_jobs' layout matches, if memtree_alembic_version was lost."""
    engine = obj.engine()
    try:
        stamped = migration.stamp(engine)
        revision = migration.current(engine)
        if stamped is None:
            click.echo(f"{migration.VERSION_TABLE} already records {revision}: nothing to stamp")
            return
        head = migration.head_revision()
        advice = "" if stamped == head else f"; `memtree db upgrade` brings it to {head}"
        click.echo(f"stamped {stamped}: {_safe_url(obj.database_url)} is at {revision}{advice}")
    finally:
        engine.dispose()


@db.command()
@click.pass_obj
@_one_line_errors
def current(obj: Context) -> None:
    """Print the database's memtree revision."""
    engine = obj.engine()
    try:
        with engine.connect() as conn:
            revision = migration.schema_revision(conn)
            lost = revision is None and migration.revision_lost(conn)
        head = migration.head_revision()
        state = "head" if revision == head else f"head is {head}"
        if lost:
            state += "; mem_tree_jobs is there but its revision is lost: run `memtree db stamp`"
        click.echo(f"{revision or 'none'} ({state})")
    finally:
        engine.dispose()


@db.command()
@_one_line_errors
def history() -> None:
    """List memtree's revisions, newest first."""
    for revision in migration.revisions():
        click.echo(revision)


@db.command()
@click.pass_obj
@_one_line_errors
def check(obj: Context) -> None:
    """Fail if the database's memtree table differs from this memtree's models."""
    engine = obj.engine()
    try:
        migration.check(engine)
        click.echo("no drift: the database matches memtree's models")
    finally:
        engine.dispose()


@db.command()
@click.argument("revision", default="head")
@click.option("--from", "start", default=None, help="Start revision (default: empty database).")
@click.pass_obj
@_one_line_errors
def sql(obj: Context, revision: str, start: str | None) -> None:
    """Print the DDL of an upgrade, for DBAs who apply it by hand (no connection made)."""
    url = normalize_url(obj.database_url).render_as_string(hide_password=False)
    click.echo(migration.offline_sql(url, revision, start), nl=False)


def parse_duration_ms(text: str) -> int:
    """``250ms``, ``30s``, ``5m``, ``2h``, ``7d`` or a bare number of milliseconds."""
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    value = text.strip().lower()
    for suffix in ("ms", "s", "m", "h", "d"):
        if value.endswith(suffix) and value[: -len(suffix)].replace(".", "", 1).isdigit():
            return int(float(value[: -len(suffix)]) * units[suffix])
    if value.isdigit():
        return int(value)
    raise click.BadParameter(f"{text!r} is not a duration such as 500ms, 30s, 5m, 2h or 7d")


if TYPE_CHECKING:
    _ParamType = click.ParamType[int]
else:  # click's ParamType is generic only for type checkers on some versions
    _ParamType = click.ParamType


class Duration(_ParamType):
    """A duration in milliseconds; ``min_ms`` refuses shorter ones (such as a 0 s lease)."""

    name = "duration"

    def __init__(self, min_ms: int = 0) -> None:
        self.min_ms = min_ms

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        ms = value if isinstance(value, int) else parse_duration_ms(str(value))
        if ms < self.min_ms:
            self.fail(f"{value!r} is shorter than {self.min_ms}ms", param, ctx)
        return ms


def _import_attribute(target: str, option: str) -> Any:
    """Import ``module:attribute`` (from the current directory too) for ``option``."""
    import importlib

    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise click.ClickException(f"{option} takes module:attribute, not {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise click.ClickException(
            f"cannot import {module_name!r} for {option}: {type(exc).__name__}: {exc}"
        ) from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise click.ClickException(
            f"module {module_name!r} has no attribute {attribute!r}"
        ) from None


def load_handlers(target: str) -> Any:
    """Import ``module:attribute`` (from the current directory too) as a handlers mapping."""
    from collections.abc import Mapping

    handlers = _import_attribute(target, "--app")
    if callable(handlers) and not isinstance(handlers, Mapping):
        handlers = handlers()
    if not isinstance(handlers, Mapping):
        raise click.ClickException(
            f"{target} is a {type(handlers).__name__}, not a mapping of kind -> handler"
        )
    return handlers


def _serve_metrics(queue: Queue, port: int, addr: str) -> Any:
    try:
        from memtree.metrics import serve
    except ImportError:
        raise click.ClickException(
            "--metrics-port needs prometheus-client: pip install 'memtree[metrics]'"
        ) from None
    return serve(queue, port, addr)


@main.command()
@click.option("--app", "app", required=True, help="module:attribute of a kind -> handler mapping.")
@click.option(
    "--concurrency", type=click.IntRange(min=1), default=4, show_default=True, help="Threads."
)
@click.option(
    "--lease", type=Duration(min_ms=1), default=None, help="Lease of a claim (default: 5m)."
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Idle poll, seconds.",
)
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds.",
)
@click.option(
    "--retention",
    type=Duration(),
    default="7d",
    show_default=True,
    help="Keep done rows this long.",
)
@click.option("--no-gates", is_flag=True, help="Run without the memory tree's llm gate.")
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve Prometheus metrics on this port (needs memtree[metrics]).",
)
@click.option("--metrics-addr", default="127.0.0.1", show_default=True)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.pass_obj
@_one_line_errors
def worker(
    obj: Context,
    app: str,
    concurrency: int,
    lease: int | None,
    poll_interval: float | None,
    shutdown_grace: float,
    retention: int,
    no_gates: bool,
    metrics_port: int | None,
    metrics_addr: str,
    log_level: str,
) -> None:
    """Run a worker for the handlers in --app until SIGINT/SIGTERM.

    The worker is the memory tree's (memtree.tree.worker on memtree.tree.queue): the
    tree's claim order and retired kinds, its llm gate unless --no-gates, and the
    flush_stale schedule (every 3-hour UTC block) when --app handles flush_stale.
    """
    import logging

    import memtree.tree
    from memtree.types import DEFAULT_LOCK_DURATION_MS

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    handlers = load_handlers(app)
    engine = obj.existing_engine()
    queue = memtree.tree.queue(
        engine, lock_duration_ms=DEFAULT_LOCK_DURATION_MS if lease is None else lease
    )
    try:
        with queue.transaction():
            pass  # fail now, clearly, on a missing or outdated schema
        runner = memtree.tree.worker(
            queue,
            handlers,
            concurrency=concurrency,
            gates=() if no_gates else memtree.tree.GATES,
            poll_interval_s=poll_interval,
            shutdown_grace_s=shutdown_grace,
            retention_ms=retention,
            metrics=None
            if metrics_port is None
            else _serve_metrics(queue, metrics_port, metrics_addr),
        )
        click.echo(
            f"memtree worker {runner.name} on {_safe_url(obj.database_url)}: "
            f"{', '.join(sorted(handlers))} (concurrency {concurrency})",
            err=True,
        )
        runner.run()
    finally:
        engine.dispose()


@main.command()
@click.option(
    "--db",
    "db_path",
    metavar="PATH",
    default=None,
    help="The demo's SQLite file, deleted and rebuilt on every run [default: memtree-demo.db].",
)
@click.option(
    "--corpus",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="A directory of .txt files to ingest [default: the built-in notes].",
)
@click.pass_context
@_one_line_errors
def demo(ctx: click.Context, db_path: str | None, corpus: str | None) -> None:
    """Build memory trees from a small corpus with a real worker, on a fresh SQLite file.

    The group's --database-url is used only when given on the command line (never from
    MEMTREE_DATABASE_URL, which usually names a real database; the demo wipes its own).
    """
    from click.core import ParameterSource

    from memtree.tree.demo import DEFAULT_DB, run_demo

    database_url = None
    group = ctx.parent
    if group is not None and group.get_parameter_source("database_url") is (
        ParameterSource.COMMANDLINE
    ):
        if db_path is not None:
            raise click.UsageError("give --db or the group's --database-url, not both")
        obj: Context = ctx.obj
        database_url = obj.database_url
    report = run_demo(db_path or DEFAULT_DB, corpus, database_url=database_url)
    if report.count("failed") or report.count("ready") or report.count("running"):
        raise click.ClickException("the demo left jobs unfinished: see the table above")


# -- operations ---------------------------------------------------------------------------


@contextmanager
def _open_queue(obj: Context) -> Iterator[Queue]:
    """A tree queue: ``mem_tree_jobs`` is the table the original crate shares, so the
    operations know its retired kinds (refused, counted, purged)."""
    import memtree.tree

    engine = obj.existing_engine()
    try:
        yield memtree.tree.queue(engine)
    finally:
        engine.dispose()


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _render_status(report: dict[str, Any]) -> Group:
    summary = Table(title=f"memtree: {report['database']}", show_edge=False)
    statuses = [status.value for status in JobStatus]
    summary.add_column("kind")
    for status in statuses:
        summary.add_column(status, justify="right")
    for kind, counts in sorted(report["by_kind"].items()):
        summary.add_row(kind, *(str(counts.get(status, 0)) for status in statuses))
    summary.add_row("[b]total", *(f"[b]{report['counts'].get(s, 0)}" for s in statuses))
    lines = []
    if report["oldest_due_age_ms"] is not None:
        lines.append(f"oldest due ready job waiting: {overview.ago(report['oldest_due_age_ms'])}")
    elif report["next_due_in_ms"] is not None:
        lines.append(f"nothing due; next job due in {overview.ago(report['next_due_in_ms'])}")
    else:
        lines.append("no ready jobs")
    lines.append(f"failed, unrecoverable: {report['failed_unrecoverable']}")
    if report["retired"]:
        lines.append(f"rows of retired kinds: {report['retired']} (purged when a worker starts)")
    if report["unreadable"]:
        lines.append(
            f"rows memtree cannot read: {report['unreadable']} (another program's; "
            "see `memtree jobs list`)"
        )
    parts: list[Any] = [summary, Text("\n".join(lines))]
    if report["running"]:
        running = Table(title="running", show_edge=False)
        for column in ("id", "kind", "attempt", "lease"):
            running.add_column(column)
        for job in report["running"]:
            left = job["lease_expires_in_ms"]
            lease = (
                "-"
                if left is None
                else (
                    f"expires in {overview.ago(left)}"
                    if left >= 0
                    else f"[red]expired {overview.ago(left)} ago"
                )
            )
            if job["cancel_requested"]:
                lease += " (cancel requested)"
            running.add_row(Text(job["id"]), Text(job["kind"]), str(job["attempts"]), lease)
        parts.append(running)
    if report["limits"]:
        limits = Table(title="fleet-wide limits", show_edge=False)
        for column in ("limit", "kind of limit", "used / limit", "left", "held by"):
            limits.add_column(column)
        for row in report["limits"]:
            what = (
                row["type"]
                if row["window_s"] is None
                else f"{row['limit']} per {row['window_s']:g}s"
            )
            if row["key"]:
                what += f", per {row['key']}"
            used = (
                ", ".join(
                    f"{key or '-'}: {n}/{row['limit']}"
                    for key, n in sorted(row["used"].items())[:8]
                )
                or f"0/{row['limit']}"
            )
            left = ", ".join(
                f"{key or '-'}: {n}" for key, n in sorted(row["remaining"].items())[:8]
            )
            holders = (
                ", ".join(
                    f"{h['id']} ({overview.ago(h['lease_expires_in_ms'])} left)"
                    for h in row["holders"][:5]
                )
                or "-"
            )
            limits.add_row(Text(row["name"]), what, Text(used), Text(left), Text(holders))
        parts.append(limits)
    if report["workers"]:
        workers = Table(title="workers", show_edge=False)
        for column in ("worker", "id", "handles", "slots", "last seen"):
            workers.add_column(column)
        for row in report["workers"]:
            seen = f"{overview.ago(row['seen_ago_ms'])} ago"
            workers.add_row(
                Text(row["name"]),
                Text(row["id"]),
                Text(", ".join(row["kinds"])),
                str(row["concurrency"]),
                seen if row["alive"] else f"[red]{seen} (gone)",
            )
        parts.append(workers)
    if report["schedules"]:
        schedules = Table(title="schedules", show_edge=False)
        for column in ("schedule", "last slot", "updated at"):
            schedules.add_column(column)
        for row in report["schedules"]:
            schedules.add_row(Text(row["name"]), row["last_slot"], row["updated_at"])
        parts.append(schedules)
    return Group(*parts)


def _load_limits(target: str | None) -> list[Gate | RateLimit]:
    """The memory tree's gates, and the application's fleet-wide limits at ``target``
    (``module:attribute``, one limit or a list) when given."""
    from memtree.tree import GATES

    limits: list[Gate | RateLimit] = list(GATES)
    if target is not None:
        found = _import_attribute(target, "--limits")
        extra = list(found) if isinstance(found, list | tuple) else [found]
        bad = [x for x in extra if not isinstance(x, Gate | RateLimit)]
        if bad:
            raise click.ClickException(f"--limits: not a Gate or RateLimit: {bad[0]!r}")
        limits += [x for x in extra if x.name not in {y.name for y in limits}]
    return limits


_LIMITS_HELP = (
    "module:attribute of the application's Gates and RateLimits (the memory tree's "
    "llm gate is always known)."
)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option(
    "--limits",
    "limits_target",
    default=None,
    help="module:attribute of the application's Gates and RateLimits (the memory tree's "
    "llm gate is always shown).",
)
@click.pass_obj
@_one_line_errors
def status(
    obj: Context, as_json: bool, watch: bool, interval: float, limits_target: str | None
) -> None:
    """Counts by status and kind, the oldest waiting job, running leases, fleet-wide
    limits and their holders, schedules."""
    url = _safe_url(obj.database_url)
    limits = _load_limits(limits_target)
    with _open_queue(obj) as queue:
        if as_json:
            _echo_json(overview.status_report(queue, url, limits))
            return
        console = Console()
        if not watch:
            console.print(_render_status(overview.status_report(queue, url, limits)))
            return
        with Live(
            _render_status(overview.status_report(queue, url, limits)), console=console
        ) as live:
            try:
                while True:
                    time.sleep(interval)
                    live.update(_render_status(overview.status_report(queue, url, limits)))
            except KeyboardInterrupt:
                pass


_SEVERITY_STYLE = {Severity.OK: "green", Severity.WARNING: "yellow", Severity.CRITICAL: "bold red"}


def _render_findings(findings: Sequence[Finding], url: str) -> Group:
    table = Table(title=f"memtree doctor: {url}", show_edge=False, show_lines=True)
    for column in ("severity", "check", "summary", "advice"):
        table.add_column(column, overflow="fold")
    for finding in findings:
        summary = Text(finding.summary)
        if finding.severity is not Severity.OK:
            # The detail behind the summary: the sessions, relations or plans it is about.
            detail = [line for line in finding.detail.splitlines() if line != finding.summary]
            if detail:
                summary.append("\n" + "\n".join(detail), style="dim")
        table.add_row(
            Text(finding.severity.value, style=_SEVERITY_STYLE[finding.severity]),
            Text(finding.check.value),
            summary,
            Text(finding.advice),
        )
    counts = {s: sum(f.severity is s for f in findings) for s in Severity}
    tally = ", ".join(f"{n} {s.value}" for s, n in counts.items() if n)
    return Group(table, Text(f"{len(findings)} checks: {tally}"))


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for monitoring.")
@click.pass_obj
@_one_line_errors
def doctor_command(obj: Context, as_json: bool) -> None:
    """Check the database the queue lives in and say what to do about each finding.

    Every check is reported, passing ones too (severity ok). Exits 1 when any finding is
    critical and 0 otherwise, warnings included, so a monitor can run it; a database it
    cannot reach is one line on stderr and exit 1 as well.
    """
    url = _safe_url(obj.database_url)
    with _open_queue(obj) as queue:
        findings = diagnose(queue)
        dialect = queue.engine.dialect.name
    if as_json:
        _echo_json(
            {
                "database": url,
                "dialect": dialect,
                "worst": worst(findings).value,
                "findings": [finding.as_dict() for finding in findings],
            }
        )
    else:
        Console().print(_render_findings(findings, url))
    if worst(findings) is Severity.CRITICAL:
        click.get_current_context().exit(1)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--limits", "limits_target", default=None, help=_LIMITS_HELP)
@click.pass_obj
@_one_line_errors
def explain(obj: Context, job_id: str, as_json: bool, limits_target: str | None) -> None:
    """Why job JOB_ID is where it is: what it waits for, or how it ended."""
    limits = _load_limits(limits_target)
    with _open_queue(obj) as queue:
        found = explanation.explain(queue, job_id, limits)
    if found is None:
        raise click.ClickException(f"no job with id {job_id!r}")
    if as_json:
        _echo_json(found.as_dict())
        return
    console = Console(highlight=False)
    console.print(Text(f"{found.job_id}: {found.status}", style="bold"))
    console.print(Text(found.summary))
    for line in found.details:
        console.print(Text(f"  - {line}"))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8484, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--token",
    envvar="MEMTREE_DASHBOARD_TOKEN",
    default=None,
    help="Allow retry and cancel to an operator who signs in with this token "
    "(or $MEMTREE_DASHBOARD_TOKEN). Without it the page is read-only.",
)
@click.option("--limits", "limits_target", default=None, help=_LIMITS_HELP)
@click.option("--refresh", default=3.0, show_default=True, help="Seconds between refreshes.")
@click.pass_obj
@_one_line_errors
def dashboard(
    obj: Context, host: str, port: int, token: str | None, limits_target: str | None, refresh: float
) -> None:
    """Serve the dashboard: counts, throughput, running jobs, limits, workers, failures,
    each job's page and explanation."""
    try:
        import uvicorn

        from memtree.dashboard import create_app
    except ImportError as exc:
        raise click.ClickException(
            f"the dashboard needs the dashboard extra: pip install 'memtree[dashboard]' ({exc})"
        ) from None
    if token is not None and len(token) < 8:
        raise click.BadParameter("use a token of at least 8 characters", param_hint="--token")
    if refresh <= 0:
        raise click.BadParameter("must be > 0", param_hint="--refresh")
    limits = _load_limits(limits_target)
    with _open_queue(obj) as queue:
        queue.count_total()  # the schema is checked before the page is served
        app = create_app(queue, limits=limits, token=token, refresh_s=refresh)
        mode = "retry and cancel after signing in with the token" if token else "read-only"
        click.echo(f"memtree dashboard on http://{host}:{port}/ ({mode}); Ctrl-C stops it")
        if host not in ("127.0.0.1", "localhost", "::1") and token is None:
            click.echo("warning: serving beyond loopback; the page shows job payloads", err=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")


@main.command()
@click.argument("kind")
@click.option("--payload", default="null", help="The payload, as JSON.")
@click.option("--dedupe-key", default=None)
@click.option("--delay", type=Duration(), default=None, help="Due after this, e.g. 30s.")
@click.option("--at", "at", default=None, help="Due at this ISO 8601 time.")
@click.option("--max-attempts", type=int, default=None)
@click.pass_obj
@_one_line_errors
def enqueue(
    obj: Context,
    kind: str,
    payload: str,
    dedupe_key: str | None,
    delay: int | None,
    at: str | None,
    max_attempts: int | None,
) -> None:
    """Enqueue a job of KIND."""
    try:
        value = decode_payload(payload)
    except ValueError as exc:
        prefix = "not JSON: " if isinstance(exc, json.JSONDecodeError) else ""
        raise click.BadParameter(f"{prefix}{exc}", param_hint="--payload") from None
    if delay is not None and at is not None:
        raise click.UsageError("give --delay or --at, not both")
    with _open_queue(obj) as queue:
        available: int | None = None
        if delay is not None:
            available = queue.now_ms() + delay
        elif at is not None:
            try:
                moment = datetime.fromisoformat(at)
            except ValueError:
                raise click.BadParameter(
                    f"{at!r} is not an ISO 8601 time", param_hint="--at"
                ) from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            available = int(moment.timestamp() * 1000)
        job_id = queue.enqueue(NewJob(kind, value, dedupe_key, available, max_attempts))
    if job_id is None:
        click.echo(f"suppressed: a job with dedupe key {dedupe_key!r} is already active")
    else:
        click.echo(job_id)


@main.group()
def jobs() -> None:
    """List, inspect, retry, cancel and prune jobs."""


@jobs.command("list")
@click.option("--status", "status_", type=click.Choice([s.value for s in JobStatus]), default=None)
@click.option("--kind", default=None)
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_one_line_errors
def jobs_list(
    obj: Context, status_: str | None, kind: str | None, limit: int, as_json: bool
) -> None:
    """The newest jobs, filtered by status and kind."""
    with _open_queue(obj) as queue:
        found = overview.list_rows(
            queue, status=None if status_ is None else JobStatus(status_), kind=kind, limit=limit
        )
    if as_json:
        _echo_json(found)
        return
    table = Table(show_edge=False)
    for column in ("id", "kind", "status", "attempts", "due", "last error"):
        table.add_column(column, overflow="fold")
    for row in found:
        problem = row.get("unreadable")
        error = f"unreadable: {problem}" if problem else overview.text(row["last_error"] or "")
        table.add_row(
            *(
                Text(text)
                for text in (
                    overview.text(row["id"]),
                    overview.text(row["kind"]),
                    overview.text(row["status"]),
                    f"{row['attempts']}/{row['max_attempts']}",
                    overview.shown_ms(row["available_at_ms"]),
                    scrub(error, max_bytes=80),
                )
            )
        )
    Console().print(table)


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_one_line_errors
def jobs_show(obj: Context, job_id: str, as_json: bool) -> None:
    """Every column of one job, its payload pretty-printed, and its last error."""
    with _open_queue(obj) as queue:
        with queue.transaction() as conn:
            values = store.get_row(conn, job_id)
        found = None if values is None else explanation.explain(queue, job_id, _load_limits(None))
    if values is None:
        raise click.ClickException(f"no job with id {job_id!r}")
    data = overview.row_dict(values)
    if found is not None:
        data["explanation"] = found.as_dict()
    if as_json:
        _echo_json(data)
        return
    table = Table(show_header=False, show_edge=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in zip(store.JOB_COLUMNS, values, strict=True):
        if name in ("payload_json", "last_error"):
            continue
        shown = overview.shown_ms(value) if name.endswith("_ms") else overview.text(value)
        table.add_row(name, Text("-" if value is None else shown))
    console = Console()
    console.print(table)
    if "unreadable" in data:
        console.print(Text(f"cannot read this row as a job: {data['unreadable']}", style="red"))
    console.print("[bold]payload")
    if "payload_error" in data:
        console.print(Text(f"(not parsed: {data['payload_error']})", style="yellow"))
        console.print(overview.text(values[store.JOB_COLUMNS.index("payload_json")]), markup=False)
    else:
        console.print_json(data=data["payload"])
    if data["last_error"]:
        console.print("[bold]last error")
        console.print(overview.text(data["last_error"]), markup=False, highlight=False)
    if found is not None:
        console.print("[bold]why")
        console.print(Text(found.summary))
        for line in found.details:
            console.print(Text(f"  - {line}"))


@jobs.command("retry")
@click.argument("job_id", required=False)
@click.option("--failed", "all_failed", is_flag=True, help="Every failed job.")
@click.option("--transient-only", is_flag=True, help="Failed jobs that are not unrecoverable.")
@click.pass_obj
@_one_line_errors
def jobs_retry(obj: Context, job_id: str | None, all_failed: bool, transient_only: bool) -> None:
    """Retry a failed or cancelled job, every failed job, or the transient ones."""
    if sum((job_id is not None, all_failed, transient_only)) != 1:
        raise click.UsageError("give one of JOB_ID, --failed or --transient-only")
    with _open_queue(obj) as queue:
        if job_id is not None:
            if queue.requeue_job(job_id):
                click.echo(f"requeued {job_id}")
                return
            job = queue.get_job(job_id)
            if job is None:
                raise click.ClickException(f"no job with id {job_id!r}")
            raise click.ClickException(
                f"job {job_id} is {job.status.value}: only failed or cancelled jobs whose "
                "dedupe key is free can be retried"
            )
        count = maintenance.retry_failed(queue, transient_only=transient_only)
    click.echo(f"requeued {count} jobs")


@jobs.command("cancel")
@click.argument("job_id")
@click.pass_obj
@_one_line_errors
def jobs_cancel(obj: Context, job_id: str) -> None:
    """Cancel a ready job, or ask a running one to stop."""
    with _open_queue(obj) as queue:
        result = queue.cancel(job_id)
    if result is None:
        raise click.ClickException(f"no job with id {job_id!r}")
    if result is CancelOutcome.CANCELLED:
        click.echo(f"cancelled {job_id}")
    elif result is CancelOutcome.REQUESTED:
        click.echo(f"asked {job_id} to stop: it ends cancelled when its handler returns")
    else:
        with _open_queue(obj) as queue:
            job = queue.get_job(job_id)
        state = job.status.value if job else "gone"
        raise click.ClickException(f"job {job_id} has already finished: it is {state}")


@jobs.command("prune")
@click.option("--older-than", type=Duration(), required=True, help="e.g. 7d")
@click.option(
    "--status",
    "status_",
    type=click.Choice([JobStatus.DONE.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value]),
    default=JobStatus.DONE.value,
    show_default=True,
)
@click.option("--batch", default=10_000, show_default=True, help="Rows per statement.")
@click.pass_obj
@_one_line_errors
def jobs_prune(obj: Context, older_than: int, status_: str, batch: int) -> None:
    """Delete finished jobs completed longer ago than --older-than, in batches."""
    with _open_queue(obj) as queue:
        cutoff = queue.now_ms() - older_than
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), console=Console(stderr=True)
        ) as progress:
            task = progress.add_task(f"pruning {status_} jobs", total=None)
            total = maintenance.prune(
                queue,
                cutoff,
                status_,
                chunk_rows=batch,
                max_chunks=None,
                on_chunk=lambda pruned: progress.update(
                    task, description=f"pruned {pruned} {status_} jobs"
                ),
            )
    click.echo(f"pruned {total} {status_} jobs completed before {overview.iso(cutoff)}")


@jobs.command("purge-retired")
@click.pass_obj
@_one_line_errors
def jobs_purge_retired(obj: Context) -> None:
    """Delete jobs of retired kinds (topic_route, digest_daily)."""
    with _open_queue(obj) as queue:
        click.echo(f"purged {maintenance.purge_retired(queue)} retired jobs")


@main.command()
@click.pass_obj
@_one_line_errors
def recover(obj: Context) -> None:
    """Return jobs whose lease expired to ready now (workers also do it every 30 s)."""
    with _open_queue(obj) as queue:
        click.echo(f"recovered {maintenance.recover(queue)} jobs")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(prog_name=os.path.basename(sys.argv[0])))
