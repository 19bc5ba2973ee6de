"""`keyq migrate [--sql] | current`: upgrade keyq's schema, print its SQL, or show its revision.

keyq's revision lives in its own table (keyq.migrate.VERSION_TABLE), so these commands never
read or change an application's ``alembic_version`` (apart from the one-time move of keyq's own
row out of it, see keyq.migrate).
"""

from __future__ import annotations

import json
from typing import Any

import click

from keyq.cli_errors import handle_errors
from keyq.settings import Settings


def _print(value: Any) -> None:
    click.echo(json.dumps(value, sort_keys=True, default=str))


@click.group("migrate", invoke_without_command=True)
@click.option(
    "--sql",
    is_flag=True,
    help="Print the upgrade's SQL (from the current revision) instead of running it.",
)
@click.pass_context
@handle_errors
def migrate(ctx: click.Context, sql: bool) -> None:
    """Upgrade keyq's schema to the newest revision (workers also do it on start).

    \b
    Examples:
      keyq migrate                  upgrade; prints {"migrated": true, "revision": ...}
      keyq migrate --sql > up.sql   the SQL of that upgrade, for a DBA; changes nothing
      keyq migrate current          prints {"head": ..., "revision": ...}
    """
    if ctx.invoked_subcommand is not None:
        if sql:
            raise click.UsageError("--sql goes with the upgrade, not with a subcommand")
        return
    settings = Settings.from_env()
    if sql:
        from keyq.migrate import upgrade_sql
        from keyq.repo import make_engine

        engine = make_engine(settings.database_url, timeouts=settings.timeouts)
        try:
            click.echo(upgrade_sql(engine), nl=False)
        finally:
            engine.dispose()
        return
    from keyq.migrate_lock import migrate_with_lock

    revision = migrate_with_lock(settings, wait_s=settings.startup_wait_s)
    _print({"migrated": True, "revision": revision})


@migrate.command()
@handle_errors
def current() -> None:
    """Print keyq's revision in the database (null before the first upgrade) and the newest."""
    from keyq.migrate import current_revision, head_revision
    from keyq.repo import make_engine

    settings = Settings.from_env()
    engine = make_engine(settings.database_url, timeouts=settings.timeouts)
    try:
        _print({"revision": current_revision(engine), "head": head_revision(engine)})
    finally:
        engine.dispose()
