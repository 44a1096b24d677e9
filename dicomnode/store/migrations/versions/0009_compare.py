"""[models.compare]: jobs.prior_of_job (a compute-only job queued as the comparison prior of another
job: nothing delivered) and the table `timepoints` (the time point each job of a comparing model
kept, by patient, date and modalities). Existing jobs are ordinary jobs; no time points yet.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)  # dicomnode.store.tables.Timestamp stores this type


def upgrade() -> None:
    op.add_column("jobs", sa.Column("prior_of_job", sa.Integer(), nullable=True))
    op.create_table(
        "timepoints",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=False),
        sa.Column("study_time", sa.String(length=16), nullable=False),
        sa.Column("modalities", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("job_id"),
    )
    op.create_index(op.f("ix_timepoints_study_uid"), "timepoints", ["study_uid"], unique=False)
    op.create_index("ix_timepoints_patient", "timepoints", ["patient_id", "model"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_timepoints_patient", table_name="timepoints")
    op.drop_index(op.f("ix_timepoints_study_uid"), table_name="timepoints")
    op.drop_table("timepoints")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("prior_of_job")
