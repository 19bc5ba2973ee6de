"""The one publisher writes Celery's own message format (what `send_task` writes through keyq's
transport, decoded by kombu alike) in one Redis round trip, and refuses a full partition."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from kombu import Connection

from keyq.celery_app import DISPATCH_TASK, make_app
from keyq.client import Client
from keyq.errors import OverloadedError
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


def test_a_publish_is_one_round_trip(settings: Settings, redis_client: redis.Redis) -> None:
    with Client(settings) as client:
        env = client.envelope("counter", "rt", "add", {"by": 1})
        client.publisher.publish([env])  # warm: the script is loaded once

        def calls() -> dict[str, int]:
            stats = redis_client.info("commandstats")
            return {k: int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}

        sent: list[bytes] = []
        original = redis.connection.AbstractConnection.send_packed_command

        def counting(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
            sent.append(command)
            return original(self, command, *args, **kwargs)

        redis.connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
        try:
            before = calls()
            client.send("counter", "rt", "add", {"by": 2})
            after = calls()
        finally:
            redis.connection.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta.get("cmdstat_evalsha") == 1  # the publish script, once
    assert len(sent) == 3  # the INFO before, the one EVALSHA, the INFO after


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
