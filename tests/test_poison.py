"""Poison is isolated to its message: whatever another producer puts on keyq's queues is
applied, re-routed once, or dead-lettered with a reason; it never stops its partition, its
neighbours or the process, and a pill that kills the process is dead-lettered after
KEYQ_MAX_DELIVERIES."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from keyq.celery_app import DISPATCH_TASK, RECONCILE_TASK, default_queue
from keyq.client import Client
from keyq.mailbox import KOMBU_UNACKED
from keyq.repo import Repo
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll
from tests.test_malformed import key_on

pytestmark = pytest.mark.integration


def items(repo: Repo, entity: str, key: str, field: str = "items") -> list[Any]:
    stored = repo.load_one(entity, key)
    return [] if stored is None else list(stored.state[field])


def test_lone_surrogate_from_a_plain_celery_producer_loses_nothing(
    start_worker: WorkerFactory, client: Client, settings: Settings, repo: Repo
) -> None:
    """The reported loss: a plain-Celery envelope whose key is "\\ud800" among journal
    appends made Celery drop the trigger and strand the batch drained behind it."""
    keys = [f"j{i}" for i in range(20)]
    start_worker()
    poisoned = client.envelope("journal", "x", "append", "bad").to_wire()
    for n in range(15):
        client.send_many("journal", [(k, "append", n) for k in keys])
        if n in (3, 9):
            for p in range(settings.partitions):
                wire = {**poisoned, "id": f"surrogate{n}p{p}", "key": "a\ud800", "partition": p}
                client.app.send_task(DISPATCH_TASK, args=[[wire]], queue=settings.queue_name(p))
    poll(
        lambda: all(items(repo, "journal", k) == list(range(15)) for k in keys),
        timeout=60,
        what="every journal append applied once, in order",
    )
    dead = poll(lambda: len(repo.dead_letters(limit=100)) >= 2 * settings.partitions and
                repo.dead_letters(limit=100), what="a dead letter per poisoned message")
    assert all("surrogate" in d.error_message for d in dead), [d.error_message for d in dead]


def test_dispatch_on_the_default_queue_is_rerouted_once_and_housekeeping_behind_it_runs(
    start_worker: WorkerFactory, client: Client, settings: Settings, repo: Repo,
    redis_client: redis.Redis,
) -> None:
    """`celery call keyq.dispatch` without --queue: the envelope moves to its key's partition
    (and is applied); a second misrouting is dead-lettered; nothing loops on the default queue."""
    start_worker()
    wire = client.envelope("journal", "routed", "append", "via-default").to_wire()
    client.app.send_task(DISPATCH_TASK, args=[[wire]], queue=default_queue(settings))
    poll(lambda: items(repo, "journal", "routed") == ["via-default"], what="the re-routed one")
    again = client.envelope("journal", "routed", "append", "twice").to_wire()
    client.app.send_task(
        DISPATCH_TASK, args=[[again]], queue=default_queue(settings),
        headers={"keyq-rerouted": True},
    )
    client.app.send_task(RECONCILE_TASK, queue=default_queue(settings))
    [dl] = poll(lambda: repo.dead_letters(), what="the twice-misrouted dead letter")  # type: ignore[misc]
    assert dl.reason == "misrouted" and "again" in dl.error_message
    poll(lambda: redis_client.llen(default_queue(settings)) == 0, what="the default queue drains")
    assert items(repo, "journal", "routed") == ["via-default"]


def test_envelope_on_the_wrong_partition_is_moved_to_its_own_once(
    start_worker: WorkerFactory, client: Client, settings: Settings, repo: Repo
) -> None:
    start_worker()
    key = key_on(settings, 2, "w")
    wire = client.envelope("journal", key, "append", "moved").to_wire()
    client.app.send_task(DISPATCH_TASK, args=[[wire]], queue=settings.queue_name(5))
    poll(lambda: items(repo, "journal", key) == ["moved"], what="the envelope on its partition")
    assert repo.dead_letters() == []


def test_poison_pill_that_kills_the_process_is_dead_lettered_after_max_deliveries(
    start_worker: WorkerFactory, client: Client, settings: Settings, repo: Repo
) -> None:
    """A handler that calls os._exit on one key: each takeover counts a delivery; after
    KEYQ_MAX_DELIVERIES the pill is dead-lettered and the partition's other keys flow again,
    each applied once and in order."""
    env = {"KEYQ_MAX_DELIVERIES": "3"}
    s = settings.with_(max_deliveries=3)
    partition = 1
    ok_keys = [key_on(s, partition, f"ok{i}") for i in range(3)]
    pill_key = key_on(s, partition, "pill")
    for n in range(5):
        client.send_many("pill", [(k, "see", n) for k in ok_keys])
        if n == 2:
            client.send("pill", pill_key, "see", "die")
    deaths = 0
    deadline = time.monotonic() + 90
    worker = start_worker(wait=False, env=env)
    while not repo.dead_letters():
        assert time.monotonic() < deadline, f"no dead letter after {deaths} deaths"
        if worker.proc.poll() is not None:
            assert worker.proc.returncode == 3, worker.log()[-2000:]
            deaths += 1
            worker = start_worker(wait=False, env=env)  # what a process supervisor does
        time.sleep(0.1)
    [dl] = repo.dead_letters()
    assert dl.reason == "max-deliveries" and dl.key == pill_key
    assert dl.deliveries == 3 and "delivered 3 times" in dl.error_message
    assert dl.raw  # the broker message's bytes, base64
    assert deaths == 3
    poll(
        lambda: all(items(repo, "pill", k, "seen") == list(range(5)) for k in ok_keys),
        timeout=30,
        what="the other keys of the partition, once each and in order",
    )
    assert worker.proc.poll() is None


def test_control_replies_are_not_recorded_as_unacked(
    start_worker: WorkerFactory, client: Client, redis_client: redis.Redis
) -> None:
    """`celery inspect ping` (and Flower) read replies without acks: nothing may be left in
    kombu's unacked table by them."""
    start_worker()
    client.send("journal", "idle", "append", 1)
    poll(lambda: redis_client.hlen(KOMBU_UNACKED) == 0, timeout=5, what="an idle worker")
    for _ in range(3):
        replies = client.app.control.inspect(timeout=2).ping()
        assert replies, "the worker did not answer the ping"
    assert redis_client.hlen(KOMBU_UNACKED) == 0



def test_garbage_on_the_default_queue_is_dead_lettered_and_housekeeping_goes_on(
    start_worker: WorkerFactory, client: Client, settings: Settings, repo: Repo,
    redis_client: redis.Redis,
) -> None:
    start_worker(partitions="0-7")
    queue = default_queue(settings)
    redis_client.lpush(queue, b"\xff garbage")
    redis_client.lpush(queue + ":wake", 1)
    client.app.send_task(RECONCILE_TASK, queue=queue)
    [dl] = poll(lambda: repo.dead_letters(), what="the garbage's dead letter")  # type: ignore[misc]
    assert dl.reason == "undecodable" and f"on {queue}" in dl.error_message and dl.raw
    poll(lambda: redis_client.llen(queue) == 0, what="the reconcile task behind it ran")


def test_an_idle_worker_notices_a_plain_celery_publish_quickly(
    start_worker: WorkerFactory, client: Client, settings: Settings, repo: Repo
) -> None:
    """A producer that is not keyq's (stock Celery on the stock Redis transport) pushes no wake
    token; an idle worker still applies its message within about the wake wait (50 ms), not
    after a one-second BRPOP timeout."""
    import statistics

    from celery import Celery

    start_worker()
    stock = Celery("foreign", broker=settings.broker_url, set_as_current=False)
    stock.conf.task_serializer = "json"
    key = "plain"
    waits = []
    try:
        for n in range(10):
            time.sleep(0.3)  # idle again: the worker is waiting for a wake token
            wire = client.envelope("journal", key, "append", n).to_wire()
            started = time.monotonic()
            queue = settings.queue_name(wire["partition"])
            stock.send_task(DISPATCH_TASK, args=[[wire]], queue=queue)
            poll(lambda n=n: len(items(repo, "journal", key)) == n + 1, interval=0.005)
            waits.append(time.monotonic() - started)
    finally:
        stock.close()
    assert items(repo, "journal", key) == list(range(10))
    assert statistics.median(waits) < 0.3, waits
