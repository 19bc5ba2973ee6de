"""The broker message of a keyq.dispatch task, as bytes, built without a broker connection.

keyq.aio publishes with redis-py's asyncio API, so it cannot go through kombu's (blocking)
producer; what it writes must still be what ``Client.publish`` writes through Celery's
``send_task`` and keyq's transport (``keyq.transport.Channel._put``), because the worker's fetch
script, the mailbox's decoder and the poison checks read exactly that. So the task headers and
body come from Celery's own ``app.amqp.as_task_v2`` (protocol 2), and the envelope around them
is kombu's virtual-transport message: base64 body, ``delivery_info`` naming the queue, a fresh
``delivery_tag``. docs/wire.md describes the result for other languages.
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any

from kombu.utils.json import dumps as _kombu_dumps

from keyq.celery_app import DISPATCH_TASK
from keyq.envelope import Envelope
from keyq.transport import wake_key


def dumps(value: Any) -> str:
    """kombu's JSON encoder (what its producer uses for the body and the Redis message)."""
    encoded: str = _kombu_dumps(value)  # type: ignore[no-untyped-call]
    return encoded


def task_message(
    app: Any, envelopes: Sequence[Envelope], queue: str, task_id: str | None = None
) -> dict[str, Any]:
    """kombu's Redis message (a JSON object) of one keyq.dispatch task carrying envelopes."""
    task_id = task_id or str(uuid.uuid4())
    args = [[e.to_wire() for e in envelopes]]
    headers, properties, body, _event = app.amqp.as_task_v2(
        task_id,
        DISPATCH_TASK,
        args=args,
        kwargs={},
        origin=f"gen{os.getpid()}@{socket.gethostname()}",
        ignore_result=None,  # what send_task passes when the caller gives none
    )
    encoded = dumps(body).encode("utf-8")
    return {
        "body": base64.b64encode(encoded).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            **properties,
            "correlation_id": task_id,
            "reply_to": str(properties.get("reply_to") or app.thread_oid),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def push_commands(queue: str, message: dict[str, Any]) -> list[tuple[str, ...]]:
    """The Redis commands that publish a message as keyq's transport does: the message at the
    queue's left end (workers pop from the right), then a wake token for idle consumers."""
    wake = wake_key(queue)
    return [
        ("LPUSH", queue, dumps(message)),
        ("LPUSH", wake, "1"),
        ("LTRIM", wake, "0", "0"),
    ]
