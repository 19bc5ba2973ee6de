"""`keyq dead-letters list|show|replay|purge`: operate on the dead-letter table."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from keyq.cli_errors import EXIT_FAILED, EXIT_USAGE, handle_errors
from keyq.errors import ValidationError
from keyq.settings import Settings


def _print(value: Any) -> None:
    click.echo(json.dumps(value, sort_keys=True, default=str))


def _row(d: Any, full: bool = False) -> dict[str, Any]:
    row = {
        "id": d.id,
        "message_id": d.message_id,
        "entity": d.entity,
        "key": d.key,
        "op": d.op,
        "partition": d.partition,
        "reason": d.reason,
        "error_type": d.error_type,
        "error_message": d.error_message,
        "attempts": d.attempts,
        "created_at": d.created_at,
    }
    if full:
        row["envelope"] = d.envelope
        row["traceback"] = d.traceback
    return row


@click.group("dead-letters")
def dead_letters() -> None:
    """Inspect, replay or purge messages that could not be applied."""


def _filters(fn: Any) -> Any:
    fn = click.option("--entity", default=None)(fn)
    fn = click.option("--key", default=None)(fn)
    fn = click.option(
        "--reason", type=click.Choice(["malformed", "unknown", "crashed"]), default=None
    )(fn)
    return fn


@dead_letters.command("list")
@_filters
@click.option("--limit", default=100, show_default=True)
@handle_errors
def list_(entity: str | None, key: str | None, reason: str | None, limit: int) -> None:
    """One JSON line per dead letter, oldest first."""
    from keyq.repo import Repo

    repo = Repo(Settings.from_env().database_url)
    for d in repo.dead_letters(entity=entity, key=key, reason=reason, limit=limit):
        _print(_row(d))


@dead_letters.command()
@click.argument("ids", type=int, nargs=-1, required=True)
@handle_errors
def show(ids: tuple[int, ...]) -> None:
    """Everything about the given dead letters, traceback included."""
    from keyq.repo import Repo

    repo = Repo(Settings.from_env().database_url)
    found = repo.dead_letters(ids=list(ids), limit=len(ids))
    if not found:
        click.echo(f"error: no dead letter with id(s) {list(ids)}", err=True)
        sys.exit(EXIT_FAILED)
    for d in found:
        _print(_row(d, full=True))


@dead_letters.command()
@click.argument("ids", type=int, nargs=-1, required=True)
@click.option("--keep", is_flag=True, help="Keep the rows after re-sending them.")
@handle_errors
def replay(ids: tuple[int, ...], keep: bool) -> None:
    """Re-send the original messages on their keys' partitions (new message ids).

    Rows that cannot be re-sent (malformed or unknown messages) are reported and kept. When
    the broker is down the command stops (exit 3); rows re-sent before that are removed.
    """
    from keyq.client import Client
    from keyq.repo import Repo

    settings = Settings.from_env()
    repo = Repo(settings.database_url)
    found = repo.dead_letters(ids=list(ids), limit=len(ids))
    missing = sorted(set(ids) - {d.id for d in found if d.id is not None})
    if missing:
        click.echo(f"error: no dead letter with id(s) {missing}", err=True)
        sys.exit(EXIT_FAILED)
    replayed: list[int] = []
    failed = 0
    try:
        with Client(settings) as client:
            for d in found:
                env = d.envelope if isinstance(d.envelope, dict) else {}
                try:  # a new id: the original is in the key's dedupe window and would be skipped
                    message_id = client.send(d.entity, d.key, d.op, env.get("payload"))
                except ValidationError as e:  # e.g. malformed: nothing to re-send; keep the row
                    failed += 1
                    _print({"dead_letter": d.id, "error": f"{type(e).__name__}: {e}"})
                    continue
                _print({"dead_letter": d.id, "replayed_as": message_id})
                if d.id is not None:
                    replayed.append(d.id)
    finally:  # also when the broker went down half-way: a re-sent row must not be sent again
        if replayed and not keep:
            repo.purge_dead_letters(ids=replayed)
    if failed:
        sys.exit(EXIT_FAILED)


@dead_letters.command()
@_filters
@click.option("--id", "ids", type=int, multiple=True, help="Purge these ids.")
@click.option("--all", "everything", is_flag=True, help="Purge every dead letter.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@handle_errors
def purge(
    entity: str | None,
    key: str | None,
    reason: str | None,
    ids: tuple[int, ...],
    everything: bool,
    yes: bool,
) -> None:
    """Delete dead letters matching a filter (a filter or --all is required)."""
    from keyq.repo import Repo

    if not (entity or key or reason or ids or everything):
        click.echo(
            "error: purge needs a filter (--entity, --key, --reason, --id) or --all", err=True
        )
        sys.exit(EXIT_USAGE)
    if not yes and not click.confirm("Delete the matching dead letters?", default=False):
        sys.exit(EXIT_FAILED)
    repo = Repo(Settings.from_env().database_url)
    n = repo.purge_dead_letters(
        entity=entity, key=key, reason=reason, ids=list(ids) or None, everything=everything
    )
    _print({"purged": n})
