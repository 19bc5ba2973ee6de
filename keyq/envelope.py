"""The keyq message envelope: what crosses the wire inside a Celery task, as JSON only.

Producers build envelopes with ``make_envelope`` (which validates everything and publishes
nothing on failure); workers re-check each one with ``parse_envelope``, because a message on the
broker may come from anywhere.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from keyq.entity import JSON, EntityRegistry
from keyq.errors import (
    InvalidKeyError,
    InvalidPayloadError,
    MalformedMessageError,
    PayloadTooLargeError,
)
from keyq.routing import partition_for

ENVELOPE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Envelope:
    """One keyq message for one key."""

    id: str
    entity: str
    key: str
    op: str
    payload: JSON
    partition: int
    reply: bool  # a caller waits for the reply on Redis
    sent_at: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": ENVELOPE_VERSION,
            "id": self.id,
            "entity": self.entity,
            "key": self.key,
            "op": self.op,
            "payload": self.payload,
            "partition": self.partition,
            "reply": self.reply,
            "sent_at": self.sent_at,
        }


def check_key(key: object, max_length: int) -> str:
    if not isinstance(key, str):
        raise InvalidKeyError(f"key must be a string, got {type(key).__name__}")
    if not key:
        raise InvalidKeyError("key must not be empty")
    if len(key) > max_length:
        raise InvalidKeyError(f"key is {len(key)} characters long; the limit is {max_length}")
    return key


def check_payload(payload: object, max_bytes: int) -> int:
    """Refuse what is not plain JSON or too large; return the encoded size."""
    try:
        encoded = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise InvalidPayloadError(f"payload is not JSON: {e}") from e
    size = len(encoded.encode("utf-8"))
    if size > max_bytes:
        raise PayloadTooLargeError(
            f"payload is {size} bytes encoded; the limit is {max_bytes} (KEYQ_MAX_PAYLOAD_BYTES)"
        )
    return size


def new_message_id() -> str:
    return uuid.uuid4().hex


def make_envelope(
    registry: EntityRegistry,
    entity: str,
    key: str,
    op: str,
    payload: JSON,
    *,
    partitions: int,
    max_key_length: int,
    max_payload_bytes: int,
    reply: bool = False,
    message_id: str | None = None,
) -> Envelope:
    """Validate a producer's message and build its envelope (nothing is published here)."""
    if not isinstance(entity, str):
        raise MalformedMessageError(f"entity must be a string, got {type(entity).__name__}")
    registry.get(entity).handler_for(op)
    check_key(key, max_key_length)
    check_payload(payload, max_payload_bytes)
    return Envelope(
        id=message_id or new_message_id(),
        entity=entity,
        key=key,
        op=op,
        payload=payload,
        partition=partition_for(key, partitions),
        reply=reply,
        sent_at=time.time(),
    )


def parse_envelope(raw: object, *, partitions: int, max_key_length: int) -> Envelope:
    """Re-check a wire envelope in the worker; MalformedMessageError names what is wrong."""
    if not isinstance(raw, dict):
        raise MalformedMessageError(f"envelope must be a JSON object, got {type(raw).__name__}")
    missing = [f for f in ("id", "entity", "key", "op", "partition") if f not in raw]
    if missing:
        raise MalformedMessageError(f"envelope lacks field(s): {', '.join(missing)}")
    if raw.get("v", ENVELOPE_VERSION) != ENVELOPE_VERSION:
        raise MalformedMessageError(f"envelope version {raw.get('v')!r} is not supported")
    msg_id, entity, op = raw["id"], raw["entity"], raw["op"]
    for field_name, value in (("id", msg_id), ("entity", entity), ("op", op)):
        if not isinstance(value, str) or not value:
            raise MalformedMessageError(f"envelope field {field_name!r} must be a non-empty string")
    try:
        key = check_key(raw["key"], max_key_length)
    except InvalidKeyError as e:
        raise MalformedMessageError(f"envelope key: {e}") from e
    partition = raw["partition"]
    if not isinstance(partition, int) or partition != partition_for(key, partitions):
        raise MalformedMessageError(
            f"envelope partition {partition!r} does not match the key's partition "
            f"{partition_for(key, partitions)} (is KEYQ_PARTITIONS the same everywhere?)"
        )
    sent_at = raw.get("sent_at", 0.0)
    return Envelope(
        id=msg_id,
        entity=entity,
        key=key,
        op=op,
        payload=raw.get("payload"),
        partition=partition,
        reply=bool(raw.get("reply", False)),
        sent_at=float(sent_at) if isinstance(sent_at, int | float) else 0.0,
    )
