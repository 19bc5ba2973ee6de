"""The unique-name registry: (entity, key) -> the node holding its activation. Resolved by
Client.resolve and `keyq resolve`; released on passivation; a crashed node's names resolve as
not active; lookups of active keys never fail, also under load."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import redis

from keyq.client import Client
from keyq.registry import NameRegistry
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import ROOT, WorkerFactory, poll, settings_env
from tests.ownership_helpers import (  # noqa: F401  (database_url: PostgreSQL only)
    database_url,
    lease_owners,
    sharing_hostnames,
)


def cli_resolve(settings: Settings, entity: str, key: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "keyq", "resolve", entity, key],
        env=settings_env(settings),
        cwd=str(ROOT),
        capture_output=True,
        timeout=30,
        check=True,
    )
    return dict(json.loads(out.stdout))


def test_resolve_names_the_node_of_an_active_key_and_nobody_for_others(
    start_worker: WorkerFactory, client: Client, settings: Settings, redis_client: redis.Redis
) -> None:
    worker = start_worker()
    node = worker.node_id(redis_client, settings)
    client.call("counter", "c1", "add", {"by": 1})
    got = client.resolve("counter", "c1")
    assert got.active and got.node == node and got.heartbeat_age_ms is not None
    assert client.resolve("counter", "never-used").active is False
    assert cli_resolve(settings, "counter", "c1")["node"] == node
    shown = cli_resolve(settings, "counter", "never-used")
    assert shown["active"] is False and shown["node"] is None


def test_a_passivated_key_is_released_from_the_registry(
    start_worker: WorkerFactory, settings: Settings, redis_client: redis.Redis
) -> None:
    s = settings.with_(idle_timeout_s=0.5)
    start_worker(settings_override=s)
    with Client(s) as c:
        c.call("counter", "idle", "add", {"by": 1})
        assert c.resolve("counter", "idle").active
        poll(lambda: not c.resolve("counter", "idle").active, 10.0, what="passivation")
    name = NameRegistry(redis_client, s).name_key("counter", "idle")
    assert redis_client.exists(name) == 0, "released (deleted), not merely expired"


def test_names_of_a_crashed_node_resolve_as_not_active(
    start_worker: WorkerFactory, client: Client, settings: Settings, redis_client: redis.Redis
) -> None:
    worker = start_worker()
    client.call("counter", "crash", "add", {"by": 1})
    assert client.resolve("counter", "crash").active
    worker.kill()
    poll(lambda: not client.resolve("counter", "crash").active, 10.0, what="node gone")
    assert cli_resolve(settings, "counter", "crash")["active"] is False


def test_lookups_of_active_keys_never_fail_under_load(
    start_worker: WorkerFactory, client: Client, settings: Settings, redis_client: redis.Redis
) -> None:
    workers = [start_worker(hostname=n) for n in sharing_hostnames(settings, "ra", "rb")]
    nodes = {w.node_id(redis_client, settings) for w in workers}
    poll(
        lambda: (
            set(lease_owners(redis_client, settings).values()) == nodes
            and len(lease_owners(redis_client, settings)) == settings.partitions
        ),
        what="both workers to own partitions",
    )
    keys = [f"hot-{i}" for i in range(20)]
    for key in keys:
        client.call("counter", key, "add", {"by": 1})
    stop = threading.Event()

    def load() -> None:
        n = 0
        while not stop.is_set():
            client.send("counter", keys[n % len(keys)], "add", {"by": 1})
            n += 1

    producer = threading.Thread(target=load, daemon=True)
    producer.start()
    errors: list[str] = []
    lookups = 0
    try:
        owners = lease_owners(redis_client, settings)
        for _ in range(50):
            for key in keys:
                try:
                    got = client.resolve("counter", key)
                except Exception as e:  # any failure counts: the promise is zero
                    errors.append(f"{key}: {type(e).__name__}: {e}")
                    continue
                lookups += 1
                want = owners[partition_for(key, settings.partitions)]
                if got.node != want:
                    errors.append(f"{key}: resolved to {got.node}, partition owner is {want}")
    finally:
        stop.set()
        producer.join(10)
    assert lookups == 50 * len(keys)
    assert errors == []


def test_name_writes_are_fenced_by_the_writers_lease(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """A stale owner's late post-commit write must not overwrite the new owner's names: the
    registration holds only while the partition's lease still holds the writer's token."""
    from keyq.cluster import Leases

    names = NameRegistry(redis_client, settings)
    lease_key = Leases(redis_client, settings).lease_key(3)
    redis_client.set(lease_key, "node-b|8")  # node-b took the partition over with token 8
    pipe = redis_client.pipeline(transaction=False)
    names.register_many(pipe, (lease_key, "node-b|8"), [("counter", "k")], "node-b")
    names.register_many(pipe, (lease_key, "node-a|7"), [("counter", "k")], "node-a")  # stale
    assert pipe.execute() == [1, -1]
    assert redis_client.get(names.name_key("counter", "k")) == b"node-b"
    redis_client.delete(lease_key)
    pipe = redis_client.pipeline(transaction=False)
    names.register_many(pipe, (lease_key, "node-b|8"), [("counter", "k2")], "node-b")
    assert pipe.execute() == [-1], "no lease at all: nobody may register"
    assert redis_client.get(names.name_key("counter", "k2")) is None
