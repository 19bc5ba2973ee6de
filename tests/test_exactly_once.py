"""G3 exactly-once effect with real worker processes: a message id is applied once, whether the
broker carries it twice or a worker dies between its commit and its ack."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from keyq.client import Client
from keyq.mailbox import KOMBU_UNACKED, KOMBU_UNACKED_INDEX
from keyq.repo import Repo
from keyq.settings import Settings
from tests import faults
from tests.conftest import WorkerFactory, poll

pytestmark = pytest.mark.integration


def seen(client: Client, key: str) -> list[Any]:
    stored = client.repo.load_one("sequence", key)
    return [] if stored is None else list(stored.state["seen"])


def test_same_envelope_published_twice_changes_state_once(
    start_worker: WorkerFactory, client: Client, repo: Repo
) -> None:
    env = client.envelope("sequence", "twice", "see", "a")
    client.publish([env])
    client.publish([env])
    client.send("sequence", "twice", "see", "b")  # applied after both copies of `a`
    start_worker()
    poll(lambda: seen(client, "twice") == ["a", "b"], what="a then b, once each")
    assert repo.load_one("sequence", "twice").version == 2  # type: ignore[union-attr]


def test_copy_arriving_after_the_original_was_applied_is_skipped(
    start_worker: WorkerFactory, client: Client
) -> None:
    start_worker()
    env = client.envelope("sequence", "late", "see", "a")
    client.publish([env])
    poll(lambda: seen(client, "late") == ["a"], what="the original")
    client.publish([env])
    client.send("sequence", "late", "see", "b")
    poll(lambda: "b" in seen(client, "late"), what="the marker after the copy")
    assert seen(client, "late") == ["a", "b"]
    assert client.call("sequence", "late", "see", "c") == 3


def test_messages_are_applied_once_after_a_crash_between_commit_and_ack(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    redis_client: redis.Redis,
) -> None:
    keys = [f"crash-{i}" for i in range(40)]
    per_key = 10
    # all queued before the worker starts, so its first task drains a batch into in-flight
    for n in range(per_key):
        client.send_many("sequence", [(k, "see", n) for k in keys])
    doomed = start_worker(
        wait=False,
        env={
            faults.FAULTS_ENV: "exit-after-commit=1",
            "KEYQ_ENTITY_MODULES": f"keyq.examples,tests.entities,{faults.MODULE}",
        },
    )
    assert doomed.proc.wait(30) == 137, doomed.log()[-3000:]

    # the crash left committed work whose trigger is unacked and whose drained batch is in flight
    committed = {k: seen(client, k) for k in keys}
    assert any(committed.values()), "the doomed worker committed nothing before dying"
    left_behind = redis_client.hlen(KOMBU_UNACKED) + sum(
        redis_client.llen(settings.redis_key("inflight", str(p)))
        for p in range(settings.partitions)
    )
    assert left_behind > 0, "nothing was left unacked or in flight: the fault hit nothing"

    heir = start_worker()
    expected = list(range(per_key))
    poll(
        lambda: all(seen(client, k) == expected for k in keys),
        timeout=30,
        what="every key to see 0..9 exactly once after the restart",
    )
    # the heir put the dead worker's unacked and in-flight messages back at the head
    assert "keyq restored" in heir.log(), heir.log()[-3000:]
    # nothing of ours is left behind to be replayed later
    poll(lambda: sum(client.queue_depths().values()) == 0, what="queues drained")
    poll(
        lambda: all(
            redis_client.llen(settings.redis_key("inflight", str(p))) == 0
            for p in range(settings.partitions)
        ),
        timeout=5,
        what="in-flight lists cleared",
    )
    # the last trigger is acked just after its commit, so poll for the unacked hash to empty
    poll(lambda: redis_client.hlen(KOMBU_UNACKED) == 0, timeout=5, what="no unacked message")
    for k in keys:
        assert client.repo.load_one("sequence", k).version == per_key  # type: ignore[union-attr]


def test_messages_a_dead_worker_took_but_never_committed_are_applied_in_order(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    redis_client: redis.Redis,
) -> None:
    key = "taken"
    for n in range(10):
        client.send("sequence", key, "see", n)
    partition = client.envelope("sequence", key, "see").partition
    queue = settings.queue_name(partition)
    # a worker that died mid-batch: message 0 was its delivered, unacked trigger (kombu's
    # unacked hash and index), 1..4 sat in its in-flight list (drain.lua); nothing committed
    trigger = redis_client.rpop(queue)
    assert trigger is not None
    redis_client.hset(KOMBU_UNACKED, "dead-tag", json.dumps([json.loads(trigger), "", queue]))
    redis_client.zadd(KOMBU_UNACKED_INDEX, {"dead-tag": time.time() - 5})
    for _ in range(4):  # as drain.lua does: RPOP the queue's head, RPUSH in-flight
        redis_client.rpush(settings.redis_key("inflight", str(partition)), redis_client.rpop(queue))
    assert redis_client.llen(queue) == 5

    heir = start_worker()
    poll(lambda: len(seen(client, key)) >= 10, what="all ten messages")
    assert seen(client, key) == list(range(10))
    assert "keyq restored 5 message(s) to the head of partition" in heir.log()
