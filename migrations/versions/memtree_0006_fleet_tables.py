"""memtree's own: the tables of fleet-wide rate limits and periodic schedules.

``mem_tree_rate_events`` holds one row per start a rate limit counted, in a sliding
window on the database's clock; ``mem_tree_schedules`` the last slot each periodic
schedule enqueued. Both are new tables: ``mem_tree_jobs`` is unchanged, so the original
crate reads and writes it as before.

Revision ID: memtree_0006
Revises: memtree_0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "memtree_0006"
down_revision: str | None = "memtree_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Millis = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "mem_tree_rate_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("limit_name", sa.Text(), nullable=False),
        sa.Column("partition_key", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("at_ms", Millis, nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column("job_id", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_mem_tree_rate_events"),
    )
    op.create_index(
        "ix_mem_tree_rate_events_window",
        "mem_tree_rate_events",
        ["limit_name", "partition_key", "at_ms"],
    )
    op.create_table(
        "mem_tree_schedules",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("last_slot_ms", Millis, nullable=False),
        sa.Column("updated_at_ms", Millis, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_mem_tree_schedules"),
    )


def downgrade() -> None:
    op.drop_table("mem_tree_schedules")
    op.drop_index("ix_mem_tree_rate_events_window", table_name="mem_tree_rate_events")
    op.drop_table("mem_tree_rate_events")
