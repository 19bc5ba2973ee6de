"""Property: whatever raw messages land on the partition queues of a running worker (valid,
mutated or garbage), the worker never exits, a journal load sent beside them is applied exactly
once and in order, and every foreign message is accounted for: applied once or dead-lettered."""

from __future__ import annotations

import base64
import json
import time
import uuid
import zlib
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyq.celery_app import DISPATCH_TASK
from keyq.client import Client
from keyq.mailbox import MAX_ENVELOPES_PER_MESSAGE, backlog
from keyq.repo import Repo
from keyq.routing import partition_for
from keyq.settings import Settings
from keyq.transport import wake_key
from tests.conftest import WorkerFactory, poll
from tests.ownership_helpers import database_url  # noqa: F401  (PostgreSQL only)

pytestmark = pytest.mark.integration

VALID_KEYS = [f"v{i}" for i in range(12)]
FOREIGN_KEYS = [f"fk{i}" for i in range(6)]

ENVELOPE_MUTATIONS: dict[str, Any] = {
    "none": lambda e: e,
    "surrogate_key": lambda e: {**e, "key": e["key"] + "\ud800"},
    "int_key": lambda e: {**e, "key": 7},
    "no_key": lambda e: {k: v for k, v in e.items() if k != "key"},
    "wrong_partition": lambda e: {**e, "partition": (e["partition"] + 1) % 8},
    "string_partition": lambda e: {**e, "partition": "3"},
    "unknown_entity": lambda e: {**e, "entity": "nobody"},
    "unknown_op": lambda e: {**e, "op": "explode"},
    "crashing_handler": lambda e: {**e, "entity": "flaky", "op": "boom"},  # always raises
    "surrogate_payload": lambda e: {**e, "payload": {"f": e["payload"]["f"], "x": "\udfff"}},
    "nul_payload": lambda e: {**e, "payload": {"f": e["payload"]["f"], "x": "a\x00"}},
    "bad_id": lambda e: {**e, "id": 12},
    "system_op": lambda e: {**e, "op": "keyq.activate"},
    "not_object": lambda e: [e],
}


def _doc(body: bytes, queue: str, **extra_headers: Any) -> dict[str, Any]:
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": DISPATCH_TASK, "id": uuid.uuid4().hex, **extra_headers},
        "properties": {
            "delivery_tag": str(uuid.uuid4()),
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": queue},
        },
    }


MESSAGE_MUTATIONS: dict[str, Any] = {
    "none": lambda d: json.dumps(d).encode(),
    "garbage": lambda d: b"\x00\xffnot json{",
    "json_array": lambda d: b"[1, 2, 3]",
    "unknown_encoding": lambda d: json.dumps(
        {**d, "properties": {**d["properties"], "body_encoding": "base85"}}
    ).encode(),
    "bogus_compression": lambda d: json.dumps(
        {**d, "headers": {**d["headers"], "compression": "application/x-zip"}}
    ).encode(),
    "pickle": lambda d: json.dumps(
        {**d, "content-type": "application/x-python-serialize"}
    ).encode(),
    "unknown_task": lambda d: json.dumps(
        {**d, "headers": {**d["headers"], "task": "x.y"}}
    ).encode(),
    "no_tag": lambda d: json.dumps({**d, "properties": {}}).encode(),
    "bad_base64": lambda d: json.dumps({**d, "body": "@@@"}).encode(),
    "zlib": lambda d: json.dumps(
        {
            **d,
            "body": base64.b64encode(zlib.compress(base64.b64decode(d["body"]))).decode(),
            "headers": {**d["headers"], "compression": "application/x-gzip"},
        }
    ).encode(),
}

foreign = st.tuples(
    st.sampled_from(FOREIGN_KEYS),
    st.sampled_from(sorted(ENVELOPE_MUTATIONS)),
    st.sampled_from(sorted(MESSAGE_MUTATIONS)),
    st.booleans(),  # oversize: more envelopes than one message may hold
)


def journal(repo: Repo, key: str) -> list[Any]:
    stored = repo.load_one("journal", key)
    return [] if stored is None else list(stored.state["items"])


@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(messages=st.lists(foreign, min_size=5, max_size=25))
def test_raw_broker_messages_never_stop_the_worker_and_are_all_accounted_for(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    repo: Repo,
    redis_client: redis.Redis,
    messages: list[tuple[str, str, str, bool]],
) -> None:
    s = settings
    # one worker for every example (the fixtures live as long as the test function)
    worker = getattr(start_worker, "keyq_worker", None)
    if worker is None:
        worker = start_worker()
        start_worker.keyq_worker = worker  # type: ignore[attr-defined]
    run = uuid.uuid4().hex[:8]
    dead_before = len(repo.dead_letters(limit=100_000))
    before = {k: journal(repo, k) for k in VALID_KEYS}
    for i, (key, env_mut, msg_mut, oversize) in enumerate(messages):
        marker = f"{run}-{i}"
        wire = client.envelope("journal", key, "append", {"f": marker}).to_wire()
        envelope = ENVELOPE_MUTATIONS[env_mut](wire)
        envelopes = [envelope] * (MAX_ENVELOPES_PER_MESSAGE + 1) if oversize else [envelope]
        queue = s.queue_name(partition_for(key, s.partitions))
        body = json.dumps([[envelopes], {}, {}]).encode()
        redis_client.lpush(queue, MESSAGE_MUTATIONS[msg_mut](_doc(body, queue)))
        redis_client.lpush(wake_key(queue), 1)
        client.send_many("journal", [(k, "append", f"{run}:{i}") for k in VALID_KEYS])
    poll(lambda: backlog(redis_client, s).total == 0, timeout=60, what="everything settled")
    time.sleep(0.3)  # the last batch's commit is visible before its in-flight list is cleared
    assert worker.proc.poll() is None, worker.log()[-3000:]
    for k in VALID_KEYS:
        assert journal(repo, k) == before[k] + [f"{run}:{i}" for i in range(len(messages))]
    applied = [
        item
        for k in FOREIGN_KEYS
        for item in journal(repo, k)
        if isinstance(item, dict) and str(item.get("f", "")).startswith(run)
    ]
    assert len({a["f"] for a in applied}) == len(applied), "a foreign message applied twice"
    dead_now = len(repo.dead_letters(limit=100_000))
    assert len(applied) + (dead_now - dead_before) == len(messages), (applied, messages)
