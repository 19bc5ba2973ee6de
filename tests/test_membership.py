"""Membership: each node heartbeats into Redis and a node that stops heartbeating leaves the
member set once the lease TTL has passed; static nodes take no part in rendezvous."""

from __future__ import annotations

import signal

import redis

from keyq.ownership import Membership
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll
from tests.ownership_helpers import (  # noqa: F401  (database_url: PostgreSQL only)
    balanced_members,
    converged,
    database_url,
    lease_owners,
)


def test_a_silent_node_leaves_the_member_set_after_the_lease_ttl(
    redis_client: redis.Redis, settings: Settings
) -> None:
    membership = Membership(redis_client, settings)
    membership.heartbeat("node-a", {"pid": 1})
    members, _ = membership.heartbeat("node-b", {"pid": 2})
    assert members == ["node-a", "node-b"]
    assert set(membership.live()) == {"node-a", "node-b"}
    assert membership.info("node-b") == {"pid": 2}

    def b_is_gone() -> bool:
        members, _ = membership.heartbeat("node-a", {"pid": 1})  # only a goes on heartbeating
        return members == ["node-a"] and set(membership.live()) == {"node-a"}

    poll(b_is_gone, 10.0, 0.1, what="the silent node to leave")
    assert membership.info("node-b") == {}, "its member info expired with it"


def test_a_leaving_node_is_gone_at_once(redis_client: redis.Redis, settings: Settings) -> None:
    membership = Membership(redis_client, settings)
    membership.heartbeat("node-a", {})
    membership.heartbeat("node-b", {})
    membership.leave("node-b")
    assert set(membership.live()) == {"node-a"}
    assert membership.heartbeat("node-a", {})[0] == ["node-a"]


def test_a_paused_worker_leaves_and_rejoins_when_resumed(
    start_worker: WorkerFactory, settings: Settings, redis_client: redis.Redis
) -> None:
    worker = start_worker()
    node = worker.node_id(redis_client, settings)
    membership = Membership(redis_client, settings)
    assert node in membership.live()
    worker.signal(signal.SIGSTOP)
    try:
        poll(lambda: node not in membership.live(), 10.0, what="the paused worker to leave")
        poll(lambda: not lease_owners(redis_client, settings), 10.0, what="its leases to expire")
    finally:
        worker.signal(signal.SIGCONT)
    poll(lambda: node in membership.live(), 10.0, what="the resumed worker to rejoin")
    poll(lambda: converged(redis_client, settings), 20.0, what="it to own the partitions again")


def test_a_static_worker_keeps_its_partitions_and_dynamic_ones_take_all_the_rest(
    start_worker: WorkerFactory, settings: Settings, redis_client: redis.Redis
) -> None:
    dynamic = start_worker()  # first alone: owns every partition
    static = start_worker(partitions="0-3")  # then takes 0-3 from it by handoff
    static_node = static.node_id(redis_client, settings)
    dynamic_node = dynamic.node_id(redis_client, settings)
    want = {p: static_node if p <= 3 else dynamic_node for p in range(settings.partitions)}
    poll(lambda: lease_owners(redis_client, settings) == want, 20.0, what="the split 0-3 / 4-7")
    assert balanced_members(redis_client, settings) == [dynamic_node]
    assert static_node in Membership(redis_client, settings).live()
    # a join rebalances only the dynamic partitions (the joiner may get none of 4: no wait)
    second = start_worker(wait=False)
    second_node = second.node_id(redis_client, settings)

    def split_again() -> bool:
        owners = lease_owners(redis_client, settings)
        return (
            len(owners) == settings.partitions
            and all(owners[p] == static_node for p in range(4))
            and {owners[p] for p in range(4, settings.partitions)} <= {dynamic_node, second_node}
            and balanced_members(redis_client, settings) == sorted([dynamic_node, second_node])
        )

    poll(split_again, 20.0, what="dynamic partitions to be shared by the dynamic workers")
