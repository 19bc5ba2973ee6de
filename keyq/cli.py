"""The `keyq` command: worker, beat, send, call, read, resolve, status, migrate, demo ...

Every command reads the KEYQ_* environment (see README); JSON goes to stdout, logs to stderr.
Exit codes: 0 ok, 1 the operation failed (handler error, timeout), 2 bad input or
configuration, 3 infrastructure down (broker, Redis or database).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from keyq.errors import (
    BrokerUnavailableError,
    CacheUnavailableError,
    CallTimeoutError,
    ConfigurationError,
    HandlerError,
    KeyqError,
    RepoError,
    ValidationError,
)
from keyq.settings import Settings

EXIT_OK = 0
EXIT_FAILED = 1  # the operation ran and failed: handler refused or crashed, timeout
EXIT_USAGE = 2  # bad input or configuration
EXIT_UNAVAILABLE = 3  # broker, Redis or database not reachable

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("keyq.cli")


# Celery logs two INFO lines per task (received, succeeded): 15-20 % of a worker's throughput.
# keyq logs its own lines about messages; these come back with --loglevel debug.
PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


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


def _exit_code(e: KeyqError) -> int:
    if isinstance(e, ValidationError | ConfigurationError):
        return EXIT_USAGE
    if isinstance(e, BrokerUnavailableError | CacheUnavailableError | RepoError):
        return EXIT_UNAVAILABLE
    if isinstance(e, HandlerError | CallTimeoutError):
        return EXIT_FAILED
    return EXIT_FAILED


def handle_errors(fn: F) -> F:
    """Turn keyq errors into one clear line on stderr and a named exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyqError as e:
            click.echo(f"error: {type(e).__name__}: {e}", err=True)
            sys.exit(_exit_code(e))

    return wrapper  # type: ignore[return-value]


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


@main.command()
@click.option(
    "--partitions",
    "spec",
    default=None,
    help="Static partition set, e.g. '0-31' (default: rendezvous over live nodes).",
)
@click.option("--loglevel", default="info", show_default=True)
@click.option(
    "--migrate/--no-migrate",
    default=True,
    show_default=True,
    help="Upgrade the database schema before starting.",
)
@handle_errors
def worker(spec: str | None, loglevel: str, migrate: bool) -> None:
    """Run one worker node (one process; partitions applied serially)."""
    setup_logging(loglevel)
    from keyq.celery_app import default_queue
    from keyq.celery_worker import build_worker_app
    from keyq.metrics import serve
    from keyq.migrate_lock import migrate_with_lock
    from keyq.routing import parse_partition_spec

    settings = _settings()
    static = None
    if spec:
        try:
            static = parse_partition_spec(spec, settings.partitions)
        except ValueError as e:
            raise ConfigurationError(f"--partitions: {e}") from e
    if migrate:
        migrate_with_lock(settings)
    serve(settings.metrics_port)
    app, node = build_worker_app(settings, static)
    log.info(
        "keyq worker starting node=%s %s",
        node,
        " ".join(f"{k}={v}" for k, v in settings.safe_summary().items()),
    )
    w = app.Worker(
        hostname=f"{node}@keyq",
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
    """Run Celery beat with keyq's schedule (the reconciler)."""
    import tempfile

    from keyq.celery_app import make_app

    setup_logging(loglevel)
    settings = _settings()
    app = make_app(settings)
    path = schedule or f"{tempfile.gettempdir()}/keyq-beat-{settings.namespace}"
    app.Beat(loglevel=loglevel.upper(), schedule=path).run()


@main.command()
@handle_errors
def migrate() -> None:
    """Upgrade the database schema to the newest revision."""
    from keyq.migrate_lock import migrate_with_lock

    setup_logging("warning")
    migrate_with_lock(_settings())
    _print({"migrated": True})


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
    reconciler = Reconciler(_settings())
    try:
        _print(reconciler.run_once().to_json())
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

    sys.exit(run_demo(keys=keys, messages=messages, workers=workers, calls=calls))


from keyq.dead_letters_cli import dead_letters  # noqa: E402

main.add_command(dead_letters)
