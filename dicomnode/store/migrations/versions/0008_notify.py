"""Notifications ([[notify]] webhooks and HL7 targets): the outbox. `notifications` holds one row
per event to tell (written with the state change it tells), `notification_sends` one row per
event and target with its state (a NotifyState), tries, backoff and the body sent.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)  # dicomnode.store.tables.Timestamp stores this type


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("key", sa.String(length=128), nullable=True),
        sa.Column("data", sa.Text(), nullable=True),
        sa.Column("routed_at", UTC_TIME, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "job_id", "key", name="uq_notifications_once"),
    )
    op.create_index(op.f("ix_notifications_job_id"), "notifications", ["job_id"], unique=False)
    op.create_index(op.f("ix_notifications_routed_at"), "notifications", ["routed_at"], unique=False)
    op.create_table(
        "notification_sends",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("notification_id", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", UTC_TIME, nullable=False),
        sa.Column("lease_until", UTC_TIME, nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.Column("sent_at", UTC_TIME, nullable=True),
        sa.ForeignKeyConstraint(["notification_id"], ["notifications.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("notification_id", "target", name="uq_notification_sends_target"),
    )
    op.create_index(op.f("ix_notification_sends_notification_id"), "notification_sends", ["notification_id"],
                    unique=False)
    op.create_index(op.f("ix_notification_sends_state"), "notification_sends", ["state"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_notification_sends_state"), table_name="notification_sends")
    op.drop_index(op.f("ix_notification_sends_notification_id"), table_name="notification_sends")
    op.drop_table("notification_sends")
    op.drop_index(op.f("ix_notifications_routed_at"), table_name="notifications")
    op.drop_index(op.f("ix_notifications_job_id"), table_name="notifications")
    op.drop_table("notifications")
