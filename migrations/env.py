"""Alembic environment for memtree's own history.

memtree keeps its revision in its own version table (``memtree_alembic_version``),
so it never touches the host application's ``alembic_version``. Only the
``mem_tree_jobs`` table is compared by autogenerate and ``alembic check``, so the
host's tables in the same database are never reported as drift.

``memtree.migration`` passes an open connection in ``config.attributes``; the
``sqlalchemy.url`` option is used otherwise (offline SQL included).
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import create_engine

from memtree.migration import (
    VERSION_TABLE,
    include_object,
    tolerate_dialect_differences,
)
from memtree.models import Base

config = context.config
target_metadata = Base.metadata

options: dict[str, Any] = {
    "target_metadata": target_metadata,
    "version_table": VERSION_TABLE,
    "include_object": include_object,
    "compare_type": True,
    "render_as_batch": True,
    "process_revision_directives": tolerate_dialect_differences,
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
