"""mem_tree_jobs as the original crate first shipped it.

Revision ID: memtree_0001
Revises:
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "memtree_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("memtree",)
depends_on: str | Sequence[str] | None = None

ACTIVE = "dedupe_key IS NOT NULL AND status IN ('ready', 'running')"
Millis = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "mem_tree_jobs",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("payload_json", sa.Text(), nullable=False),
        sa.Column("dedupe_key", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default=sa.text("'ready'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default=sa.text("5"), nullable=False),
        sa.Column("available_at_ms", Millis, nullable=False),
        sa.Column("locked_until_ms", Millis, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at_ms", Millis, nullable=False),
        sa.Column("started_at_ms", Millis, nullable=True),
        sa.Column("completed_at_ms", Millis, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_mem_tree_jobs"),
    )
    op.create_index("idx_mem_tree_jobs_ready", "mem_tree_jobs", ["status", "available_at_ms"])
    op.create_index("idx_mem_tree_jobs_kind", "mem_tree_jobs", ["kind"])
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
