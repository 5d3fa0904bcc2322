"""The host application's first table.

Revision ID: host_0001
Revises:
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "host_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("host",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "host_orders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("host_orders")
