"""memtree's own: how many times self-heal has revived a failed job.

Self-heal (``requeue_transient_failed``) gives a transiently failed job a fresh budget
of attempts; ``heal_count`` bounds how often, so a job that fails for good stays failed.
The column has a default, so the original crate, which names its columns in every
statement, still inserts rows.

Revision ID: memtree_0005
Revises: memtree_0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "memtree_0005"
down_revision: str | None = "memtree_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "mem_tree_jobs",
        sa.Column("heal_count", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    with op.batch_alter_table("mem_tree_jobs") as batch:
        batch.drop_column("heal_count")
