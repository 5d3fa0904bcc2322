"""memtree's own: the tables of fleet-wide limits and periodic schedules.

``mem_tree_permits`` holds the permits of global gates, one row per permit, each naming
the claim that holds it; ``mem_tree_rate_events`` one row per start a rate limit
counted, in a sliding window on the database's clock; ``mem_tree_schedules`` the last
slot each periodic schedule enqueued. ``mem_tree_jobs`` gains only an index, partial
over running rows, that counts a gate's holders and finds expired leases without reading
the rest of the table; the original crate reads and writes the table as before.

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

#: MySQL and MariaDB, as SQLAlchemy names them. They cannot index TEXT whole and have no
#: partial indexes: their columns and indexes differ.
MYSQL = ("mysql", "mariadb")
#: For both names SQLAlchemy gives the engine (each reads its own prefix only).
TABLE_OPTIONS = {
    f"{dialect}_{option}": value
    for dialect in MYSQL
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}


def Key(length: int = 255) -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(sa.String(length), *MYSQL)


def on_mysql() -> bool:
    return op.get_bind().dialect.name in MYSQL


def upgrade() -> None:
    if on_mysql():
        op.create_index(
            "ix_mem_tree_jobs_running", "mem_tree_jobs", ["status", "kind", "locked_until_ms"]
        )
    else:
        op.create_index(
            "ix_mem_tree_jobs_running",
            "mem_tree_jobs",
            ["kind", "locked_until_ms"],
            sqlite_where=sa.text("status = 'running'"),
            postgresql_where=sa.text("status = 'running'"),
        )
    op.create_table(
        "mem_tree_permits",
        sa.Column("gate", Key(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("job_id", Key(), nullable=True),
        sa.Column("lease_token", Key(64), nullable=True),
        sa.PrimaryKeyConstraint("gate", "slot", name="pk_mem_tree_permits"),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "mem_tree_rate_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("limit_name", Key(), nullable=False),
        sa.Column("partition_key", Key(2000), nullable=False, server_default=sa.text("''")),
        sa.Column("at_ms", Millis, nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column("job_id", Key(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_mem_tree_rate_events"),
        **TABLE_OPTIONS,
    )
    op.create_index(
        "ix_mem_tree_rate_events_window",
        "mem_tree_rate_events",
        ["limit_name", "partition_key", "at_ms"],
        # MySQL indexes the first 255 characters of a key (InnoDB's key size).
        **{f"{dialect}_length": {"partition_key": 255} for dialect in MYSQL},
    )
    op.create_table(
        "mem_tree_schedules",
        sa.Column("name", Key(), nullable=False),
        sa.Column("last_slot_ms", Millis, nullable=False),
        sa.Column("updated_at_ms", Millis, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_mem_tree_schedules"),
        **TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("mem_tree_schedules")
    op.drop_table("mem_tree_permits")
    op.drop_index("ix_mem_tree_jobs_running", table_name="mem_tree_jobs")
    op.drop_index("ix_mem_tree_rate_events_window", table_name="mem_tree_rate_events")
    op.drop_table("mem_tree_rate_events")
