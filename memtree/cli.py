"""The ``memtree`` command: schema management today; the worker and operations commands build on it.

Every error is one line on stderr and a non-zero exit, never a traceback, and a
database password never appears in output.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click
from alembic.util import CommandError
from sqlalchemy import Engine, make_url
from sqlalchemy import exc as sa_exc

from memtree import migration
from memtree.engine import DEFAULT_DATABASE_URL, create_engine, normalize_url
from memtree.errors import MemtreeError

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return "<unparseable URL>"


def _one_line_errors(func: F) -> F:
    """Report memtree, Alembic and database errors as one line and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (MemtreeError, CommandError) as exc:
            raise click.ClickException(str(exc).splitlines()[0]) from None
        except sa_exc.ArgumentError as exc:
            raise click.ClickException(f"bad database URL: {exc}") from None
        except sa_exc.DBAPIError as exc:
            detail = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            raise click.ClickException(f"database error: {detail}") from None
        except ModuleNotFoundError as exc:
            raise click.ClickException(f"a database driver is missing: {exc.name}") from None

    return wrapper  # type: ignore[return-value]


class Context:
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def engine(self) -> Engine:
        return create_engine(self.database_url)


database_url_option = click.option(
    "--database-url",
    envvar="MEMTREE_DATABASE_URL",
    default=DEFAULT_DATABASE_URL,
    show_default=True,
    help="SQLAlchemy URL of the database (env MEMTREE_DATABASE_URL).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@database_url_option
@click.version_option(package_name="memtree")
@click.pass_context
def main(ctx: click.Context, database_url: str) -> None:
    """memtree: a durable job queue in your application's own SQL database."""
    ctx.obj = Context(database_url)


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
def current(obj: Context) -> None:
    """Print the database's memtree revision."""
    engine = obj.engine()
    try:
        with engine.connect() as conn:
            revision = migration.schema_revision(conn)
        head = migration.head_revision()
        state = "head" if revision == head else f"head is {head}"
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
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        return parse_duration_ms(str(value))


def load_handlers(target: str) -> Any:
    """Import ``module:attribute`` (from the current directory too) as a handlers mapping."""
    import importlib
    from collections.abc import Mapping

    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise click.ClickException(f"--app takes module:attribute, not {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise click.ClickException(
            f"cannot import {module_name!r} for --app: {type(exc).__name__}: {exc}"
        ) from None
    try:
        handlers = getattr(module, attribute)
    except AttributeError:
        raise click.ClickException(
            f"module {module_name!r} has no attribute {attribute!r}"
        ) from None
    if callable(handlers) and not isinstance(handlers, Mapping):
        handlers = handlers()
    if not isinstance(handlers, Mapping):
        raise click.ClickException(
            f"{target} is a {type(handlers).__name__}, not a mapping of kind -> handler"
        )
    return handlers


@main.command()
@click.option("--app", "app", required=True, help="module:attribute of a kind -> handler mapping.")
@click.option("--concurrency", default=4, show_default=True, help="Handler threads.")
@click.option(
    "--lease", type=Duration(), default=None, help="Lease of a claim (default: 5m), e.g. 30s."
)
@click.option("--poll-interval", type=float, default=None, help="Idle poll, seconds.")
@click.option("--shutdown-grace", type=float, default=30.0, show_default=True, help="Seconds.")
@click.option(
    "--retention",
    type=Duration(),
    default="7d",
    show_default=True,
    help="Keep done rows this long.",
)
@click.option("--no-gates", is_flag=True, help="Run without the default LLM gate.")
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
    log_level: str,
) -> None:
    """Run a worker for the handlers in --app until SIGINT/SIGTERM."""
    import logging

    from memtree.queue import Queue
    from memtree.types import DEFAULT_LOCK_DURATION_MS
    from memtree.worker import DEFAULT_GATES, Worker

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    handlers = load_handlers(app)
    engine = obj.engine()
    queue = Queue(engine, lock_duration_ms=lease or DEFAULT_LOCK_DURATION_MS)
    try:
        with queue.transaction():
            pass  # fail now, clearly, on a missing or outdated schema
        runner = Worker(
            queue,
            handlers,
            concurrency=concurrency,
            gates=() if no_gates else DEFAULT_GATES,
            poll_interval_s=poll_interval,
            shutdown_grace_s=shutdown_grace,
            retention_ms=retention,
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

    from memtree.demo import DEFAULT_DB, run_demo

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(prog_name=os.path.basename(sys.argv[0])))
