"""Alembic environment: keyq passes its engine in config.attributes["engine"]."""

from __future__ import annotations

from alembic import context

from keyq.repo import metadata

engine = context.config.attributes["engine"]

with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
