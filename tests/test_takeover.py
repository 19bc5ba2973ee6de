"""Takeover after kill -9: the dead node's unacknowledged and in-flight messages go back to the
head of their partition queue, in their original order, before anything newer; every key's
history ends complete, in order and without duplicates."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from keyq.client import Client
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll
from tests.ownership_helpers import (  # noqa: F401  (database_url: PostgreSQL only)
    database_url,
    keys_in_partition,
    lease_owners,
    sharing_hostnames,
)


def payload_ids(client: Client, entity: str, key: str) -> list[int]:
    state = client.read(entity, key) or {"log": [], "seen": []}
    if entity == "sequence":
        return [int(p) for p in state["seen"]]
    return [int(entry[0]["i"]) for entry in state["log"]]


def test_dead_owner_messages_are_restored_before_newer_ones(
    start_worker: WorkerFactory, client: Client, settings: Settings, tmp_path: Path
) -> None:
    mark = tmp_path / "inside-handler"
    # one batch: message 0 pauses the first worker in its handler with 1 and 2 in flight
    client.send("slow", "k", "see", {"i": 0, "mark": str(mark), "seconds": 30.0})
    client.send("slow", "k", "see", {"i": 1})
    client.send("slow", "k", "see", {"i": 2})
    first = start_worker()
    poll(mark.exists, what="the first worker to be inside the slow handler")
    first.kill()
    for i in range(3, 6):  # newer messages queue up behind, while nobody owns the partition
        client.send("slow", "k", "see", {"i": i})
    second = start_worker()
    poll(
        lambda: payload_ids(client, "slow", "k") == list(range(6)),
        what="all six messages applied in send order",
    )
    state = client.read("slow", "k") or {"log": []}
    assert {entry[1] for entry in state["log"]} == {second.pid}
    assert "restored 3 message(s)" in second.log()


def _diff(got: list[int], sent: int) -> str:
    missing = sorted(set(range(sent)) - set(got))
    dupes = sorted({x for x in got if got.count(x) > 1})
    disorder = [(a, b) for a, b in itertools.pairwise(got) if b < a]
    return f"len={len(got)} missing={missing[:10]} dupes={dupes[:10]} disorder={disorder[:5]}"


def _producer(
    client: Client, keys: list[str], stop: threading.Event, sent: dict[str, int]
) -> Callable[[], None]:
    def run() -> None:
        n = 0
        while not stop.is_set():
            key = keys[n % len(keys)]
            client.send("sequence", key, "see", sent[key])
            sent[key] += 1
            n += 1
            time.sleep(0.002)

    return run


def test_kill_under_load_loses_nothing_and_keeps_every_key_in_order(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    redis_client: redis.Redis,
    record_property: Callable[[str, object], None],
) -> None:
    names = sharing_hostnames(settings, "victim", "survivor")
    victim = start_worker(hostname=names[0])
    survivor = start_worker(hostname=names[1])
    victim_node = victim.node_id(redis_client, settings)
    survivor_node = survivor.node_id(redis_client, settings)
    poll(
        lambda: (
            set(lease_owners(redis_client, settings).values()) == {victim_node, survivor_node}
            and len(lease_owners(redis_client, settings)) == settings.partitions
        ),
        what="both workers to own partitions",
    )
    victim_parts = sorted(
        p for p, node in lease_owners(redis_client, settings).items() if node == victim_node
    )
    keys = [f"load-{i}" for i in range(24)]
    probe = keys_in_partition(victim_parts[0], settings, 1, "probe")[0]
    sent = dict.fromkeys(keys, 0)
    stop = threading.Event()
    producer = threading.Thread(target=_producer(client, keys, stop, sent), daemon=True)
    producer.start()
    try:
        poll(lambda: sum(sent.values()) > 300, what="load to build up")
        victim.kill()
        killed_at = time.monotonic()
        # the probe key lives on one of the dead node's partitions: time its first new message
        probe_sent = 0
        while True:
            client.send("witness", probe, "see", probe_sent)
            probe_sent += 1
            state = client.read("witness", probe)
            if state and any(pid == survivor.pid for _, pid in state["log"]):
                takeover_s = time.monotonic() - killed_at
                break
            if time.monotonic() - killed_at > 20:
                raise AssertionError("the survivor never applied a message of the dead node's")
            time.sleep(0.005)
        poll(lambda: sum(sent.values()) > 600, what="more load after the takeover")
    finally:
        stop.set()
        producer.join(10)
    record_property("takeover_seconds", round(takeover_s, 3))
    print(f"keyq takeover after kill -9: {takeover_s * 1000:.0f} ms", file=sys.stderr)

    def complete() -> bool:
        return (
            all(payload_ids(client, "sequence", k) == list(range(sent[k])) for k in keys)
            and partition_for(probe, settings.partitions) in victim_parts
        )

    try:
        poll(complete, 30.0, 0.2, what="every key's history complete and in order")
    except AssertionError:
        wrong = {
            k: (sent[k], _diff(payload_ids(client, "sequence", k), sent[k]))
            for k in keys
            if payload_ids(client, "sequence", k) != list(range(sent[k]))
        }
        raise AssertionError(f"histories wrong (sent, problem): {wrong}") from None
    assert set(lease_owners(redis_client, settings).values()) == {survivor_node}


def test_a_fetched_message_is_recorded_unacked_before_the_worker_reads_it(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """The kill -9 window of stock kombu: BRPOP removes a message before the worker has read
    and recorded it. keyq's transport pops and records in one step, so a crash anywhere after
    the pop leaves the message in `unacked`, where the next owner's restore finds it."""
    from kombu import Connection, Consumer, Producer, Queue

    from keyq.celery_app import DISPATCH_TASK
    from keyq.transport import wake_key

    name = settings.queue_name(0)
    queue = Queue(name, routing_key=name)
    with Connection(settings.broker_url, transport="keyq.transport:Transport") as conn:
        producer = Producer(conn.channel())
        for i in range(3):  # keyq.dispatch in Celery's format: anything else is quarantined
            producer.publish(
                [[[{"i": i}]], {}, {}],
                routing_key=name,
                declare=[queue],
                serializer="json",
                headers={"task": DISPATCH_TASK, "id": f"m{i}"},
            )
        assert redis_client.llen(wake_key(name)) == 1, "one wake token, however many messages"
        channel = conn.channel()
        got: list[object] = []
        consumer = Consumer(channel, [queue], callbacks=[lambda body, m: got.append(body)])
        consumer.consume()
        conn.transport.cycle._register_BRPOP(channel)  # sends the fetch; nothing read yet
        poll(lambda: redis_client.llen(name) == 2, 5.0, 0.01, what="the fetch to pop")
        assert redis_client.hlen("unacked") == 1 and redis_client.zcard("unacked_index") == 1
        assert got == [], "the worker has not read the reply: a kill now would lose nothing"
        conn.drain_events(timeout=5)
        assert got == [[[[{"i": 0}]], {}, {}]]
