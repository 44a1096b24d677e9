"""Job priorities: jobs.priority (a config.Priority: urgent, high, normal, low), by which the
queue is claimed before not_before and id. Existing jobs are normal.

Revision "0005b_priority" follows 0004 on the cli-priorities branch; merged after another 0005,
its down_revision becomes that revision (the chain stays linear).

Revision ID: 0005b_priority
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005b_priority"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("priority", sa.String(length=8), nullable=False, server_default="normal"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("priority")
