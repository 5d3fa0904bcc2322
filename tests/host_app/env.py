"""A host application's Alembic environment that carries memtree's revisions too.

This is what ``docs/migrations.md`` describes: the application keeps its own history
in the default ``alembic_version`` table and lists memtree's revisions in
``version_locations``, so one ``alembic upgrade heads`` migrates both. Its
``include_object`` is ``memtree.migration.host_include_object``, so the application's
autogenerate and ``alembic check`` leave ``mem_tree_jobs`` and
``memtree_alembic_version`` to memtree. The same ``env.py`` serves an application
that leaves memtree in its own version table (the default route).

The tests pass an open connection in ``config.attributes["connection"]``; the
``sqlalchemy.url`` option is used otherwise.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Column, Integer, MetaData, Table, Text, create_engine

import memtree.migration

config = context.config

# The application's own models (a real application imports its declarative Base).
target_metadata = MetaData()
Table(
    "host_orders",
    target_metadata,
    Column("id", Integer, primary_key=True),
    Column("note", Text, nullable=True),
)


options: dict[str, Any] = {
    "target_metadata": target_metadata,
    # Everything but memtree's tables: memtree's own revisions manage those.
    "include_object": memtree.migration.host_include_object,
    "compare_type": True,
    "render_as_batch": True,
}


def run_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True, **options)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(str(config.get_main_option("sqlalchemy.url")))
    try:
        with engine.begin() as conn:
            context.configure(connection=conn, **options)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
