"""Proof of delivery: a delivery may be confirmed by the destination (verify = "commitment" or
"query"); deliveries get the storage commitment transaction they are in, when its report is due
and when they were confirmed, and the table `commitments` holds each request and its report.
Existing rows get none (NULL): they were sent without verification.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)  # dicomnode.store.tables.Timestamp stores this type


def upgrade() -> None:
    op.create_table(
        "commitments",
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("requested_at", UTC_TIME, nullable=False),
        sa.Column("reported_at", UTC_TIME, nullable=True),
        sa.Column("reported_by", sa.String(length=16), nullable=True),
        sa.Column("committed", sa.Text(), nullable=True),
        sa.Column("failed", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("transaction_uid"),
    )
    op.create_index(op.f("ix_commitments_job_id"), "commitments", ["job_id"], unique=False)
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("transaction_uid", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("confirm_by", UTC_TIME, nullable=True))
        batch.add_column(sa.Column("confirmed_at", UTC_TIME, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("confirmed_at")
        batch.drop_column("confirm_by")
        batch.drop_column("transaction_uid")
    op.drop_index(op.f("ix_commitments_job_id"), table_name="commitments")
    op.drop_table("commitments")
