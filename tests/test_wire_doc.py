"""docs/wire.md is true: its vectors, its envelope schema, and its two ways to publish without
keyq (plain Celery; raw Redis commands) reach a real worker."""

from __future__ import annotations

import base64
import json
import re
import sys
import threading
import time
import uuid
from typing import Any

import pytest
import redis

from keyq import routing
from keyq.client import Client
from keyq.envelope import idempotent_message_id
from keyq.errors import InvalidPayloadError
from keyq.payloads import SchemaSpec
from keyq.settings import Settings
from tests.conftest import ROOT, WorkerFactory, poll

DOC = (ROOT / "docs" / "wire.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, re.S)


def test_the_partition_vectors_are_keyqs() -> None:
    rows = re.findall(r"^\| `([^`]+)` \| `(0x[0-9a-f]+)` \| (\d+) \| (\d+) \| (\d+) \|$", DOC, re.M)
    assert len(rows) == 5
    for key, digest, p8, p64, p4096 in rows:
        assert routing.key_digest(key) == int(digest, 16)
        assert [routing.partition_for(key, n) for n in (8, 64, 4096)] == [
            int(p8),
            int(p64),
            int(p4096),
        ]


def test_the_documented_partition_function_is_keyqs() -> None:
    namespace: dict[str, Any] = {}
    exec(_blocks("python")[0], namespace)
    for key in ("alice", "bob", "x" * 300, "é-ключ-🔑"):
        for n in (1, 8, 64, 4096):
            assert namespace["partition_for"](key, n) == routing.partition_for(key, n)


def test_the_idempotency_vector() -> None:
    match = re.search(r"entity `(\w+)`, key\s+`(\w+)`, K `([\w-]+)` gives `([0-9a-f]{32})`", DOC)
    assert match is not None
    entity, key, k, expected = match.groups()
    assert idempotent_message_id(entity, key, k) == expected


def test_the_envelope_schema_accepts_keyqs_envelopes_and_refuses_broken_ones(
    client: Client,
) -> None:
    spec = SchemaSpec(json.loads(_blocks("json")[0]), "envelope")
    for env in (
        client.envelope("counter", "k", "add", {"by": 1}),
        client.envelope("cart", "é", "add", {"item": "x"}, reply=True, idempotency_key="r-1"),
    ):
        spec.to_python(env.to_wire())
    good = client.envelope("counter", "k", "add").to_wire()
    for broken in ({**good, "id": ""}, {**good, "partition": "1"}, {**good, "v": 2}):
        with pytest.raises(InvalidPayloadError):
            spec.to_python(broken)
    without_id = {k: v for k, v in good.items() if k != "id"}
    with pytest.raises(InvalidPayloadError):
        spec.to_python(without_id)


@pytest.mark.integration
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_plain_celery_and_raw_redis_producers_reach_the_workers(
    start_worker: WorkerFactory,
    settings: Settings,
    client: Client,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start_worker()
    # 1. the plain-Celery example, as written
    monkeypatch.setitem(sys.modules, "keyq_wire", routing)
    namespace: dict[str, Any] = {}
    exec(_blocks("python")[1], namespace)
    namespace["publish_deposit"](settings.broker_url, settings.namespace, 8, "alice", 3)
    poll(lambda: client.read("counter", "alice") == {"value": 3}, what="the Celery message")
    # 2. the raw Redis commands, with the documented message
    partition = routing.partition_for("bob", settings.partitions)
    queue = f"{settings.namespace}.p{partition}"
    message_id = uuid.uuid4().hex
    envelope = {
        "v": 1,
        "id": message_id,
        "entity": "counter",
        "key": "bob",
        "op": "add",
        "payload": {"by": 4},
        "partition": partition,
        "reply": True,
        "sent_at": time.time(),
    }
    body = [[[envelope]], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    message = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": "keyq.dispatch",
            "id": message_id,
            "root_id": message_id,
            "parent_id": None,
            "group": None,
            "retries": 0,
            "eta": None,
            "expires": None,
            "timelimit": [None, None],
            "argsrepr": "",
            "kwargsrepr": "{}",
            "origin": "doc",
        },
        "properties": {
            "correlation_id": message_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    pipe = redis_client.pipeline(transaction=False)
    pipe.lpush(queue, json.dumps(message))
    pipe.lpush(queue + ":wake", 1)
    pipe.ltrim(queue + ":wake", 0, 0)
    pipe.execute()
    got = redis_client.blpop([f"{settings.namespace}:reply:{message_id}"], timeout=15)
    assert got is not None
    assert json.loads(got[1]) == {"ok": True, "reply": 4}


def test_an_idle_worker_looks_at_its_queues_on_its_own_tick_not_on_redis_hz(
    start_worker: WorkerFactory, settings: Settings, redis_url: str
) -> None:
    """A message published without a wake token (plain Celery) is found at the idle worker's
    next look. Redis ends a blocking wait only at its cron tick (hz 10: 100 ms), so the wait's
    timeout cannot pace the looks: the channel's ticker pushes a token on the channel's own wake
    list every 50 ms, and the wake BRPOP names that list."""
    start_worker()
    time.sleep(0.5)  # idle
    seen: list[list[str]] = []
    stop = threading.Event()

    def watch() -> None:
        with redis.Redis.from_url(redis_url).monitor() as m:
            for cmd in m.listen():
                if stop.is_set():
                    return
                seen.append(str(cmd["command"]).split())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(1.0)
    stop.set()
    redis.Redis.from_url(redis_url).ping()  # wakes the monitor loop
    watcher.join(5)
    waits = [c for c in seen if c[0] == "BRPOP" and any(settings.namespace in k for k in c)]
    assert waits, "the idle worker never waited on its wake lists"
    ticks = {k for c in waits for k in c if k.startswith("keyq.tick.")}
    assert len(ticks) == 1, waits[:3]
    pushes = [c for c in seen if c[:2] == ["LPUSH", next(iter(ticks))]]
    assert len(pushes) >= 10, f"{len(pushes)} ticks in 1 s (every 50 ms asked)"
    assert len(waits) >= 10, f"{len(waits)} looks in 1 s"
