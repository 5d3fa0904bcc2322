"""Typed failure columns: failure_reason and failure_class (the original's second layout).

Revision ID: memtree_0002
Revises: memtree_0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "memtree_0002"
down_revision: str | None = "memtree_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("mem_tree_jobs", sa.Column("failure_reason", sa.Text(), nullable=True))
    op.add_column("mem_tree_jobs", sa.Column("failure_class", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mem_tree_jobs") as batch:
        batch.drop_column("failure_class")
        batch.drop_column("failure_reason")
