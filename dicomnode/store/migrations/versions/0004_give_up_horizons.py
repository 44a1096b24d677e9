"""Retries bounded by time: a delivery keeps trying until its give_up_at (delivery_give_up_hours
after it was planned), a job that waits on a transient cause until its own; a delivery's count
of attempts may be unbounded (max_attempts NULL). Existing rows get no horizon (NULL: bounded by
their max_attempts as before).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)  # dicomnode.store.tables.Timestamp stores this type


def upgrade() -> None:
    op.add_column("jobs", sa.Column("give_up_at", UTC_TIME, nullable=True))
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("give_up_at", UTC_TIME, nullable=True))
        batch.alter_column("max_attempts", existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.alter_column("max_attempts", existing_type=sa.Integer(), nullable=False)
        batch.drop_column("give_up_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("give_up_at")
