"""`keyq health [--node NAME]`: the container health check of every keyq service.

A process that runs is not a process that works: a worker whose Redis went away, or whose
heartbeat thread died, still answers to `ps`. So the check asks the servers the service needs
(Redis of the registry and cache, the broker, the database: one attempt each, bounded by the
connection timeouts) and, for a worker, whether its membership heartbeat is fresh, i.e. whether
the cluster still counts it as a live node. Exit codes follow the CLI's: 0 healthy, 3 a server
does not answer, 1 the worker is not a live member.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
import redis

from keyq.cli_errors import EXIT_FAILED, handle_errors
from keyq.cluster import Membership, new_node_id
from keyq.connections import redis_client
from keyq.errors import BrokerUnavailableError, CacheUnavailableError
from keyq.repo import Repo, wait_for_repo
from keyq.settings import Settings, redact_url


def _ping(url: str, settings: Settings, error: type[Exception], what: str) -> redis.Redis:
    client = redis_client(url, settings.timeouts)
    try:
        client.ping()
    except redis.RedisError as e:
        client.close()
        raise error(f"{what} at {redact_url(url)} is not answering: {e}") from e
    return client


def check_health(settings: Settings, node: str | None = None) -> dict[str, Any]:
    """The checks' results; raises CacheUnavailableError, BrokerUnavailableError or RepoError
    when a server does not answer. ``node``: a worker's node name (``%h`` expands as for
    ``keyq worker --hostname``), checked for a fresh heartbeat."""
    client = _ping(settings.redis_url, settings, CacheUnavailableError, "Redis")
    try:
        if settings.broker_url != settings.redis_url:
            _ping(settings.broker_url, settings, BrokerUnavailableError, "broker").close()
        repo = Repo(settings.database_url, timeouts=settings.timeouts)
        try:
            wait_for_repo(repo, 0.0)
        finally:
            repo.dispose()
        report: dict[str, Any] = {"redis": "ok", "broker": "ok", "database": "ok"}
        if node is not None:
            name = new_node_id(node)
            try:
                live = Membership(client, settings).live()
            except redis.RedisError as e:
                raise CacheUnavailableError(f"Redis stopped answering: {e}") from e
            report["node"] = name
            report["heartbeat_age_ms"] = live.get(name)
            report["live"] = name in live
        return report
    finally:
        client.close()


@click.command("health")
@click.option(
    "--node",
    default=None,
    help="Also require this worker's heartbeat to be fresh (its --hostname; %h expands).",
)
@handle_errors
def health(node: str | None) -> None:
    """Exit 0 when Redis, the broker and the database answer (and the worker is live).

    \b
    Examples:
      keyq health                      beat, Flower, migrate: the servers answer
      keyq health --node %h            a worker started with `keyq worker --hostname %h`
    """
    report = check_health(Settings.from_env(), node)
    click.echo(json.dumps(report, sort_keys=True))
    if node is not None and not report["live"]:
        click.echo(
            f"error: worker {report['node']!r} is not a live member (no fresh heartbeat)",
            err=True,
        )
        sys.exit(EXIT_FAILED)
