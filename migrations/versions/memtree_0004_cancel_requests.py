"""memtree's own: cancellation requests for running jobs.

A ready job is cancelled at once; a running one is asked to stop by stamping
``cancel_requested_at_ms``, which its worker sees. The column is nullable, so the
original crate still reads and writes the table.

Revision ID: memtree_0004
Revises: memtree_0003
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "memtree_0004"
down_revision: str | None = "memtree_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Millis = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("mem_tree_jobs", sa.Column("cancel_requested_at_ms", Millis, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mem_tree_jobs") as batch:
        batch.drop_column("cancel_requested_at_ms")
