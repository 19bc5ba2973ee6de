"""Rebalancing on real workers: joins and a graceful leave move partitions by rendezvous, no
partition ever has two consumers, and no message is lost, duplicated or reordered."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from keyq.client import Client
from keyq.ownership import OwnershipHooks, assignment
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import WorkerFactory, WorkerProcess, poll
from tests.ownership_helpers import (  # noqa: F401  (database_url: PostgreSQL only)
    converged,
    database_url,
    lease_owners,
)

PARTITIONS = 32  # enough that each of three nodes surely gets some

# one atomic snapshot: every live member's reported partitions, then every lease holder
SNAPSHOT_LUA = """
local out = {}
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
out[1] = members
local infos = {}
for i, m in ipairs(members) do infos[i] = redis.call('GET', ARGV[1] .. m) or '' end
out[2] = infos
local leases = {}
for p = 0, tonumber(ARGV[3]) - 1 do leases[p + 1] = redis.call('GET', ARGV[2] .. p) or '' end
out[3] = leases
return out
"""


@pytest.fixture
def cluster_settings(settings: Settings) -> Settings:
    return settings.with_(partitions=PARTITIONS)


@pytest.fixture
def cluster_client(cluster_settings: Settings) -> Iterator[Client]:
    c = Client(cluster_settings)
    yield c
    c.close()


class OwnershipSampler(threading.Thread):
    """Samples the lease table and each node's reported partitions, looking for two owners."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.settings = settings
        self.stop = threading.Event()
        self.samples = 0
        self.violations: list[str] = []
        self._script = client.register_script(SNAPSHOT_LUA)

    def run(self) -> None:
        import json

        s = self.settings
        while not self.stop.is_set():
            members, infos, leases = self._script(
                keys=[s.redis_key("members")],
                args=[s.redis_key("member", ""), s.redis_key("lease", ""), s.partitions],
            )
            holder = {p: raw.decode().rpartition("|")[0] for p, raw in enumerate(leases) if raw}
            reported: dict[int, list[str]] = {}
            for member, info in zip(members, infos, strict=True):
                node = member.decode()
                for p in json.loads(info).get("partitions") or [] if info else []:
                    reported.setdefault(p, []).append(node)
                    if holder.get(p, node) != node:
                        self.violations.append(f"{node} reports p{p} leased to {holder[p]}")
            for p, nodes in reported.items():
                if len(nodes) > 1:
                    self.violations.append(f"p{p} reported by {nodes}")
            self.samples += 1
            time.sleep(0.01)


class Producer(threading.Thread):
    """Sends witness messages round-robin over keys: payload i (per key) and g (global)."""

    def __init__(self, client: Client, keys: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.keys = keys
        self.sent = dict.fromkeys(keys, 0)
        self.total = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            key = self.keys[self.total % len(self.keys)]
            self.client.send("witness", key, "see", {"i": self.sent[key], "g": self.total})
            self.sent[key] += 1
            self.total += 1
            time.sleep(0.003)


def compress(seq: list[Any]) -> list[Any]:
    return [x for i, x in enumerate(seq) if i == 0 or seq[i - 1] != x]


def is_subsequence(small: list[Any], big: list[Any]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def test_joins_and_a_graceful_leave_never_give_a_partition_two_consumers(
    start_worker: WorkerFactory,
    cluster_settings: Settings,
    cluster_client: Client,
    redis_client: redis.Redis,
    record_property: Callable[[str, object], None],
) -> None:
    s = cluster_settings

    def settle(what: str) -> None:
        poll(lambda: converged(redis_client, s), 30.0, what=f"rendezvous leases after {what}")

    a = start_worker(settings_override=s)
    settle("the first worker")
    sampler = OwnershipSampler(redis_client, s)
    sampler.start()
    producer = Producer(cluster_client, [f"w-{i}" for i in range(24)])
    producer.start()
    nodes: dict[str, WorkerProcess] = {}
    try:
        nodes[a.node_id(redis_client, s)] = a
        b = start_worker(settings_override=s)
        nodes[b.node_id(redis_client, s)] = b
        settle("a second worker joined")
        before_c = lease_owners(redis_client, s)
        c = start_worker(settings_override=s)
        c_node = c.node_id(redis_client, s)
        nodes[c_node] = c
        settle("a third worker joined")
        after_c = lease_owners(redis_client, s)
        b.signal(signal.SIGTERM)
        assert b.proc.wait(20) == 0
        settle("a graceful leave")
        poll(lambda: producer.total > 1500, 30.0, what="enough messages across the rebalances")
    finally:
        producer.stop.set()
        producer.join(10)
        sampler.stop.set()
        sampler.join(10)

    # a join moves about 1/n of the partitions, all of them to the newcomer
    moved = sorted(p for p in range(s.partitions) if before_c[p] != after_c[p])
    assert all(after_c[p] == c_node for p in moved)
    assert PARTITIONS // 3 - 8 <= len(moved) <= PARTITIONS // 3 + 8, moved
    record_property("moved_on_third_join", len(moved))

    # every key's history complete and in send order
    def histories() -> dict[str, list[list[Any]]]:
        return {k: (cluster_client.read("witness", k) or {"log": []})["log"] for k in producer.keys}

    poll(
        lambda: all(
            [e[0]["i"] for e in log] == list(range(producer.sent[k]))
            for k, log in histories().items()
        ),
        60.0,
        0.2,
        what="every key's history complete and in order",
    )

    # per partition, the applying processes follow the ownership changes and never interleave
    pid_node = {w.pid: node for node, w in nodes.items()}
    a_node = next(n for n, w in nodes.items() if w is a)
    b_node = next(n for n, w in nodes.items() if w is b)
    phases = [[a_node], [a_node, b_node], [a_node, b_node, c_node], [a_node, c_node]]
    by_partition: dict[int, list[tuple[int, str]]] = {}
    for key, log in histories().items():
        p = partition_for(key, s.partitions)
        by_partition.setdefault(p, []).extend((e[0]["g"], pid_node[e[1]]) for e in log)
    for p, entries in by_partition.items():
        applied_by = compress([node for _, node in sorted(entries)])
        expected = compress(
            [next(n for n, ps in assignment(s.partitions, m).items() if p in ps) for m in phases]
        )
        assert is_subsequence(applied_by, expected), (p, applied_by, expected)

    assert sampler.samples > 50
    assert sampler.violations == []
    record_property("ownership_samples", sampler.samples)

    # the leaving node released its leases (deleted them) rather than letting them expire
    left = [line for line in b.log().splitlines() if "keyq node left" in line]
    assert left and "not_ours_any_more=[]" in left[0]
    assert "released=[]" not in left[0]


def test_sigterm_finishes_the_batch_in_flight_then_releases_its_leases(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    redis_client: redis.Redis,
    tmp_path: Any,
) -> None:
    from tests.ownership_helpers import (
        keys_in_partition,
        sharing_hostnames,
        sigterm_inside_a_slow_batch,
    )

    # hostnames that rendezvous gives partitions each: two random ones left A none 1 in 128
    # times (8 partitions), and the test then found no partition of A to send to
    a, b = [start_worker(hostname=n) for n in sharing_hostnames(settings, "sa", "sb")]
    poll(lambda: converged(redis_client, settings), 30.0, what="two workers to share partitions")
    a_node = a.node_id(redis_client, settings)
    owners = lease_owners(redis_client, settings)
    p = min(q for q, node in owners.items() if node == a_node)
    a_token = int(redis_client.get(settings.redis_key("lease", str(p))).decode().split("|")[-1])
    key = keys_in_partition(p, settings, 1, "handoff")[0]
    sigterm_inside_a_slow_batch(client, a, key, tmp_path / "inside-handler")
    poll(
        lambda: [e[0]["i"] for e in (client.read("slow", key) or {"log": []})["log"]] == [0, 1, 2],
        what="the next owner to apply the messages sent during the handoff",
    )
    log = (client.read("slow", key) or {"log": []})["log"]
    assert [pid for _, pid in log] == [a.pid, b.pid, b.pid], "in-flight finished by its owner"
    left = next(line for line in a.log().splitlines() if "keyq node left" in line)
    released = re.search(r"released=\[([0-9, ]*)\]", left)
    assert released and p in [int(x) for x in released.group(1).split(", ") if x]
    assert "not_ours_any_more=[]" in left, "every lease was released, none had expired"
    assert "keyq write refused" not in a.log()
    new = redis_client.get(settings.redis_key("lease", str(p))).decode()
    assert new == f"{b.node_id(redis_client, settings)}|{a_token + 1}", "one grant, no expiry"


class RecordingHooks(OwnershipHooks):
    """Ownership hooks that only record what the ownership logic asks for, in order."""

    def __init__(self, node: str, events: list[tuple[str, str, int]]) -> None:
        self.node = node
        self.events = events

    def prepare(self, partition: int, token: int) -> None:
        self.events.append((self.node, "prepare", partition))

    def start_consuming(self, partition: int) -> None:
        self.events.append((self.node, "start", partition))

    def stop_consuming(self, partition: int) -> None:
        self.events.append((self.node, "stop", partition))

    def forget(self, partition: int) -> None:
        self.events.append((self.node, "forget", partition))

    def settle(self) -> bool:
        return True


def test_a_join_hands_over_stop_then_release_then_claim(
    redis_client: redis.Redis, settings: Settings
) -> None:
    from keyq.ownership import HANDOFF_GRACE_S, PartitionOwnership

    events: list[tuple[str, str, int]] = []
    a = PartitionOwnership(redis_client, settings, "node-a", RecordingHooks("node-a", events))
    a.heartbeat()
    assert sorted(a.tick(now=0.0).acquired) == list(range(settings.partitions))
    tokens_a = a.held()
    b = PartitionOwnership(redis_client, settings, "node-b", RecordingHooks("node-b", events))
    b.heartbeat()
    assert b.tick(now=0.0).acquired == [], "nothing is taken while the old owner holds it"
    moving = sorted(assignment(settings.partitions, ["node-a", "node-b"])["node-b"])
    assert moving, "with 8 partitions both nodes get some"

    a.heartbeat()  # a learns about b
    report = a.tick(now=10.0)
    assert sorted(report.draining) == moving and report.released == []
    assert all(a.token(p) is None for p in moving), "a stops applying at once"
    assert b.tick(now=10.0).acquired == [], "b waits for the release"
    a.heartbeat()  # draining leases are renewed until released
    assert all(lease_owners(redis_client, settings)[p] == "node-a" for p in moving)

    later = 10.0 + HANDOFF_GRACE_S + 0.01
    assert sorted(a.tick(now=later).released) == moving
    assert sorted(b.tick(now=later).acquired) == moving
    assert all(b.held()[p] == tokens_a[p] + 1 for p in moving), "one grant per handover"
    for p in moving:
        order = [(n, e) for n, e, q in events if q == p and (n, e) != ("node-a", "prepare")]
        assert order == [
            ("node-a", "start"),
            ("node-a", "stop"),
            ("node-a", "forget"),
            ("node-b", "prepare"),
            ("node-b", "start"),
        ], (p, order)


def test_a_lease_not_renewed_in_time_stops_its_holder_applying(
    redis_client: redis.Redis, settings: Settings
) -> None:
    from keyq.ownership import PartitionOwnership

    s = settings.with_(lease_ttl_ms=150)
    a = PartitionOwnership(redis_client, s, "node-a", RecordingHooks("node-a", []))
    a.heartbeat()
    a.tick()
    assert a.token(0) is not None
    # no heartbeat: once the TTL has passed, a refuses to apply before any renewal says so
    poll(lambda: a.token(0) is None, 5.0, 0.01, what="the unrenewed lease to lapse locally")
    assert 0 in a.held(), "the loop has not been told yet; the token check alone protects"
    b = PartitionOwnership(redis_client, s, "node-b", RecordingHooks("node-b", []))
    poll(lambda: b.leases.claim(0, "node-b"), 5.0, 0.01, what="the lease to expire in Redis")
    a.heartbeat()
    report = a.tick()
    assert 0 in report.lost and 0 not in a.held() and 0 not in report.acquired


def test_lease_loss_is_tracked_by_token_not_by_partition(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """A late report that an old lease was lost (a batch of the old lease refused after the
    partition was claimed again) must not stop the newer lease of the same partition."""
    from keyq.ownership import PartitionOwnership

    a = PartitionOwnership(redis_client, settings, "node-a", RecordingHooks("node-a", []))
    a.heartbeat()
    a.tick()
    old = a.token(0)
    assert old is not None
    assert a.serving()[0] == old
    a.mark_lost(0, old)
    assert a.token(0) is None, "the lost lease stops applying at once"
    assert 0 not in a.serving() and a.held()[0] == old, "given up, though the loop holds it"
    a.leases.release(0, "node-a", old)
    report = a.tick()
    assert 0 in report.lost and 0 in report.acquired
    new = a.token(0)
    assert new is not None and new > old
    a.mark_lost(0, old)  # late: about the lease given up above
    assert a.token(0) == new and a.serving()[0] == new
    a.heartbeat()
    assert 0 not in a.tick().lost
    a.mark_lost(0, new)
    assert a.token(0) is None
