"""keyq.transport packs each fetch and wake-wait command once per queue order (they go out
after every delivery); what it sends must still follow the channel's queues and their modes."""

from __future__ import annotations

from typing import Any

import redis
from kombu import Connection, Consumer, Producer, Queue

from keyq.celery_app import DISPATCH_TASK
from keyq.settings import Settings


def publish(conn: Connection, queue: Queue, i: int) -> None:
    Producer(conn.channel()).publish(
        [[[{"i": i}]], {}, {}],
        routing_key=queue.name,
        declare=[queue],
        serializer="json",
        headers={"task": DISPATCH_TASK, "id": f"m{i}"},
    )


def test_a_fetch_is_packed_once_and_a_queue_consumed_anew_without_acks_is_not_recorded(
    redis_client: redis.Redis, settings: Settings
) -> None:
    name = f"{settings.namespace}.plain"
    queue = Queue(name, routing_key=name)
    got: list[Any] = []
    with Connection(settings.broker_url, transport="keyq.transport:Transport") as conn:
        channel = conn.channel()
        for i in range(3):
            publish(conn, queue, i)
        acked = Consumer(channel, [queue], callbacks=[lambda body, m: got.append(body)])
        acked.consume()
        for _ in range(3):
            conn.drain_events(timeout=5)
        assert [b[0][0][0]["i"] for b in got] == [0, 1, 2]  # in order, one fetch each
        assert 1 <= len(channel._keyq_packed) <= 2  # the fetch (and the wait) packed once
        assert redis_client.hlen("unacked") == 3  # consumed with acks: recorded until acked
        acked.cancel()
        # the same queue again, now without acks (as Celery's control replies are): its
        # packed fetch must not say "record it" any more
        publish(conn, queue, 3)
        plain = Consumer(
            channel, [queue], callbacks=[lambda body, m: got.append(body)], no_ack=True
        )
        plain.consume()
        conn.drain_events(timeout=5)
        assert got[-1][0][0][0]["i"] == 3
        assert redis_client.hlen("unacked") == 3
