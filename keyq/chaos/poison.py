"""Raw garbage a broker can hold, pushed onto partition queues with redis-py directly, the way a
foreign producer or a damaged broker would put it there (no keyq or Celery code on the path).

Each message carries a marker, so the end of a run can tell whether any is still on the broker.
"""

from __future__ import annotations

import base64
import json
import uuid

import redis

from keyq.settings import Settings

MARKER = "keyq-chaos-poison"  # in every poison message; searched for on the broker at the end
DISPATCH_TASK = "keyq.dispatch"  # the task name keyq's workers consume (keyq.celery_app)
WAKE_SUFFIX = ":wake"  # the token list beside each queue that wakes an idle consumer


def _celery_message(queue: str, args: object, body_encoding: str = "base64") -> bytes:
    """A Celery protocol 2 message as kombu's Redis transport stores it in a queue list."""
    task_id = f"{MARKER}-{uuid.uuid4().hex}"
    body = json.dumps(
        [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": DISPATCH_TASK,
            "id": task_id,
            "root_id": task_id,
            "retries": 0,
            "origin": MARKER,
        },
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": body_encoding,
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(message).encode()


def poison_message(variant: str, settings: Settings, partition: int) -> bytes:
    """The raw bytes of one poison variant for a partition's queue."""
    queue = settings.queue_name(partition)
    if variant == "not_json":
        return b"\xff\xfe{" + MARKER.encode() + b" this is not JSON"
    if variant == "lone_surrogate":
        envelope = {
            "v": 1,
            "id": f"{MARKER}-{uuid.uuid4().hex}",
            "entity": "journal",
            "key": "\ud800",  # valid JSON (escaped), not encodable as UTF-8
            "op": "append",
            "payload": {"poison": MARKER},
            "partition": partition,
            "reply": False,
            "sent_at": 0.0,
        }
        return _celery_message(queue, [[envelope]])
    if variant == "unknown_encoding":
        return _celery_message(queue, [[{"poison": MARKER}]], body_encoding="rot13")
    raise ValueError(f"unknown poison variant {variant!r}")


def push_poison(client: redis.Redis, settings: Settings, variant: str, partition: int) -> None:
    """LPUSH the message onto the partition's queue and a token onto its wake list."""
    queue = settings.queue_name(partition)
    pipe = client.pipeline(transaction=False)
    pipe.lpush(queue, poison_message(variant, settings, partition))
    pipe.lpush(queue + WAKE_SUFFIX, "1")
    pipe.execute()
