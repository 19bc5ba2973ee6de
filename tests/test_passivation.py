"""Passivation: idle activations are dropped, and a cap per process evicts LRU first."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyq.activations import Activation, ActivationTable
from keyq.client import Client
from keyq.entity import EntityRegistry
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll
from tests.supervised_entities import LIFECYCLE_LOG, Lifecycle
from tests.test_supervisor import free_port, metric

pytestmark = pytest.mark.integration




def hook_log(tmp_path: Path) -> list[str]:
    path = tmp_path / "lifecycle.log"
    return path.read_text().splitlines() if path.exists() else []


def test_idle_activation_is_passivated_and_its_name_released(
    start_worker: WorkerFactory, sup_settings: Settings, sup_client: Client, tmp_path: Path
) -> None:
    s = sup_settings.with_(idle_timeout_s=0.5)
    port = free_port()
    env = {LIFECYCLE_LOG: str(tmp_path / "lifecycle.log"), "KEYQ_METRICS_PORT": str(port)}
    start_worker(settings_override=s, env=env)
    assert sup_client.call("lifecycle", "idle-1", "touch")["activations"] == 1
    assert sup_client.resolve("lifecycle", "idle-1").active

    # when the key stays idle past the timeout, on_passivate runs and its name is released
    poll(lambda: "passivate idle-1" in hook_log(tmp_path), what="on_passivate of idle-1")
    poll(lambda: not sup_client.resolve("lifecycle", "idle-1").active, what="name released")
    poll(
        lambda: metric(port, "keyq_passivations_total", why="idle") >= 1.0,
        what="keyq_passivations_total >= 1.0",
    )

    # the next message activates it again, from the state the Repo kept
    again = sup_client.call("lifecycle", "idle-1", "touch")
    assert again["activations"] == 2  # on_activate ran on the stored state (which had 1)
    assert sup_client.resolve("lifecycle", "idle-1").active
    poll(
        lambda: metric(port, "keyq_spawns_total", entity="lifecycle") == 2.0,
        what="keyq_spawns_total == 2.0",
    )


def test_activation_cap_evicts_least_recently_used_first(
    start_worker: WorkerFactory, sup_settings: Settings, sup_client: Client, tmp_path: Path
) -> None:
    s = sup_settings.with_(max_activations=2, idle_timeout_s=600.0)
    start_worker(settings_override=s, env={LIFECYCLE_LOG: str(tmp_path / "lifecycle.log")})
    sup_client.call("lifecycle", "a", "touch")
    sup_client.call("lifecycle", "b", "touch")
    sup_client.call("lifecycle", "a", "touch")  # a is now more recent than b
    sup_client.call("lifecycle", "c", "touch")  # over the cap of 2: b goes first
    poll(lambda: "passivate b" in hook_log(tmp_path), what="b evicted")
    assert "passivate a" not in hook_log(tmp_path)
    assert not sup_client.resolve("lifecycle", "b").active
    assert sup_client.resolve("lifecycle", "a").active and sup_client.resolve("lifecycle", "c")
    # an evicted key is not lost: its next message reactivates it from the Repo
    assert sup_client.call("lifecycle", "b", "touch")["activations"] == 2
    poll(lambda: "passivate a" in hook_log(tmp_path), what="a evicted next (now the LRU)")


def _act(key: str, partition: int = 0) -> Activation:
    entity_type = EntityRegistry([Lifecycle]).get("lifecycle")
    return Activation(entity_type, key, partition, {"activations": 1}, 1)


def test_activation_table_never_exceeds_its_cap_and_drops_idle_oldest_first() -> None:
    now = [0.0]
    table = ActivationTable(max_activations=3, idle_timeout_s=10.0, clock=lambda: now[0])
    evicted: list[str] = []
    for i in range(100):
        now[0] += 1.0
        evicted += [a.key for a in table.put(_act(f"k{i}"))]
        assert len(table) <= 3
    assert evicted == [f"k{i}" for i in range(97)]  # least recently used first
    now[0] += 1.0
    table.get(("lifecycle", "k97"))  # touched: stays
    now[0] += 9.5
    assert [a.key for a in table.idle()] == ["k98", "k99"]
    assert [a.key for a in table] == ["k97"]
