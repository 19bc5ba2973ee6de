"""`keyq status`: members with heartbeat age, partitions with owner, fencing token and queue
depth, active keys per node; `--json` for machines. Run as a user runs it (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import redis

from keyq.client import Client
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import ROOT, WorkerFactory, poll, settings_env
from tests.ownership_helpers import (  # noqa: F401  (database_url: PostgreSQL only)
    converged,
    database_url,
    lease_owners,
    reported_partitions,
)


def run_status(settings: Settings, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "keyq", "status", *args],
        env=settings_env(settings),
        cwd=str(ROOT),
        capture_output=True,
        timeout=30,
        check=True,
    )
    return out.stdout.decode()


def status_json(settings: Settings) -> dict[str, Any]:
    return dict(json.loads(run_status(settings, "--json")))


def test_status_shows_queued_messages_while_no_worker_runs(
    client: Client, settings: Settings
) -> None:
    for i in range(3):
        client.send("counter", "waiting", "add", {"by": i})
    snap = status_json(settings)
    p = partition_for("waiting", settings.partitions)
    assert snap["members"] == []
    assert snap["unowned_partitions"] == list(range(settings.partitions))
    assert [q["depth"] for q in snap["partitions"] if q["partition"] == p] == [3]
    assert snap["queued_messages"] == 3
    assert "(no live members)" in run_status(settings)


def test_status_shows_members_owners_tokens_and_active_keys(
    start_worker: WorkerFactory, client: Client, settings: Settings, redis_client: redis.Redis
) -> None:
    workers = [start_worker(), start_worker()]
    nodes = {w.node_id(redis_client, settings) for w in workers}
    poll(lambda: converged(redis_client, settings), 30.0, what="both workers to own partitions")

    def reports_match_leases() -> bool:
        owners = lease_owners(redis_client, settings)
        return all(
            set(ps) == {p for p, n in owners.items() if n == node}
            for node, ps in reported_partitions(redis_client, settings).items()
        )

    poll(reports_match_leases, what="heartbeats to report the partitions held")
    keys = [f"st-{i}" for i in range(10)]
    for key in keys:
        client.call("counter", key, "add", {"by": 1})
    snap = status_json(settings)

    assert {m["node"] for m in snap["members"]} == nodes
    for m in snap["members"]:
        assert 0 <= m["heartbeat_age_ms"] <= settings.lease_ttl_ms
        assert m["pid"] in {w.pid for w in workers}
        assert set(m["partitions"]) == {
            q["partition"] for q in snap["partitions"] if q["owner"] == m["node"]
        }
    assert snap["unowned_partitions"] == []
    for q in snap["partitions"]:
        assert q["owner"] in nodes and q["token"] >= 1 and q["depth"] == 0
    assert sum(snap["active_keys_by_node"].values()) == len(keys)
    assert set(snap["active_keys_by_node"]) <= nodes

    text = run_status(settings)
    assert "MEMBERS" in text and "PARTITIONS" in text
    for node in nodes:
        assert node in text
    assert "heartbeat" in text and "active keys" in text


def test_status_shows_a_stalled_partition_and_the_age_of_what_waits_behind_it(
    start_worker: WorkerFactory, client: Client, settings: Settings, redis_client: redis.Redis
) -> None:
    """A handler stuck out of the time limit's reach: before the watchdog acts, `keyq status`
    says the partition is stalled, how old its oldest waiting message is, and the lease left."""
    worker = start_worker(env={"KEYQ_MAX_HANDLER_SECONDS": "1"})
    key = next(f"s{i}" for i in range(1000) if partition_for(f"s{i}", settings.partitions) == 2)
    behind = next(
        f"b{i}" for i in range(1000) if partition_for(f"b{i}", settings.partitions) == 2
    )
    client.send("spinner", key, "stuck")

    def in_the_handler() -> bool:  # the batch has not moved for a while: the handler spins
        quiet = [m.get("batch_quiet_s") for m in status_json(settings)["members"]]
        return any(q is not None and q > 0.5 for q in quiet)

    poll(in_the_handler, timeout=30, what="the stuck handler to be running")
    client.send("spinner", behind, "see", 1)  # waits in the queue, behind the stuck batch

    def stalled() -> list[dict[str, Any]] | None:
        parts: list[dict[str, Any]] = status_json(settings)["partitions"]
        return parts if str(parts[2]["progress"]).startswith("stalled") else None

    # one snapshot for every check: the watchdog ends the stall a few seconds after it shows
    parts = poll(stalled, timeout=30, what="status to show the stall")
    assert isinstance(parts, list)
    part = parts[2]
    assert part["depth"] == 1 and part["oldest_age_s"] > 1.0
    assert 0 < part["lease_ttl_ms"] <= settings.lease_ttl_ms
    # one consumer serves all of a node's partitions: they all stall with it
    assert all(str(p["progress"]).startswith("stalled") for p in parts)
    assert "stalled" in run_status(settings)
    worker.kill()
