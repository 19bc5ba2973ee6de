"""Alembic environment of keyq's history; keyq passes its engine in config.attributes["engine"].

The revision is recorded in keyq's own version table (keyq.migrate.VERSION_TABLE), so an
application's Alembic history in the same database keeps ``alembic_version`` to itself. Offline
(``keyq migrate --sql``) only the engine's URL is used, to pick the dialect: nothing connects.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Engine

from keyq.migrate import VERSION_TABLE
from keyq.repo import metadata


def run_offline(engine: Engine) -> None:
    context.configure(
        url=engine.url,
        target_metadata=metadata,
        literal_binds=True,
        version_table=VERSION_TABLE,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online(engine: Engine) -> None:
    with engine.begin() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table=VERSION_TABLE,
            render_as_batch=True,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline(context.config.attributes["engine"])
else:
    run_online(context.config.attributes["engine"])
