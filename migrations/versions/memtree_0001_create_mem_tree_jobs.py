"""mem_tree_jobs as the original crate first shipped it.

Revision ID: memtree_0001
Revises:
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.mysql import LONGTEXT

revision: str = "memtree_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("memtree",)
depends_on: str | Sequence[str] | None = None

ACTIVE = "dedupe_key IS NOT NULL AND status IN ('ready', 'running')"
Millis = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

#: MySQL and MariaDB, as SQLAlchemy names them. They cannot index TEXT whole, their TEXT
#: stops at 64 KiB, and they have no partial indexes: their columns and indexes differ.
MYSQL = ("mysql", "mariadb")
#: For both names SQLAlchemy gives the engine (each reads its own prefix only).
TABLE_OPTIONS = {
    f"{dialect}_{option}": value
    for dialect in MYSQL
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}


def Key(length: int = 255) -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(sa.String(length), *MYSQL)


Body = sa.Text().with_variant(LONGTEXT(), *MYSQL)


def on_mysql() -> bool:
    return op.get_bind().dialect.name in MYSQL


#: On MySQL the active key is a generated column's value, unique where not NULL.
ACTIVE_KEY = "CASE WHEN status IN ('ready', 'running') THEN SHA2(dedupe_key, 256) END"


def upgrade() -> None:
    op.create_table(
        "mem_tree_jobs",
        sa.Column("id", Key(), nullable=False),
        sa.Column("kind", Key(), nullable=False),
        sa.Column("payload_json", Body, nullable=False),
        sa.Column("dedupe_key", Key(2000), nullable=True),
        sa.Column("status", Key(32), server_default=sa.text("'ready'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default=sa.text("5"), nullable=False),
        sa.Column("available_at_ms", Millis, nullable=False),
        sa.Column("locked_until_ms", Millis, nullable=True),
        sa.Column("last_error", Body, nullable=True),
        sa.Column("created_at_ms", Millis, nullable=False),
        sa.Column("started_at_ms", Millis, nullable=True),
        sa.Column("completed_at_ms", Millis, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_mem_tree_jobs"),
        **TABLE_OPTIONS,
    )
    op.create_index("idx_mem_tree_jobs_ready", "mem_tree_jobs", ["status", "available_at_ms"])
    op.create_index("idx_mem_tree_jobs_kind", "mem_tree_jobs", ["kind"])
    if on_mysql():
        op.add_column(
            "mem_tree_jobs",
            sa.Column("dedupe_active", sa.String(64), sa.Computed(ACTIVE_KEY, persisted=False)),
        )
        op.create_index(
            "idx_mem_tree_jobs_dedupe_active", "mem_tree_jobs", ["dedupe_active"], unique=True
        )
        return
    op.create_index(
        "idx_mem_tree_jobs_dedupe_active",
        "mem_tree_jobs",
        ["dedupe_key"],
        unique=True,
        sqlite_where=sa.text(ACTIVE),
        postgresql_where=sa.text(ACTIVE),
    )


def downgrade() -> None:
    op.drop_table("mem_tree_jobs")
