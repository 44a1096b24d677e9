"""Events carry data beside their message: the numbers and facts other modules need (an
inference's seconds and device, a series verdict's series and text) are stored as JSON in
events.data instead of being parsed back out of the message. Events written before this
revision are given their data here, parsed once from their messages in the form they had.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import json
import re

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# The messages as dicomnode wrote them up to this revision (frozen here, whatever they become).
_INFERENCE = re.compile(r"^(\d+(?:\.\d+)?) s on (\S+?),? ")
_VERDICT = re.compile(r"^.*? instances?: (.*) \[([0-9.]+)\]$")


def upgrade() -> None:
    op.add_column("events", sa.Column("data", sa.Text(), nullable=True))
    events = sa.table("events", sa.column("id", sa.Integer), sa.column("kind", sa.String),
                      sa.column("message", sa.Text), sa.column("data", sa.Text))
    connection = op.get_bind()
    rows = connection.execute(sa.select(events.c.id, events.c.kind, events.c.message)
                              .where(events.c.kind.in_(("inference-done", "series-verdict")))).all()
    for event_id, kind, message in rows:
        if kind == "inference-done":
            found = _INFERENCE.match(message or "")
            data = {"seconds": float(found[1]), "device": found[2]} if found else None
        else:
            found = _VERDICT.match(message or "")
            data = {"series_uid": found[2], "verdict": found[1]} if found else None
        if data is not None:
            connection.execute(sa.update(events).where(events.c.id == event_id).values(data=json.dumps(data)))


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_column("data")
