"""The claim folded into the broker fetch (keyq.fetch_claims, keyq/lua/fetch.lua): a served
partition's message goes from its queue into its in-flight list in the fetch's own round trip,
under the lease; whatever cannot be delivered goes back to the queue head in order."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Producer, Queue

from keyq.celery_app import DISPATCH_TASK
from keyq.fetch_claims import ClaimPlan, FetchClaims
from keyq.mailbox import DELIVERIES_HEADER, Claimed, Mailbox
from keyq.scripts import composed_source
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll

pytestmark = pytest.mark.integration

PARTITION = 3


class Recorder:
    """FetchClaims' callbacks, recording what the transport handed over."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, bytes, Claimed, ClaimPlan]] = []
        self.given_back: list[tuple[str, bool]] = []
        self.lost: list[str] = []
        self.fail = False

    def deliver(self, queue: str, raw: bytes, claimed: Claimed, plan: ClaimPlan) -> None:
        if self.fail:
            raise RuntimeError("a delivery that fails")
        self.delivered.append((queue, raw, claimed, plan))

    def give_back(self, queue: str, plan: ClaimPlan, failed: bool) -> None:
        self.given_back.append((queue, failed))

    def on_lost(self, queue: str, plan: ClaimPlan) -> None:
        self.lost.append(queue)


@pytest.fixture
def setup(
    settings: Settings, redis_client: redis.Redis
) -> Iterator[tuple[Connection, Queue, FetchClaims, Recorder, ClaimPlan]]:
    mailbox = Mailbox(redis_client, settings)
    name = settings.queue_name(PARTITION)
    lease_key = settings.redis_key("test-lease", str(PARTITION))
    redis_client.set(lease_key, "node-a|7")
    plan = ClaimPlan(7, lease_key, "node-a|7", mailbox.inflight_key(PARTITION), False)
    rec = Recorder()
    claims = FetchClaims(settings, rec.deliver, rec.give_back, rec.on_lost, 10, 4, 3)
    claims.put(name, plan)
    with Connection(settings.broker_url, transport="keyq.transport:Transport") as conn:
        yield conn, Queue(name, routing_key=name), claims, rec, plan
    redis_client.delete(lease_key, mailbox.inflight_key(PARTITION), name, name + ":wake")


def publish(conn: Connection, queue: Queue, i: int, **headers: Any) -> None:
    Producer(conn.channel()).publish(
        [[[{"i": i}]], {}, {}],
        routing_key=queue.name,
        declare=[queue],
        serializer="json",
        headers={"task": DISPATCH_TASK, "id": f"m{i}", **headers},
    )


def numbers(raws: list[bytes]) -> list[int]:
    import base64

    return [json.loads(base64.b64decode(json.loads(r)["body"]))[0][0][0]["i"] for r in raws]


def consume(conn: Connection, queue: Queue, claims: FetchClaims) -> tuple[Any, list[Any]]:
    celery_got: list[Any] = []
    channel = conn.channel()
    channel.keyq_claims = claims
    consumer = Consumer(channel, [queue], callbacks=[lambda body, m: celery_got.append(body)])
    consumer.consume()
    return channel, celery_got


def test_a_served_partitions_message_is_claimed_by_the_fetch_with_the_rest_of_a_batch(
    setup: Any, redis_client: redis.Redis
) -> None:
    conn, queue, claims, rec, plan = setup
    for i in range(5):
        publish(conn, queue, i)
    _, celery_got = consume(conn, queue, claims)
    conn.drain_events(timeout=5)
    assert celery_got == []  # straight to the worker, not through Celery
    [(name, raw, claimed, used)] = rec.delivered
    assert name == queue.name and used == plan
    assert numbers([raw]) == [0]
    assert numbers(claimed.drained) == [1, 2, 3]  # one drain step (3) of the room (10)
    assert claimed.share == 10 and claimed.poison == []
    # in the in-flight list, in order, under the lease; never in kombu's unacked records
    assert numbers(redis_client.lrange(plan.inflight_key, 0, -1)) == [0, 1, 2, 3]
    assert redis_client.llen(queue.name) == 1
    assert redis_client.hlen("unacked") == 0


def test_a_lease_that_is_not_the_plans_leaves_the_message_at_its_head(
    setup: Any, redis_client: redis.Redis
) -> None:
    conn, queue, claims, rec, plan = setup
    redis_client.set(plan.lease_key, "node-b|8")  # taken over meanwhile
    for i in range(2):
        publish(conn, queue, i)
    redis_client.delete(queue.name + ":wake")
    _, celery_got = consume(conn, queue, claims)
    with contextlib.suppress(Exception):  # nothing delivered: kombu may time out
        conn.drain_events(timeout=1)
    assert rec.lost[:1] == [queue.name] and rec.delivered == [] and celery_got == []
    assert numbers(redis_client.lrange(queue.name, 0, -1)) == [1, 0]  # 0 next, as before
    assert redis_client.llen(queue.name + ":wake") == 1  # its owner is woken
    assert redis_client.llen(plan.inflight_key) == 0 and redis_client.hlen("unacked") == 0


def test_a_message_with_an_eta_is_recorded_for_celery_not_claimed(
    setup: Any, redis_client: redis.Redis
) -> None:
    conn, queue, claims, rec, plan = setup
    publish(conn, queue, 0, eta="2026-12-07T00:00:00+00:00")
    _, celery_got = consume(conn, queue, claims)
    conn.drain_events(timeout=5)
    assert len(celery_got) == 1 and rec.delivered == []
    assert redis_client.hlen("unacked") == 1 and redis_client.llen(plan.inflight_key) == 0


def test_a_message_delivered_twice_before_is_claimed_alone(
    setup: Any, redis_client: redis.Redis
) -> None:
    conn, queue, claims, rec, plan = setup
    publish(conn, queue, 0, **{DELIVERIES_HEADER: 2})
    publish(conn, queue, 1)
    consume(conn, queue, claims)
    conn.drain_events(timeout=5)
    [(_, raw, claimed, _)] = rec.delivered
    assert numbers([raw]) == [0] and claimed.drained == [] and claimed.share == 0
    assert numbers(redis_client.lrange(plan.inflight_key, 0, -1)) == [0]


def test_what_cannot_be_delivered_is_given_back(setup: Any, redis_client: redis.Redis) -> None:
    """A delivery that raises is given back counted (so it cannot loop for ever); a queue the
    consumer has left since the fetch went out, as it was."""
    conn, queue, claims, rec, plan = setup
    publish(conn, queue, 0)
    channel, _ = consume(conn, queue, claims)
    rec.fail = True
    conn.drain_events(timeout=5)
    assert rec.given_back == [(queue.name, True)] and rec.delivered == []
    channel._keyq_sent_plans = claims.plans
    channel._keyq_claimed("elsewhere", b"{}", 3, [[], [], [], 0])  # no plan: nothing done
    assert rec.given_back == [(queue.name, True)]
    claims.put("left", plan)
    channel._keyq_sent_plans = claims.plans
    channel._keyq_claimed("left", b"{}", 3, [[], [], [], 0])  # no consumer for it any more
    assert rec.given_back == [(queue.name, True), ("left", False)]


def test_other_served_queues_that_wait_are_named_with_their_lengths(
    setup: Any, redis_client: redis.Redis, settings: Settings
) -> None:
    conn, queue, claims, rec, plan = setup
    other = Queue(settings.queue_name(5), routing_key=settings.queue_name(5))
    claims.put(other.name, ClaimPlan(7, plan.lease_key, plan.lease_value, "inflight-5", True))
    publish(conn, queue, 0)
    for i in range(3):
        publish(conn, other, 10 + i)
    channel = conn.channel()
    channel.keyq_claims = claims
    Consumer(channel, [queue, other], callbacks=[lambda body, m: None]).consume()
    conn.drain_events(timeout=5)
    queue_first = rec.delivered[0][0] == queue.name
    claimed = rec.delivered[0][2]
    if queue_first:  # the other one is fresh from a takeover: this queue takes a fair share
        assert claimed.waiting == {5: 3} and claimed.share == 5
    else:
        assert claimed.waiting == {} or claimed.waiting == {PARTITION: 1}
    redis_client.delete(other.name, "inflight-5", other.name + ":wake")


def watch_commands(r: redis.Redis) -> tuple[list[str], Any]:
    """Every command Redis runs from now on (MONITOR), and the function that stops watching."""
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        with r.monitor() as m:
            for command in m.listen():
                seen.append(str(command.get("command", "")))
                if done.is_set():
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def stop() -> None:
        done.set()
        r.ping()  # one more command, so the watcher sees it is done
        watcher.join(5)

    return seen, stop


def test_a_workers_batches_begin_without_a_claim_round_trip(
    start_worker: WorkerFactory, client: Any, settings: Settings, redis_client: redis.Redis
) -> None:
    """MONITOR shows every command a worker sends: with the fold, the claim script never runs
    and nothing of a partition message is written to kombu's unacked records, while every
    message is applied; with KEYQ_FETCH_CLAIM=0 both happen for every fetch (red before)."""
    claim = composed_source("claim_batch", "claim", "drain", "nonempty")
    claim_sha = redis_client.script_load(claim)
    for fold, key in (("1", "fold-on"), ("0", "fold-off")):
        worker = start_worker(partitions="0-7", env={"KEYQ_FETCH_CLAIM": fold})
        seen, stop = watch_commands(redis_client)
        for n in range(5):
            client.send("counter", key, "add", {"by": 1})
            poll(lambda n=n, key=key: (client.read("counter", key) or {}).get("value") == n + 1)
        stop()
        worker.stop()
        claims = [c for c in seen if c.startswith("EVALSHA " + claim_sha)]
        unacked = [c for c in seen if c.startswith("HSET unacked")]
        if fold == "1":
            assert claims == [] and unacked == [], (claims[:2], unacked[:2])
        else:
            assert len(claims) >= 5 and len(unacked) >= 5, (len(claims), len(unacked))
