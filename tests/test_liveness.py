"""Liveness: a handler that never returns does not hold its partition for long."""

from __future__ import annotations

import time
from typing import Any

import pytest

from keyq.client import Client
from keyq.cluster import Membership
from keyq.repo import Repo
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll
from tests.test_malformed import key_on

pytestmark = pytest.mark.integration


def seen(repo: Repo, key: str) -> list[Any]:
    stored = repo.load_one("spinner", key)
    return [] if stored is None else list(stored.state["seen"])


def test_spinning_handler_is_stopped_at_its_limit_and_the_partition_goes_on(
    start_worker: WorkerFactory, client: Client, settings: Settings, repo: Repo
) -> None:
    """max_handler_seconds = 2 and a handler that spins forever on one key, two workers: the
    other keys of the partition, queued behind it, are applied within limit + lease TTL + 3 s,
    and the spinning message is dead-lettered with the reason (not redelivered to spin again)."""
    start_worker()
    start_worker()
    partition = 4
    spin_key = key_on(settings, partition, "spin")
    others = [key_on(settings, partition, f"o{i}") for i in range(3)]
    for k in others:
        client.send("spinner", k, "see", 0)
    poll(lambda: all(seen(repo, k) == [0] for k in others), what="a warm partition")
    client.send("spinner", spin_key, "see", "spin")
    sent_at = time.monotonic()
    for n in range(1, 4):
        client.send_many("spinner", [(k, "see", n) for k in others])
    bound = 2.0 + settings.lease_ttl_s + 3.0
    poll(
        lambda: all(seen(repo, k) == [0, 1, 2, 3] for k in others),
        timeout=bound + 5,
        what="the keys queued behind the spinning handler",
    )
    assert time.monotonic() - sent_at < bound
    [dl] = repo.dead_letters()
    assert (dl.reason, dl.key, dl.error_type) == ("timeout", spin_key, "HandlerTimeoutError")
    assert "limit of 2s" in dl.error_message
    client.send("spinner", spin_key, "see", "after")
    poll(lambda: seen(repo, spin_key) == ["after"], what="the spinning key's next message")


def test_watchdog_gives_up_the_leases_of_a_node_stuck_out_of_the_time_limits_reach(
    start_worker: WorkerFactory, client: Client, settings: Settings, repo: Repo
) -> None:
    """A handler stuck where SIGALRM cannot reach: the progress watchdog stops the node (exit
    70) instead of renewing its leases forever; the next owner serves the partition, and the
    stuck message (delivered KEYQ_MAX_DELIVERIES times) is dead-lettered, not spun again."""
    env = {"KEYQ_MAX_HANDLER_SECONDS": "1", "KEYQ_MAX_DELIVERIES": "1"}
    stuck = start_worker(env=env)
    partition = 6
    key = key_on(settings, partition, "stuck")
    neighbour = key_on(settings, partition, "nb")
    client.send("spinner", key, "stuck")
    membership = Membership(client.redis, settings)

    def in_the_handler() -> bool:  # the batch stopped moving: the handler spins (heartbeats)
        quiet = [membership.info(node).get("batch_quiet_s") for node in membership.live()]
        return any(isinstance(q, int | float) and q > 0.5 for q in quiet)

    poll(in_the_handler, timeout=30, what="the stuck handler to be running")
    client.send("spinner", neighbour, "see", 1)  # waits behind it, in the queue
    assert stuck.proc.wait(30) == 70, stuck.log()[-2000:]
    assert "keyq watchdog: no progress" in stuck.log()
    start_worker(env=env)
    poll(lambda: seen(repo, neighbour) == [1], what="the partition served by the next owner")
    [dl] = repo.dead_letters()
    assert dl.reason == "max-deliveries" and dl.key == key
