"""The review gate: jobs.reviewed_by and jobs.reviewed_at (who released or rejected a job's results
held for review, and when). The new job states (awaiting-review, rejected) fit the state column.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)  # dicomnode.store.tables.Timestamp stores this type


def upgrade() -> None:
    op.add_column("jobs", sa.Column("reviewed_by", sa.String(length=64), nullable=True))
    op.add_column("jobs", sa.Column("reviewed_at", UTC_TIME, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reviewed_at")
        batch.drop_column("reviewed_by")
