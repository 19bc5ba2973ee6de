"""`keyq schema`: print the entity catalogue (entities, ops, payload JSON Schemas, versions).

By default it prints what the workers published in Redis (what producers without the entity
code validate against); ``--local`` describes the entity modules of this environment instead
(KEYQ_ENTITY_MODULES), without Redis, to check a change before deploying it.
"""

from __future__ import annotations

import json
import sys

import click

from keyq.cli_errors import EXIT_FAILED, handle_errors
from keyq.settings import Settings


@click.command("schema")
@click.argument("entity", required=False)
@click.option("--local", is_flag=True, help="Describe KEYQ_ENTITY_MODULES here, not Redis.")
@handle_errors
def schema(entity: str | None, local: bool) -> None:
    """Print the entity catalogue as JSON (one entity with ENTITY).

    \b
    keyq schema                 what the running workers published
    keyq schema cart            one entity
    keyq schema --local         from the entity modules of this environment
    """
    from keyq import catalogue
    from keyq.entity import EntityRegistry

    settings = Settings.from_env()
    if local:
        found = catalogue.describe(EntityRegistry.from_modules(settings.entity_modules))
    else:
        from keyq.connections import redis_client

        conn = redis_client(settings.redis_url, settings.timeouts)
        try:
            found = catalogue.load(conn, settings)
        finally:
            conn.close()
        if not found:
            click.echo(
                f"error: no entity catalogue in Redis under {catalogue.catalogue_key(settings)!r}"
                " (start a worker, or use --local)",
                err=True,
            )
            sys.exit(EXIT_FAILED)
    if entity is not None:
        if entity not in found:
            known = ", ".join(sorted(found)) or "none"
            click.echo(f"error: no entity {entity!r} in the catalogue; known: {known}", err=True)
            sys.exit(EXIT_FAILED)
        found = {entity: found[entity]}
    click.echo(json.dumps(found, indent=2, sort_keys=True))
