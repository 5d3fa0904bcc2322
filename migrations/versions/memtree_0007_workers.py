"""memtree's own: the table of running worker processes.

``mem_tree_workers`` holds one row per worker process: its name, the kinds it has
handlers for, and when it was last seen on the database's clock. ``memtree explain``
reads it to say that no running worker handles a job's kind, and which worker holds a
running job's lease. ``mem_tree_jobs`` is unchanged: the original crate reads and writes
it as before.

Revision ID: memtree_0007
Revises: memtree_0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.mysql import LONGTEXT

revision: str = "memtree_0007"
down_revision: str | None = "memtree_0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Millis = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

#: MySQL and MariaDB, as SQLAlchemy names them: they cannot index TEXT whole.
MYSQL = ("mysql", "mariadb")
#: For both names SQLAlchemy gives the engine (each reads its own prefix only).
TABLE_OPTIONS = {
    f"{dialect}_{option}": value
    for dialect in MYSQL
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}


Body = sa.Text().with_variant(LONGTEXT(), *MYSQL)


def Key(length: int = 255) -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(sa.String(length), *MYSQL)


def upgrade() -> None:
    op.create_table(
        "mem_tree_workers",
        sa.Column("id", Key(64), nullable=False),
        sa.Column("name", Key(), nullable=False),
        sa.Column("kinds", Body, nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("version", Key(64), nullable=False),
        sa.Column("started_at_ms", Millis, nullable=False),
        sa.Column("seen_at_ms", Millis, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_mem_tree_workers"),
        **TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("mem_tree_workers")
