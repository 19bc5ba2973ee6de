"""Dead letters keep the raw broker message (base64) and how often it was delivered.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("keyq_dead_letter") as batch:
        batch.add_column(sa.Column("raw", sa.Text, nullable=True))
        batch.add_column(
            sa.Column("deliveries", sa.Integer, nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("keyq_dead_letter") as batch:
        batch.drop_column("deliveries")
        batch.drop_column("raw")
