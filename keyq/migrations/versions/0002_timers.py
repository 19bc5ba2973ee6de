"""Timers: a key's pending messages to itself, stored with its state.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "keyq_timer",
        sa.Column("entity", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(1024), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("timer_id", sa.String(32), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("due_ms", sa.BigInteger, nullable=False),
        sa.Column("op", sa.String(64), nullable=False),
        sa.Column("payload", _json, nullable=True),
        sa.Column("every_ms", sa.BigInteger, nullable=True),
        sa.Column("catch_up", sa.String(16), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_keyq_timer_due", "keyq_timer", ["partition", "due_ms"])


def downgrade() -> None:
    op.drop_index("ix_keyq_timer_due", "keyq_timer")
    op.drop_table("keyq_timer")
