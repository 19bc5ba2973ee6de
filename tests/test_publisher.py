"""The one publisher writes Celery's own message format (what `send_task` writes through keyq's
transport, decoded by kombu alike) in one Redis round trip, and refuses a full partition."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import redis
from kombu import Connection

from keyq.celery_app import DISPATCH_TASK, make_app
from keyq.client import Client
from keyq.errors import BrokerUnavailableError, OverloadedError, PartialPublishError
from keyq.publisher import Publisher, argsrepr
from keyq.settings import Settings


def _pop(client: redis.Redis, queue: str) -> dict[str, Any]:
    raw = client.rpop(queue)
    assert raw is not None, f"nothing on {queue}"
    return dict(json.loads(raw))


def test_message_is_what_celery_send_task_writes_for_the_same_task_queue_and_id(
    settings: Settings, client: Client, redis_client: redis.Redis
) -> None:
    envelopes = [client.envelope("counter", "same", "add", {"by": 1})]
    wires = [e.to_wire() for e in envelopes]
    queue = settings.queue_name(envelopes[0].partition)
    client.publisher.publish(envelopes)
    ours = _pop(redis_client, queue)
    client.app.send_task(DISPATCH_TASK, args=[wires], queue=queue, task_id=envelopes[0].id)
    celerys = _pop(redis_client, queue)
    # kombu decodes both to the same task call
    with Connection(settings.broker_url, transport="keyq.transport:Transport") as conn:
        channel = conn.default_channel
        bodies = [
            channel.Message(json.loads(json.dumps(m)), channel=channel).decode()
            for m in (ours, celerys)
        ]
    assert bodies[0] == bodies[1] and bodies[0][0] == [wires]
    # by design, two fields differ: the delivery tag (a fresh uuid per message) and the
    # arguments' display form (a summary instead of Celery's saferepr of the whole list);
    # everything else, body bytes included, is what Celery writes
    assert ours["properties"].pop("delivery_tag") != celerys["properties"].pop("delivery_tag")
    assert ours["headers"].pop("argsrepr") == argsrepr(wires) == "counter/same add"
    assert "'entity': 'counter'" in celerys["headers"].pop("argsrepr")
    assert ours == celerys


def test_a_publish_is_one_round_trip(settings: Settings) -> None:
    """Counted on the client side (the Redis server is shared: its command stats are not)."""
    with Client(settings) as client:
        client.send("counter", "rt", "add", {"by": 1})  # warm: the script is loaded once
        sent: list[Any] = []
        original = redis.connection.AbstractConnection.send_packed_command

        def counting(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
            sent.append(command)
            return original(self, command, *args, **kwargs)

        redis.connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
        try:
            client.send("counter", "rt", "add", {"by": 2})
        finally:
            redis.connection.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]
    packed = [b"".join(c) if isinstance(c, list) else bytes(c) for c in sent]
    assert len(packed) == 1 and b"EVALSHA" in packed[0]  # one round trip per send


def test_publisher_refuses_a_full_partition_unless_told_not_to(
    settings: Settings, redis_client: redis.Redis
) -> None:
    s = settings.with_(max_queue_depth=2)
    with Client(s) as client:
        publisher = Publisher(client.broker, s, make_app(s))
        envs = [client.envelope("counter", "cap", "add", {"by": n}) for n in range(4)]
        publisher.publish([envs[0]])
        publisher.publish([envs[1]])
        with pytest.raises(OverloadedError):
            publisher.publish([envs[2]])
        publisher.publish([envs[3]], depth_limit=False)  # a worker's own fires and re-routes
        assert redis_client.llen(s.queue_name(envs[0].partition)) == 3


def test_the_text_fast_path_and_the_message_are_the_same_json(client: Client) -> None:
    builder = client.publisher.builder
    wires = [client.envelope("counter", "t", "add", {"by": n}).to_wire() for n in range(2)]
    text = json.loads(builder.text(wires, "q", "tid", {"keyq-rerouted": True}))
    built = builder.message(wires, "q", "tid", {"keyq-rerouted": True})
    assert text["properties"].pop("delivery_tag") != built["properties"].pop("delivery_tag")
    assert text == built and text["headers"]["keyq-rerouted"] is True


def test_send_many_that_loses_the_broker_midway_says_which_ids_were_published(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Retrying a partial send_many blindly would apply its first part twice (new ids): the
    error names the ids already on the broker, so only the rest is sent again."""
    with Client(settings) as client:
        keys = [f"pp{i}" for i in range(40)]
        parts = {client.envelope("counter", k, "add").partition for k in keys}
        assert len(parts) >= 3
        original = client.publisher.publish
        calls = {"n": 0}

        def flaky(envelopes: Any, **kw: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 3:  # the broker goes away after two partitions' messages
                raise BrokerUnavailableError("injected: connection lost")
            original(envelopes, **kw)

        client.publisher.publish = flaky  # type: ignore[method-assign]
        with pytest.raises(PartialPublishError) as info:
            client.send_many("counter", [(k, "add", {"by": 1}) for k in keys])
        err = info.value
        assert err.published and err.unpublished
        assert len(err.published) + len(err.unpublished) == len(keys)
        on_broker = sum(
            redis_client.llen(settings.queue_name(p)) for p in range(settings.partitions)
        )
        assert on_broker == 2  # two broker messages: exactly the published ids' partitions
        queued_ids = set()
        for p in range(settings.partitions):
            for raw in redis_client.lrange(settings.queue_name(p), 0, -1):
                body = json.loads(base64.b64decode(json.loads(raw)["body"]))
                queued_ids.update(e["id"] for e in body[0][0])
        assert queued_ids == set(err.published)
