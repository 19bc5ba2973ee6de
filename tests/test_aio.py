"""keyq.aio.AsyncClient: the same bytes on the broker as Client, the same validation and typed
errors, and 1,000 concurrent calls from one event loop over one shared reply listener."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
import redis

from keyq.aio import ASYNC_CLIENT_NAME, DEFAULT_MAX_CONNECTIONS, AsyncClient
from keyq.client import Client
from keyq.envelope import idempotent_message_id
from keyq.errors import (
    AlreadyAppliedError,
    CallTimeoutError,
    InvalidKeyError,
    Rejected,
    UnknownEntityError,
)
from keyq.settings import Settings
from tests.conftest import WorkerFactory

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def _decode(raw: bytes) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_the_async_client_publishes_what_the_client_publishes(
    settings: Settings, client: Client, redis_client: redis.Redis
) -> None:
    queue = settings.queue_name(client.envelope("counter", "k", "add", {"by": 1}).partition)
    client.send("counter", "k", "add", {"by": 1})

    async def send() -> None:
        async with AsyncClient(settings) as aio:
            await aio.send("counter", "k", "add", {"by": 1})

    asyncio.run(send())
    by_aio, by_client = (_decode(raw) for raw in redis_client.lrange(queue, 0, 1))
    assert redis_client.lrange(queue + ":wake", 0, -1) == [b"1"]
    assert by_aio.keys() == by_client.keys()
    varying = {"id", "root_id", "argsrepr"}  # the task id (= the message id) and its repr
    assert by_aio["headers"].keys() == by_client["headers"].keys()
    for name, value in by_client["headers"].items():
        if name not in varying:
            assert by_aio["headers"][name] == value, name
    assert by_aio["headers"]["id"] == by_aio["body"][0][0][0]["id"]
    props_varying = {"correlation_id", "reply_to", "delivery_tag"}
    assert by_aio["properties"].keys() == by_client["properties"].keys()
    for name, value in by_client["properties"].items():
        if name not in props_varying:
            assert by_aio["properties"][name] == value, name
    for doc in (by_aio, by_client):
        for env in doc["body"][0][0]:
            env.pop("id"), env.pop("sent_at")
    assert by_aio["body"] == by_client["body"]
    for name in ("content-type", "content-encoding"):
        assert by_aio[name] == by_client[name]


def test_bad_input_raises_the_clients_typed_errors_and_publishes_nothing(
    settings: Settings, client: Client
) -> None:
    async def go() -> None:
        async with AsyncClient(settings) as aio:
            with pytest.raises(UnknownEntityError):
                await aio.send("nope", "k", "add")
            with pytest.raises(InvalidKeyError):
                await aio.call("counter", "", "add", {"by": 1})
            with pytest.raises(CallTimeoutError):  # no worker runs
                await aio.call("counter", "k", "add", {"by": 1}, timeout=0.3)

    asyncio.run(go())
    assert sum(client.queue_depths().values()) == 1  # only the call's message


@pytest.mark.integration
def test_a_thousand_concurrent_calls_share_one_reply_listener(
    start_worker: WorkerFactory, settings: Settings, redis_client: redis.Redis
) -> None:
    start_worker()
    keys = [f"k{i}" for i in range(100)]

    def ours() -> int:  # the Redis server is shared: count only this client's connections
        return sum(1 for c in redis_client.client_list() if c.get("name") == ASYNC_CLIENT_NAME)

    before = ours()

    async def go() -> tuple[list[Any], Any, Any, Any, int]:
        async with AsyncClient(settings) as aio:
            calls = [aio.call("counter", keys[i % 100], "add", {"by": 1}) for i in range(1000)]
            got = await asyncio.gather(*calls)
            connections = ours() - before
            with pytest.raises(Rejected):
                await aio.call("cart", "c", "remove", {"item": "ghost"})
            state = await aio.read("counter", "k7")
            where = await aio.resolve("counter", "k7")
            ids = await aio.send_many("counter", [("k7", "add", {"by": 5}, "once")] * 3)
            return got, state, where, ids, connections

    got, state, where, ids, connections = asyncio.run(go())
    by_key: dict[str, list[int]] = {}
    for i, value in enumerate(got):
        by_key.setdefault(keys[i % 100], []).append(value)
    assert all(sorted(values) == list(range(1, 11)) for values in by_key.values())
    assert all(values == sorted(values) for values in by_key.values())  # per-key send order
    assert connections <= DEFAULT_MAX_CONNECTIONS + 1  # the pool plus the one listener
    assert state == {"value": 10}
    assert where.active
    assert len(set(ids)) == 1  # one idempotency key: one message id


@pytest.mark.integration
def test_a_retried_async_call_gets_the_first_reply_or_learns_it_was_applied(
    start_worker: WorkerFactory, settings: Settings, redis_client: redis.Redis
) -> None:
    """As Client.call: a call retried with its idempotency key gets the first reply; once that
    reply is gone, AlreadyAppliedError; the state changed once."""
    start_worker()

    async def go() -> tuple[Any, Any, Any]:
        async with AsyncClient(settings) as aio:
            first = await aio.call("counter", "r", "add", {"by": 3}, idempotency_key="q-1")
            again = await aio.call("counter", "r", "add", {"by": 3}, idempotency_key="q-1")
            message_id = idempotent_message_id("counter", "r", "q-1")
            redis_client.delete(settings.redis_key("reply", message_id))  # as if it expired
            with pytest.raises(AlreadyAppliedError):
                await aio.call("counter", "r", "add", {"by": 3}, idempotency_key="q-1")
            return first, again, await aio.read("counter", "r")

    first, again, state = asyncio.run(go())
    assert first == again == 3
    assert state == {"value": 3}
