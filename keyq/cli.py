"""The `keyq` command: worker, beat, send, call, read, resolve, status, migrate, demo ...

Every command reads the KEYQ_* environment (see README); JSON goes to stdout, logs to stderr.
Exit codes: 0 ok, 1 the operation failed (handler error, timeout), 2 bad input or
configuration, 3 infrastructure down (broker, Redis or database).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

from keyq.cli_errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    KeyqGroup,
    handle_errors,
)
from keyq.errors import ConfigurationError
from keyq.settings import Settings

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_UNAVAILABLE", "EXIT_USAGE", "handle_errors", "main"]

log = logging.getLogger("keyq.cli")


# Celery logs two INFO lines per task (received, succeeded): 15-20 % of a worker's throughput.
# keyq logs its own lines about messages; these come back with --loglevel debug.
PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")
DEMO_STARTUP_WAIT_S = 5.0  # the demo's servers are up already, or it fails fast


def setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(
        level=numeric,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if numeric > logging.DEBUG:
        for name in PER_TASK_LOGGERS:
            logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def _settings() -> Settings:
    return Settings.from_env()


def _json_arg(raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="JSON") from e


def _print(value: Any) -> None:
    click.echo(json.dumps(value, indent=None, sort_keys=True, default=str))


@click.group(cls=KeyqGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """keyq: per-key stateful workers on Celery.

    \b
    Examples:
      keyq worker                       run a worker node (partitions by rendezvous)
      keyq send counter user-1 add '{"by": 2}'
      keyq call cart alice add '{"item": "apple", "qty": 3}'
      keyq read counter user-1
      keyq status --json
      keyq demo                         everything on one machine, embedded Redis + SQLite
    """


def _metrics_port_option(fn: Any) -> Any:
    return click.option(
        "--metrics-port",
        type=click.IntRange(0, 65535),
        default=None,
        help="Serve Prometheus metrics on this port (overrides KEYQ_METRICS_PORT; 0: off). "
        "One port per worker process on a host.",
    )(fn)


@main.command()
@click.option(
    "--partitions",
    "spec",
    default=None,
    help="Static partition set, e.g. '0-31' (default: rendezvous over live nodes).",
)
@click.option(
    "-n",
    "--hostname",
    default=None,
    help="A stable node name for status, Flower and logs (Celery's -n; %h, %n, %d expand to "
    "the host name, its first label, its domain). Default: unique per process.",
)
@_metrics_port_option
@click.option("--loglevel", default="info", show_default=True)
@click.option(
    "--migrate/--no-migrate",
    default=True,
    show_default=True,
    help="Upgrade the database schema before starting.",
)
@handle_errors
def worker(
    spec: str | None,
    hostname: str | None,
    metrics_port: int | None,
    loglevel: str,
    migrate: bool,
) -> None:
    """Run one worker node (one process; partitions applied serially).

    Waits at most KEYQ_STARTUP_WAIT_S for Redis and the database, then exits 3.

    \b
    Examples:
      keyq worker
      keyq worker --hostname w1 --metrics-port 9101
    """
    setup_logging(loglevel)
    from keyq.cluster import new_node_id
    from keyq.metrics import serve
    from keyq.preflight import wait_for_redis, wait_until_name_free
    from keyq.routing import parse_partition_spec

    settings = _settings()
    if metrics_port is not None:
        settings = settings.with_(metrics_port=metrics_port)
    static = None
    if spec:
        try:
            static = parse_partition_spec(spec, settings.partitions)
        except ValueError as e:
            raise ConfigurationError(f"--partitions: {e}") from e
    node = new_node_id(hostname)
    serve(settings.metrics_port)  # a taken port is a one-line error before anything starts
    wait_for_redis(settings, settings.startup_wait_s)
    if hostname is not None:
        wait_until_name_free(settings, node, settings.startup_wait_s)
    _wait_for_database(settings, migrate)
    _run_worker(settings, static, node, loglevel)


def _wait_for_database(settings: Settings, migrate: bool) -> None:
    from keyq.migrate_lock import migrate_with_lock
    from keyq.repo import Repo, wait_for_repo

    if migrate:
        migrate_with_lock(settings, wait_s=settings.startup_wait_s)
        return
    repo = Repo(settings.database_url, timeouts=settings.timeouts)
    try:
        wait_for_repo(repo, settings.startup_wait_s)
    finally:
        repo.dispose()


def _check_database(settings: Settings) -> None:
    """One attempt to reach the database: RepoError naming it if it does not answer."""
    from keyq.repo import Repo, wait_for_repo

    repo = Repo(settings.database_url, timeouts=settings.timeouts)
    try:
        wait_for_repo(repo, 0.0)
    finally:
        repo.dispose()


def _run_worker(
    settings: Settings, static: tuple[int, ...] | None, node: str, loglevel: str
) -> None:
    from keyq.celery_app import default_queue
    from keyq.celery_worker import build_worker_app, celery_hostname

    app, node = build_worker_app(settings, static, node_id=node)
    log.info(
        "keyq worker starting node=%s %s",
        node,
        " ".join(f"{k}={v}" for k, v in settings.safe_summary().items()),
    )
    w = app.Worker(
        hostname=celery_hostname(node),
        pool="solo",
        concurrency=1,
        queues=[default_queue(settings)],
        loglevel=loglevel.upper(),
        without_mingle=True,
        without_gossip=True,
    )
    w.start()
    sys.exit(w.exitcode or 0)


@main.command()
@click.option("--loglevel", default="info", show_default=True)
@click.option("--schedule", default=None, help="Beat schedule file (default: a temp file).")
@handle_errors
def beat(loglevel: str, schedule: str | None) -> None:
    """Run Celery beat with keyq's schedule (the reconciler).

    Waits at most KEYQ_STARTUP_WAIT_S for Redis, then exits 3.
    """
    import tempfile

    from keyq.celery_app import make_app
    from keyq.preflight import wait_for_redis

    setup_logging(loglevel)
    settings = _settings()
    wait_for_redis(settings, settings.startup_wait_s)
    app = make_app(settings)
    path = schedule or f"{tempfile.gettempdir()}/keyq-beat-{settings.namespace}"
    app.Beat(loglevel=loglevel.upper(), schedule=path).run()


@main.command()
@click.argument("entity")
@click.argument("key")
@click.argument("op")
@click.argument("payload", required=False)
@handle_errors
def send(entity: str, key: str, op: str, payload: str | None) -> None:
    """Enqueue a message; prints its id."""
    from keyq.client import Client

    with Client(_settings()) as client:
        _print({"message_id": client.send(entity, key, op, _json_arg(payload))})


@main.command()
@click.argument("entity")
@click.argument("key")
@click.argument("op")
@click.argument("payload", required=False)
@click.option("--timeout", type=float, default=None, help="Seconds to wait for the reply.")
@handle_errors
def call(entity: str, key: str, op: str, payload: str | None, timeout: float | None) -> None:
    """Send and wait for the handler's reply; prints the reply as JSON."""
    from keyq.client import Client

    with Client(_settings()) as client:
        _print(client.call(entity, key, op, _json_arg(payload), timeout=timeout))


@main.command()
@click.argument("entity")
@click.argument("key")
@handle_errors
def read(entity: str, key: str) -> None:
    """Print a key's state (cache, else Repo); null if the key has none."""
    from keyq.client import Client

    with Client(_settings()) as client:
        _print(client.read(entity, key))


@main.command()
@click.argument("entity")
@click.argument("key")
@handle_errors
def resolve(entity: str, key: str) -> None:
    """Print which node holds the key's activation, or that it is not active."""
    from keyq.client import Client

    with Client(_settings()) as client:
        _print(client.resolve(entity, key).to_json())


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def status(as_json: bool) -> None:
    """Members, partitions with owner, token and queue depth, active keys per node, cache."""
    from keyq.status import collect_status, render_status

    snapshot = collect_status(_settings())
    if as_json:
        _print(snapshot)
    else:
        click.echo(render_status(snapshot))


@main.command()
@click.option("--once", is_flag=True, required=True, help="Run one reconcile pass now.")
@handle_errors
def reconcile(once: bool) -> None:
    """Run the reconciler by hand and print what it did."""
    from keyq.reconciler import Reconciler

    setup_logging("warning")
    # a failed step ends the command in one line (below); its traceback is for KEYQ_DEBUG=1
    logging.getLogger("keyq.reconciler").setLevel(logging.CRITICAL)
    settings = _settings()
    _check_database(settings)  # a run with nothing to do would not notice it is down
    reconciler = Reconciler(settings)
    try:
        report = reconciler.run_once()
        _print(report.to_json())
        if reconciler.step_errors:  # the report is on stdout; the first failure ends it
            raise reconciler.step_errors[0][1]
    finally:
        reconciler.close()


@main.command()
@click.option("--keys", default=1000, show_default=True, help="Distinct keys per entity.")
@click.option("--messages", default=20000, show_default=True, help="Messages to send.")
@click.option("--workers", default=2, show_default=True, help="Worker processes.")
@click.option("--calls", default=500, show_default=True, help="Round trips to time (call).")
@handle_errors
def demo(keys: int, messages: int, workers: int, calls: int) -> None:
    """Run workers, beat and a producer on one machine, then check every key's state."""
    from keyq.demo import run_demo
    from keyq.preflight import wait_for_redis

    settings = _settings()
    quick = settings.with_(startup_wait_s=min(settings.startup_wait_s, DEMO_STARTUP_WAIT_S))
    if os.environ.get("KEYQ_REDIS_URL"):  # else the demo starts its own Redis
        wait_for_redis(quick, quick.startup_wait_s)
    if os.environ.get("KEYQ_DATABASE_URL"):  # else it uses a new SQLite file
        _wait_for_database(quick, migrate=False)
    sys.exit(run_demo(keys=keys, messages=messages, workers=workers, calls=calls))


from keyq.dead_letters_cli import dead_letters  # noqa: E402
from keyq.health import health  # noqa: E402
from keyq.inspect import inspect  # noqa: E402
from keyq.migrate_cli import migrate  # noqa: E402
from keyq.schema_cli import schema  # noqa: E402

main.add_command(dead_letters)
main.add_command(health)
main.add_command(inspect)
main.add_command(migrate)
main.add_command(schema)
