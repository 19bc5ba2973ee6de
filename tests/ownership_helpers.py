"""Shared pieces of the ownership tests: a PostgreSQL-only database fixture for the tests that
run several workers, and readers of the lease table and membership as the workers see them."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from keyq.client import Client
from keyq.ownership import Leases, Membership, assignment
from keyq.repo import make_engine, metadata
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import WorkerProcess, poll


@pytest.fixture
def database_url(pg_database_url: str) -> Iterator[str]:
    """Multi-worker tests run on PostgreSQL only (the production Repo), on empty tables."""
    engine = make_engine(pg_database_url)
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    engine.dispose()
    yield pg_database_url


def lease_owners(client: redis.Redis, settings: Settings) -> dict[int, str]:
    return {p: info.owner for p, info in Leases(client, settings).holders().items()}


def balanced_members(client: redis.Redis, settings: Settings) -> list[str]:
    key = settings.redis_key("members", "balanced")
    live = Membership(client, settings).live()
    return sorted(m.decode() for m in client.zrange(key, 0, -1) if m.decode() in live)


def converged(client: redis.Redis, settings: Settings) -> bool:
    """Every partition is leased to its rendezvous owner among the live members."""
    members = balanced_members(client, settings)
    if not members:
        return False
    want = {p: m for m, ps in assignment(settings.partitions, members).items() for p in ps}
    return lease_owners(client, settings) == want


def sharing_hostnames(settings: Settings, *prefixes: str) -> tuple[str, ...]:
    """Worker hostnames (node ids) that rendezvous hashing gives some partitions each: two
    random names leave one node with none about 1 in 128 times with 8 partitions, and a test
    waiting for every worker to own partitions then waits forever."""
    return next(
        names
        for names in (tuple(f"{prefix}-{i}" for prefix in prefixes) for i in range(1000))
        if all(assignment(settings.partitions, list(names)).values())
    )


def reported_partitions(client: redis.Redis, settings: Settings) -> dict[str, list[int]]:
    """What each live member says it consumes (its heartbeat's member info)."""
    out: dict[str, list[int]] = {}
    for node in Membership(client, settings).live():
        raw = client.get(settings.redis_key("member", node))
        if raw:
            out[node] = list(json.loads(raw).get("partitions") or [])
    return out


def keys_in_partition(partition: int, settings: Settings, n: int, prefix: str) -> list[str]:
    """The first n keys named prefix-<i> that route to the given partition."""
    keys: list[str] = []
    i = 0
    while len(keys) < n:
        key = f"{prefix}-{i}"
        if partition_for(key, settings.partitions) == partition:
            keys.append(key)
        i += 1
    return keys


def sigterm_inside_a_slow_batch(
    client: Client, worker: WorkerProcess, key: str, mark: Path
) -> None:
    """Send `key` a slow message (1.5 s), SIGTERM its worker while the handler runs, send two
    more meanwhile, and wait for the worker to exit cleanly: a warm shutdown mid-batch."""
    client.send("slow", key, "see", {"i": 0, "mark": str(mark), "seconds": 1.5})
    poll(mark.exists, what="the owner to be inside the slow handler")
    worker.signal(signal.SIGTERM)
    client.send("slow", key, "see", {"i": 1})
    client.send("slow", key, "see", {"i": 2})
    assert worker.proc.wait(20) == 0
