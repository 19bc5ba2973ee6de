"""The keyq message envelope: what crosses the wire inside a Celery task, as JSON only.

Producers build envelopes with ``make_envelope`` (which validates everything and publishes
nothing on failure); workers re-check each one with ``parse_envelope``, because a message on the
broker may come from anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keyq.entity import JSON, RESERVED_OP_PREFIX, EntityRegistry
from keyq.errors import (
    InvalidKeyError,
    InvalidPayloadError,
    MalformedMessageError,
    PayloadTooLargeError,
    UnknownOperationError,
    ValidationError,
)
from keyq.routing import partition_for

if TYPE_CHECKING:
    from keyq.settings import Settings

ENVELOPE_VERSION = 1
MAX_MESSAGE_ID_LENGTH = 128  # the dead-letter table's message_id column
SYSTEM_OP_PREFIX = RESERVED_OP_PREFIX  # ops reserved for keyq; producers cannot send them
ACTIVATE_OP = "keyq.activate"  # reconciler -> worker: activate the key, run no handler
SYSTEM_OPS = frozenset({ACTIVATE_OP})


def is_system_op(op: str) -> bool:
    return op.startswith(SYSTEM_OP_PREFIX)


@dataclass(frozen=True, slots=True)
class TimerRef:
    """Marks a message as the fire of a key's timer (checked against the Repo's timer row)."""

    name: str
    timer_id: str
    due_ms: int

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.timer_id, "due_ms": self.due_ms}


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
    timer: TimerRef | None = None  # set on a timer's fire, published by the owning worker
    system: bool = False  # published by keyq itself (reconciler); op in SYSTEM_OPS

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
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
        if self.timer is not None:
            wire["timer"] = self.timer.to_wire()
        if self.system:
            wire["system"] = True
        return wire


def check_key(key: object, max_length: int) -> str:
    if not isinstance(key, str):
        raise InvalidKeyError(f"key must be a string, got {type(key).__name__}")
    if not key:
        raise InvalidKeyError("key must not be empty")
    if len(key) > max_length:
        raise InvalidKeyError(f"key is {len(key)} characters long; the limit is {max_length}")
    if "\x00" in key:
        raise InvalidKeyError("key must not contain NUL (\\x00) characters")
    if not _is_unicode_text(key):
        raise InvalidKeyError("key must be valid Unicode text (it holds a lone surrogate)")
    return key


def check_message_id(message_id: object) -> str:
    """A message id is stored with the key's state and in dead letters: bounded, no NUL."""
    if not isinstance(message_id, str) or not message_id:
        raise MalformedMessageError("message id must be a non-empty string")
    if len(message_id) > MAX_MESSAGE_ID_LENGTH or "\x00" in message_id:
        raise MalformedMessageError(
            f"message id must be at most {MAX_MESSAGE_ID_LENGTH} characters, without NUL"
        )
    return message_id


# a \u0000 escape in encoded JSON (preceded by an even number of backslashes)
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _is_unicode_text(text: str) -> bool:
    """False for a str holding lone surrogates ("\\ud800" is valid JSON but not text): no
    database, Redis key or hash can take it, so it is refused where it enters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def has_nul(encoded_json: str) -> bool:
    """Whether JSON text holds a NUL character, which PostgreSQL (text and JSONB) cannot store."""
    return "\\u0000" in encoded_json and _JSON_NUL.search(encoded_json) is not None


# json.dumps(payload, allow_nan=False, separators=(",", ":")), without building an encoder per call
STRICT_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def check_payload(payload: object, max_bytes: int) -> int:
    """Refuse what is not plain JSON or too large; return the encoded size."""
    try:
        encoded = STRICT_JSON.encode(payload)
    except (TypeError, ValueError) as e:
        raise InvalidPayloadError(f"payload is not JSON: {e}") from e
    if has_nul(encoded):
        raise InvalidPayloadError("payload must not contain NUL (\\u0000) characters")
    if "\\ud" in encoded and not _is_unicode_text(json.dumps(payload, ensure_ascii=False)):
        raise InvalidPayloadError("payload must be valid Unicode text (it holds a lone surrogate)")
    size = len(encoded.encode("utf-8"))
    if size > max_bytes:
        raise PayloadTooLargeError(
            f"payload is {size} bytes encoded; the limit is {max_bytes} (KEYQ_MAX_PAYLOAD_BYTES)"
        )
    return size


RANDOM_POOL_BYTES = 4096  # read from the OS at once for ids: one system call per 256 ids


class _RandomIds(threading.local):
    """This thread's next random ids, cut from one read of the OS's random source."""

    def __init__(self) -> None:
        self.ids: Iterator[str] = iter(())


_random_ids = _RandomIds()


def _forget_random_ids() -> None:
    _random_ids.ids = iter(())  # a forked child must never hand out its parent's next ids


os.register_at_fork(after_in_child=_forget_random_ids)


def random_id() -> str:
    """32 lowercase hex digits of 128 random bits from the OS (uuid4().hex's format with more
    randomness), without a system call and a UUID object per id. Each id is taken with one
    next() of an iterator, so even a signal handler that sends in between gets another."""
    found = next(_random_ids.ids, None)
    if found is None:
        digits = os.urandom(RANDOM_POOL_BYTES).hex()
        _random_ids.ids = iter([digits[i : i + 32] for i in range(0, len(digits), 32)])
        found = next(_random_ids.ids)
    return found


def new_message_id() -> str:
    return random_id()


MAX_IDEMPOTENCY_KEY_LENGTH = 256  # a caller's idempotency key (an HTTP request id, an order id)


def idempotent_message_id(entity: str, key: str, idempotency_key: str) -> str:
    """The message id of a send with a caller's idempotency key: the same (entity, key, K)
    always gives the same id, so the worker's per-key dedupe window applies it once.

    32 hex digits like a random id (BLAKE2b, 16 bytes); the parts are JSON-encoded together,
    so no two different triples can run into each other ("a", "b|c" vs "a|b", "c")."""
    if not isinstance(idempotency_key, str) or not idempotency_key:
        raise ValidationError("idempotency_key must be a non-empty string")
    if len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise ValidationError(
            f"idempotency_key is {len(idempotency_key)} characters; the limit is "
            f"{MAX_IDEMPOTENCY_KEY_LENGTH}"
        )
    if not _is_unicode_text(idempotency_key):
        raise ValidationError("idempotency_key must be valid Unicode text")
    material = json.dumps(["keyq-idempotency-v1", entity, key, idempotency_key])
    return hashlib.blake2b(material.encode("utf-8"), digest_size=16).hexdigest()


def producer_envelope(
    registry: EntityRegistry,
    settings: Settings,
    entity: str,
    key: str,
    op: str,
    payload: JSON = None,
    **options: Any,
) -> Envelope:
    """make_envelope with the deployment's limits (what every producer builds: the Client,
    the AsyncClient, the test harness)."""
    return make_envelope(
        registry,
        entity,
        key,
        op,
        payload,
        partitions=settings.partitions,
        max_key_length=settings.max_key_length,
        max_payload_bytes=settings.max_payload_bytes,
        **options,
    )


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
    idempotency_key: str | None = None,
) -> Envelope:
    """Validate a producer's message and build its envelope (nothing is published here).

    A typed op's payload is validated against its model and sent in canonical JSON form.
    With ``idempotency_key`` the message id is derived from (entity, key, idempotency_key),
    so sending the same request again is applied once within the key's dedupe window."""
    if not isinstance(entity, str):
        raise MalformedMessageError(f"entity must be a string, got {type(entity).__name__}")
    entity_type = registry.get(entity)
    if isinstance(op, str) and is_system_op(op):
        raise UnknownOperationError(
            f"entity {entity!r} has no operation {op!r}: ops starting with "
            f"{SYSTEM_OP_PREFIX!r} are reserved for keyq's internal messages"
        )
    entity_type.handler_for(op)
    check_key(key, max_key_length)
    payload = entity_type.prepare_payload(op, payload)
    check_payload(payload, max_payload_bytes)
    if idempotency_key is not None:
        if message_id is not None:
            raise ValidationError("give a message_id or an idempotency_key, not both")
        message_id = idempotent_message_id(entity, key, idempotency_key)
    return Envelope(
        id=new_message_id() if message_id is None else check_message_id(message_id),
        entity=entity,
        key=key,
        op=op,
        payload=payload,
        partition=partition_for(key, partitions),
        reply=reply,
        sent_at=time.time(),
    )


def make_system_envelope(entity: str, key: str, op: str, *, partitions: int) -> Envelope:
    """An internal message (e.g. the reconciler's keyq.activate); never from producer input."""
    if op not in SYSTEM_OPS:
        raise MalformedMessageError(f"{op!r} is not a keyq system operation")
    return Envelope(
        id=new_message_id(),
        entity=entity,
        key=key,
        op=op,
        payload=None,
        partition=partition_for(key, partitions),
        reply=False,
        sent_at=time.time(),
        system=True,
    )


def parse_envelope(raw: object, *, partitions: int, max_key_length: int) -> Envelope:
    """Re-check a wire envelope in the worker; MalformedMessageError names what is wrong."""
    if not isinstance(raw, dict):
        raise MalformedMessageError(f"envelope must be a JSON object, got {type(raw).__name__}")
    if set(raw) == {"error"} and isinstance(raw["error"], str):
        # worker.decode_task_message's stand-in for a broker message it refused to decode
        raise MalformedMessageError(raw["error"])
    missing = [f for f in ("id", "entity", "key", "op", "partition") if f not in raw]
    if missing:
        raise MalformedMessageError(f"envelope lacks field(s): {', '.join(missing)}")
    if raw.get("v", ENVELOPE_VERSION) != ENVELOPE_VERSION:
        raise MalformedMessageError(f"envelope version {raw.get('v')!r} is not supported")
    msg_id, entity, op = raw["id"], raw["entity"], raw["op"]
    for field_name, value in (("id", msg_id), ("entity", entity), ("op", op)):
        if not isinstance(value, str) or not value:
            raise MalformedMessageError(f"envelope field {field_name!r} must be a non-empty string")
    check_message_id(msg_id)
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
    system = raw.get("system", False) is True
    if is_system_op(op) != system or (system and op not in SYSTEM_OPS):
        raise MalformedMessageError(
            f"envelope op {op!r} with system={system}: ops starting with {SYSTEM_OP_PREFIX!r} "
            "come only from keyq itself, and only known ones"
        )
    payload = raw.get("payload")
    try:
        encoded = STRICT_JSON.encode(payload)
    except (TypeError, ValueError) as e:
        raise MalformedMessageError(f"envelope payload is not JSON: {e}") from e
    if has_nul(encoded):
        raise MalformedMessageError("envelope payload holds a NUL (\\u0000) character")
    if "\\ud" in encoded and not _is_unicode_text(json.dumps(payload, ensure_ascii=False)):
        raise MalformedMessageError("envelope payload holds a lone surrogate")
    for field_name in ("id", "entity", "op"):
        if not _is_unicode_text(raw[field_name]):
            raise MalformedMessageError(f"envelope field {field_name!r} holds a lone surrogate")
    sent_at = raw.get("sent_at", 0.0)
    return Envelope(
        id=msg_id,
        entity=entity,
        key=key,
        op=op,
        payload=payload,
        partition=partition,
        reply=bool(raw.get("reply", False)),
        sent_at=float(sent_at) if isinstance(sent_at, int | float) else 0.0,
        timer=_parse_timer_ref(raw.get("timer")),
        system=system,
    )


def _parse_timer_ref(raw: object) -> TimerRef | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise MalformedMessageError("envelope field 'timer' must be an object")
    name, timer_id, due_ms = raw.get("name"), raw.get("id"), raw.get("due_ms")
    if not (isinstance(name, str) and isinstance(timer_id, str) and isinstance(due_ms, int)):
        raise MalformedMessageError("envelope field 'timer' needs name, id and due_ms")
    return TimerRef(name, timer_id, due_ms)
