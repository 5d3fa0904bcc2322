"""Alembic, driven from memtree: upgrade, downgrade, adoption of the original's table, checks.

memtree owns an Alembic environment (``memtree.migrations``) with its own version
table, ``memtree_alembic_version``. ``upgrade`` first *adopts* a database that the
original crate made (``CREATE TABLE IF NOT EXISTS`` and no version table): it stamps
the revision matching the table's layout and upgrades from there, so rows are kept.

Host applications can instead pull memtree's revisions into their own history with
:func:`version_location` and the ``memtree`` branch label (see ``docs/migrations.md``);
:func:`schema_revision` then finds memtree's revision in the host's version table.
Either way a host's own environment passes :func:`host_include_object`, so its
autogenerate and ``alembic check`` leave memtree's tables alone.

When memtree's version table is lost (a host's autogenerate dropped it), :func:`stamp`
records again the revision whose layout the table has, and nothing else.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import produce_migrations
from alembic.config import Config
from alembic.operations import ops
from alembic.operations.ops import MigrationScript
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, String, column, inspect, select, text
from sqlalchemy import table as table_clause

from memtree.engine import begin_write
from memtree.errors import SchemaError
from memtree.models import PERMITS_TABLE, RATE_EVENTS_TABLE, SCHEDULES_TABLE, TABLE_NAME, Base

__all__ = [
    "BRANCH_LABEL",
    "LOST_REVISION",
    "VERSION_TABLE",
    "alembic_config",
    "check",
    "current",
    "downgrade",
    "head_revision",
    "host_include_object",
    "include_object",
    "known_revisions",
    "offline_sql",
    "revision_lost",
    "revisions",
    "schema_revision",
    "script_location",
    "stamp",
    "tolerate_sqlite_nullable_primary_key",
    "upgrade",
    "version_location",
]

VERSION_TABLE = "memtree_alembic_version"
BRANCH_LABEL = "memtree"
HOST_VERSION_TABLE = "alembic_version"
# Any constant works; it only has to be the same in every memtree process.
_PG_MIGRATION_LOCK = 0x6D656D74  # "memt"
#: memtree's tables besides the jobs: they are memtree's own, the original never had them.
_OWN_TABLES = (PERMITS_TABLE, RATE_EVENTS_TABLE, SCHEDULES_TABLE)
#: The tables memtree's schema consists of: its jobs, its own tables and its version table.
_MEMTREE_TABLES = frozenset({TABLE_NAME, *_OWN_TABLES, VERSION_TABLE})
#: A column only memtree's revisions add (memtree_0003): the original never had it.
_MEMTREE_COLUMN = "lease_token"
#: What every refusal of a table whose revision record is lost says to do.
LOST_REVISION = (
    f"{TABLE_NAME} has memtree's columns but no revision is recorded ({VERSION_TABLE} is "
    "missing or empty; an application's autogenerate may have dropped it): run "
    "`memtree db stamp` to record the revision the table's layout matches"
)

#: What each revision adds to mem_tree_jobs (and memtree's own tables), as :func:`_layout`
#: describes them.
#: A new revision adds its entry here; the tests stamp every revision from its layout.
_REVISION_ADDS: dict[str, frozenset[str]] = {
    "memtree_0001": frozenset(
        {
            *(
                f"column {name}"
                for name in (
                    "id",
                    "kind",
                    "payload_json",
                    "dedupe_key",
                    "status",
                    "attempts",
                    "max_attempts",
                    "available_at_ms",
                    "locked_until_ms",
                    "last_error",
                    "created_at_ms",
                    "started_at_ms",
                    "completed_at_ms",
                )
            ),
            "index idx_mem_tree_jobs_ready (status, available_at_ms)",
            "index idx_mem_tree_jobs_kind (kind)",
            "unique index idx_mem_tree_jobs_dedupe_active (dedupe_key)",
        }
    ),
    "memtree_0002": frozenset({"column failure_reason", "column failure_class"}),
    "memtree_0003": frozenset(
        {"column lease_token", "index ix_mem_tree_jobs_claim (kind, available_at_ms)"}
    ),
    "memtree_0004": frozenset({"column cancel_requested_at_ms"}),
    "memtree_0005": frozenset({"column heal_count"}),
    "memtree_0006": frozenset(
        {
            "index ix_mem_tree_jobs_running (kind, locked_until_ms)",
            *(f"table {name}" for name in (PERMITS_TABLE, RATE_EVENTS_TABLE, SCHEDULES_TABLE)),
        }
    ),
}


def script_location() -> Path:
    """The directory of memtree's Alembic environment, installed or in a checkout."""
    try:
        location = Path(str(resources.files("memtree.migrations")))
    except ModuleNotFoundError:  # a source checkout that was not installed
        location = Path(__file__).resolve().parent.parent / "migrations"
    if not (location / "env.py").is_file():
        raise SchemaError(f"memtree's migrations are missing from {location}")
    return location


def version_location() -> str:
    """The directory of memtree's revisions, for a host's ``version_locations``."""
    return str(script_location() / "versions")


def _table_of(obj: Any, name: str | None, type_: str) -> str | None:
    """The table an object of an ``include_object`` hook is or belongs to, if any."""
    if type_ == "table":
        return name
    table = getattr(obj, "table", None)
    return None if table is None else str(table.name)


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """memtree's own ``include_object`` hook: keep only memtree's tables.

    memtree's environment uses it so the host's tables are never drift. It keeps
    ``memtree_alembic_version`` too (Alembic already leaves an environment's own
    version table out), so that the negation, ``not include_object(...)``, which
    earlier docs gave hosts, leaves both of memtree's tables alone as well.
    """
    table = _table_of(obj, name, type_)
    return table is None or table in _MEMTREE_TABLES


def host_include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """The ``include_object`` hook for a host application's Alembic environment.

    It leaves out ``mem_tree_jobs`` (its columns, indexes and constraints) and
    ``memtree_alembic_version``, so the host's autogenerate never writes a drop of
    either and its ``alembic check`` never reports them. Everything else is kept.
    """
    return _table_of(obj, name, type_) not in _MEMTREE_TABLES


def tolerate_sqlite_nullable_primary_key(
    context: MigrationContext, _revision: object, directives: list[MigrationScript]
) -> None:
    """A ``process_revision_directives`` hook: ignore the nullability of SQLite's text key.

    SQLite lets a non-INTEGER ``PRIMARY KEY`` hold NULL, so the original's
    ``id TEXT PRIMARY KEY`` reflects as nullable while memtree's model says NOT NULL.
    memtree always writes an id, so the difference is not drift worth a rebuild.
    """
    if context.dialect.name != "sqlite":
        return
    for script in directives:
        for upgrade_ops in script.upgrade_ops_list:
            kept = []
            for table_ops in upgrade_ops.ops:
                if isinstance(table_ops, ops.ModifyTableOps) and table_ops.table_name == TABLE_NAME:
                    table_ops.ops = [
                        op
                        for op in table_ops.ops
                        if not (
                            isinstance(op, ops.AlterColumnOp)
                            and op.column_name == "id"
                            and op.modify_nullable is False
                            and op.modify_type is None
                            and op.modify_server_default is False
                        )
                    ]
                    if not table_ops.ops:
                        continue
                kept.append(table_ops)
            upgrade_ops.ops = kept


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` for memtree's environment, bound to a URL or an open connection."""
    config = Config(stdout=io.StringIO())
    config.set_main_option("script_location", str(script_location()))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None
    return head


def revisions() -> list[str]:
    """memtree's revisions, newest first, as ``id: message``."""
    return [f"{rev.revision}: {rev.doc.splitlines()[0]}" for rev in _script().walk_revisions()]


def known_revisions() -> set[str]:
    return {rev.revision for rev in _script().walk_revisions()}


@contextmanager
def _migration_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction for the whole migration, serialised between processes."""
    with engine.connect() as conn, begin_write(conn):
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        yield conn


def _recorded(conn: Connection) -> tuple[str, str] | None:
    """The version table that records memtree's revision, and that revision."""
    inspector = inspect(conn)
    known = known_revisions()
    for table in (VERSION_TABLE, HOST_VERSION_TABLE):
        if not inspector.has_table(table):
            continue
        version_num = column("version_num", String)
        rows = conn.execute(select(version_num).select_from(table_clause(table))).scalars().all()
        mine = [row for row in rows if row in known or row.startswith("memtree_")]
        if mine:
            return table, str(mine[0])
    return None


def _own_revision(conn: Connection) -> str | None:
    """The revision in memtree's own version table; SchemaError if the host's history has it."""
    recorded = _recorded(conn)
    if recorded is None:
        return None
    table, revision = recorded
    if table == HOST_VERSION_TABLE:
        raise SchemaError(
            f"memtree's revisions are in your application's {HOST_VERSION_TABLE} (at {revision}): "
            "upgrade through your own Alembic history, not memtree's"
        )
    return revision


def _columns(conn: Connection) -> set[str]:
    return {column["name"] for column in inspect(conn).get_columns(TABLE_NAME)}


def revision_lost(conn: Connection) -> bool:
    """True when ``mem_tree_jobs`` has memtree's own columns but no revision is recorded.

    :func:`stamp` (``memtree db stamp``) records it again.
    """
    return (
        _recorded(conn) is None
        and inspect(conn).has_table(TABLE_NAME)
        and _MEMTREE_COLUMN in _columns(conn)
    )


def _adopt(conn: Connection, config: Config) -> str | None:
    """Stamp the revision an unversioned original table matches; None when nothing to adopt."""
    if _own_revision(conn) is not None or not inspect(conn).has_table(TABLE_NAME):
        return None
    columns = _columns(conn)
    if _MEMTREE_COLUMN in columns:
        raise SchemaError(LOST_REVISION)
    revision = "memtree_0002" if {"failure_reason", "failure_class"} <= columns else "memtree_0001"
    command.stamp(config, revision)
    return revision


def _layout(conn: Connection) -> frozenset[str]:
    """mem_tree_jobs' columns and indexes, each as one line such as ``column kind``, and
    which of memtree's own tables exist (``table mem_tree_schedules``)."""
    inspector = inspect(conn)
    lines = {f"column {column['name']}" for column in inspector.get_columns(TABLE_NAME)}
    lines.update(f"table {name}" for name in _OWN_TABLES if inspector.has_table(name))
    for index in inspector.get_indexes(TABLE_NAME):
        kind = "unique index" if index["unique"] else "index"
        columns = ", ".join(str(name) for name in index["column_names"])
        lines.add(f"{kind} {index['name']} ({columns})")
    return frozenset(lines)


def _layout_revision(conn: Connection) -> str:
    """The revision whose layout mem_tree_jobs has exactly; SchemaError when none has."""
    actual = _layout(conn)
    expected: frozenset[str] = frozenset()
    closest: tuple[int, str, frozenset[str]] | None = None
    for script in reversed(list(_script().walk_revisions())):
        expected = expected | _REVISION_ADDS[script.revision]
        if actual == expected:
            return script.revision
        distance = len(actual ^ expected)
        if closest is None or distance < closest[0]:
            closest = (distance, script.revision, expected)
    assert closest is not None
    _, revision, layout = closest
    differences = [f"missing {line}" for line in sorted(layout - actual)]
    differences += [f"unexpected {line}" for line in sorted(actual - layout)]
    raise SchemaError(
        f"{TABLE_NAME} matches no memtree revision exactly, so no revision was stamped "
        f"(closest is {revision}: {'; '.join(differences)})"
    )


def stamp(engine: Engine) -> str | None:
    """Record the revision mem_tree_jobs' layout matches, when no revision is recorded.

    This mends a database whose ``memtree_alembic_version`` was dropped or emptied: it
    compares the table's columns and indexes with each revision's, stamps the one that
    matches exactly and changes nothing else. It refuses a layout that matches none, a
    database without the table, and one whose revisions are in the host's history.
    Returns the revision it stamped, or None when one was already recorded.
    """
    with _migration_transaction(engine) as conn:
        if _own_revision(conn) is not None:
            return None
        if not inspect(conn).has_table(TABLE_NAME):
            raise SchemaError(
                f"there is no {TABLE_NAME} table to stamp: `memtree db upgrade` creates it"
            )
        revision = _layout_revision(conn)
        command.stamp(alembic_config(connection=conn), revision)
        return revision


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the database to ``revision``, adopting an original table first.

    Returns the revision an original table was adopted at, or None.
    """
    with _migration_transaction(engine) as conn:
        config = alembic_config(connection=conn)
        adopted = _adopt(conn, config)
        command.upgrade(config, revision)
        return adopted


def downgrade(engine: Engine, revision: str) -> None:
    """Step the schema down to ``revision`` (``base`` drops the table)."""
    with _migration_transaction(engine) as conn:
        command.downgrade(alembic_config(connection=conn), revision)


def current(engine: Engine) -> str | None:
    """The revision in memtree's own version table, or None."""
    with engine.connect() as conn:
        return MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()


def schema_revision(conn: Connection) -> str | None:
    """memtree's revision in this database: its own version table, else the host's history."""
    recorded = _recorded(conn)
    return None if recorded is None else recorded[1]


def check(engine: Engine) -> None:
    """Raise ``alembic.util.CommandError`` if the database differs from the models.

    Works on memtree's own history and on a schema the host's history manages. A table
    whose revision record is lost raises :class:`SchemaError` naming ``memtree db stamp``.
    """
    with engine.connect() as conn:
        if revision_lost(conn):
            raise SchemaError(LOST_REVISION)
        managed_by_host = not inspect(conn).has_table(VERSION_TABLE)
        revision = schema_revision(conn) if managed_by_host else None
        if revision is None:
            command.check(alembic_config(connection=conn))
            return
        head = head_revision()
        if revision != head:
            raise CommandError(f"memtree's schema is at {revision}, not {head}: upgrade first")
        context = MigrationContext.configure(
            conn, opts={"include_object": include_object, "compare_type": True}
        )
        script = produce_migrations(context, Base.metadata)
        tolerate_sqlite_nullable_primary_key(context, None, [script])
        diffs = script.upgrade_ops_list[-1].as_diffs() if script.upgrade_ops_list else []
        if diffs:
            raise CommandError(f"mem_tree_jobs differs from memtree's models: {diffs}")


def offline_sql(url: str, revision: str = "head", start: str | None = None) -> str:
    """The DDL of an upgrade as SQL text, for DBAs who apply it by hand."""
    config = alembic_config(url=url)
    buffer = io.StringIO()
    config.output_buffer = buffer
    command.upgrade(config, f"{start}:{revision}" if start else revision, sql=True)
    return buffer.getvalue()
