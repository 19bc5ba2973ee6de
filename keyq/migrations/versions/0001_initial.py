"""Initial schema: entity state, partition fences, dead letters.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "keyq_state",
        sa.Column("entity", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(1024), primary_key=True),
        sa.Column("state", _json, nullable=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("fence", sa.BigInteger, nullable=False),
        sa.Column("recent_ids", _json, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "keyq_partition",
        sa.Column("partition", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("fence", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "keyq_dead_letter",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("entity", sa.String(128), nullable=False),
        sa.Column("key", sa.String(1024), nullable=False),
        sa.Column("op", sa.String(128), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("envelope", _json, nullable=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("error_type", sa.String(256), nullable=False),
        sa.Column("error_message", sa.Text, nullable=False),
        sa.Column("traceback", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_keyq_dead_letter_entity_key", "keyq_dead_letter", ["entity", "key"])
    op.create_index("ix_keyq_state_active", "keyq_state", ["entity", "active"])


def downgrade() -> None:
    op.drop_index("ix_keyq_state_active", "keyq_state")
    op.drop_index("ix_keyq_dead_letter_entity_key", "keyq_dead_letter")
    op.drop_table("keyq_dead_letter")
    op.drop_table("keyq_partition")
    op.drop_table("keyq_state")
