"""`keyq inspect ENTITY KEY [--json]`: one key's partition, lease owner and token, Repo and
cache versions, waiting messages, timers and dead letters. Run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import redis

from keyq.client import Client
from keyq.errors import HandlerCrashedError
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import ROOT, WorkerFactory, settings_env
from tests.ownership_helpers import (  # noqa: F401  (database_url: PostgreSQL only)
    database_url,
    lease_owners,
)


def run_inspect(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyq", "inspect", *args],
        env=settings_env(settings),
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=30,
    )


def inspect_json(settings: Settings, entity: str, key: str) -> dict[str, Any]:
    out = run_inspect(settings, entity, key, "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_inspect_shows_messages_waiting_on_an_unowned_partition(
    client: Client, settings: Settings
) -> None:
    for i in range(3):
        client.send("counter", "waiting", "add", {"by": i})
    client.send("counter", "other-key", "add", {"by": 1})
    view = inspect_json(settings, "counter", "waiting")
    assert view["partition"] == partition_for("waiting", settings.partitions)
    assert view["lease"] is None
    assert view["repo"] is None and view["cache"] is None
    assert view["messages"]["waiting_for_key"] == 3
    assert view["messages"]["depth"] >= 3
    assert view["messages"]["oldest_age_s"] is not None and view["messages"]["oldest_age_s"] >= 0
    text = run_inspect(settings, "counter", "waiting")
    assert text.returncode == 0, text.stderr
    assert "not owned" in text.stdout and "3 for this key" in text.stdout


def test_inspect_shows_owner_versions_timers_and_dead_letters(
    start_worker: WorkerFactory, client: Client, settings: Settings, redis_client: redis.Redis
) -> None:
    worker = start_worker()
    node = worker.node_id(redis_client, settings)
    ids = [client.send("counter", "k", "add", {"by": 1}) for _ in range(2)]
    assert client.call("counter", "k", "add", {"by": 1}) == 3
    client.call("device", "d1", "heartbeat", {})
    with pytest.raises(HandlerCrashedError):
        client.call("flaky", "f", "boom", {"n": 1})

    view = inspect_json(settings, "counter", "k")
    p = partition_for("k", settings.partitions)
    assert view["lease"]["owner"] == node == lease_owners(redis_client, settings)[p]
    assert isinstance(view["lease"]["token"], int) and view["lease"]["token"] > 0
    assert view["repo"]["version"] == 3
    assert view["repo"]["state_bytes"] == len('{"value":3}')
    assert set(ids) <= set(view["repo"]["last_applied_ids"])
    assert view["cache"] == {"version": 3}
    assert view["activation"]["node"] == node
    assert view["messages"]["waiting_for_key"] == 0

    device = inspect_json(settings, "device", "d1")
    assert [t["name"] for t in device["timers"]] == ["liveness"]
    assert 0 < device["timers"][0]["due_in_s"] <= 60

    flaky = inspect_json(settings, "flaky", "f")
    assert [d["op"] for d in flaky["dead_letters"]] == ["boom"]
    assert "boom" in flaky["dead_letters"][0]["error"]
    assert "dead      #" in run_inspect(settings, "flaky", "f").stdout
