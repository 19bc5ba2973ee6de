"""Faults of the parts keyq stands on: a database that goes away loses nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from keyq.client import Client
from keyq.embedded import EmbeddedRedis
from keyq.errors import KeyqError
from keyq.repo import Repo
from keyq.settings import Settings
from tests.conftest import PG_ADMIN_URL, WorkerFactory, poll

pytestmark = pytest.mark.integration


def _admin_execute(sql: str, *args: object) -> None:
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(sql, args or None)
    finally:
        admin.close()


def _close_database(name: str) -> None:
    """The database refuses new connections and loses the open ones: an outage for keyq."""
    _admin_execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    _admin_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", name
    )


def _open_database(name: str) -> None:
    _admin_execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


@pytest.fixture
def database_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own: closing it disturbs no other test."""
    name = f"keyq_outage_{uuid.uuid4().hex[:8]}"
    _admin_execute(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    repo = Repo(url)
    repo.migrate()
    repo.dispose()
    yield url
    _open_database(name)
    _admin_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", name
    )
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}"')


def test_database_outage_delays_messages_but_loses_none_and_keeps_order(
    start_worker: WorkerFactory, client: Client, database_url: str
) -> None:
    """While the database is down the worker keeps its messages unacknowledged and retries;
    when it is back every message is applied exactly once, in send order."""
    name = database_url.rsplit("/", 1)[1]
    worker = start_worker()
    for i in range(20):
        client.send("journal", "outage", "append", i)
    poll(
        lambda: (client.read("journal", "outage") or {}).get("items") == list(range(20)),
        what="the first 20 messages",
    )

    _close_database(name)
    for i in range(20, 60):
        client.send("journal", "outage", "append", i)
    poll(lambda: "keyq repo unavailable" in worker.log(), what="the worker to meet the outage")
    assert worker.proc.poll() is None  # it waits; it does not crash or ack

    _open_database(name)
    poll(
        lambda: (client.read("journal", "outage") or {}).get("items") == list(range(60)),
        timeout=30,
        what="all 60 messages applied once, in order, after the database came back",
    )
    assert client.repo.dead_letters() == []


def test_worker_serves_again_after_redis_restarts_empty(
    start_worker: WorkerFactory, settings: Settings, tmp_path: Path
) -> None:
    """Redis restarts without its data (the embedded default keeps nothing): leases and fence
    counters are gone. The worker reconnects, claims its partitions with tokens moved past the
    ones the Repo has seen, and the state it had committed carries on."""
    server = EmbeddedRedis(tmp_path / "redis-1").start()
    s = settings.with_(broker_url=server.url, redis_url=server.url)
    start_worker(settings_override=s)
    with Client(s) as client:
        assert client.call("counter", "survivor", "add", {"by": 5}) == 5
        port = server.port
        server.stop()
        again = EmbeddedRedis(tmp_path / "redis-2")
        again.port = port
        again.start()
        try:

            def serves() -> bool:
                try:
                    return client.call("counter", "survivor", "add", {"by": 0}, timeout=1) == 5
                except KeyqError:
                    return False

            poll(serves, timeout=60, interval=0.2, what="the worker to serve after the restart")
            assert client.call("counter", "survivor", "add", {"by": 1}) == 6
        finally:
            again.stop()
