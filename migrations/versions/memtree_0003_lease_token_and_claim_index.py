"""memtree's own: a per-claim lease token and the claim index.

The lease token is nullable, so the original crate still reads and writes the table
(it names its columns in every statement). The claim index covers only ready rows,
so neither the done history nor other kinds' backlog is read by a claim.

Revision ID: memtree_0003
Revises: memtree_0002
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

MYSQL = ("mysql", "mariadb")

revision: str = "memtree_0003"
down_revision: str | None = "memtree_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READY = "status = 'ready'"


def upgrade() -> None:
    token = sa.Text().with_variant(sa.String(64), *MYSQL)
    op.add_column("mem_tree_jobs", sa.Column("lease_token", token, nullable=True))
    if op.get_bind().dialect.name in MYSQL:
        # No partial indexes: the status leads instead.
        op.create_index(
            "ix_mem_tree_jobs_claim", "mem_tree_jobs", ["status", "kind", "available_at_ms"]
        )
        return
    op.create_index(
        "ix_mem_tree_jobs_claim",
        "mem_tree_jobs",
        ["kind", "available_at_ms"],
        sqlite_where=sa.text(READY),
        postgresql_where=sa.text(READY),
    )


def downgrade() -> None:
    op.drop_index("ix_mem_tree_jobs_claim", table_name="mem_tree_jobs")
    with op.batch_alter_table("mem_tree_jobs") as batch:
        batch.drop_column("lease_token")
