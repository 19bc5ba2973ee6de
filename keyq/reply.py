"""Replies to `call`: JSON documents pushed on a per-message Redis list after the commit."""

from __future__ import annotations

import json
from typing import Any

from keyq.entity import JSON
from keyq.errors import (
    AlreadyAppliedError,
    HandlerCrashedError,
    HandlerError,
    MessageRefusedError,
    Rejected,
)

REPLY_TTL_MS = 300_000  # an unread reply expires after five minutes

# error kinds on the wire -> the exception the caller gets
_ERRORS: dict[str, type[HandlerError]] = {
    "rejected": Rejected,
    "crashed": HandlerCrashedError,
    "refused": MessageRefusedError,
    "duplicate": AlreadyAppliedError,
}

# the reply to a message applied before: a retried call learns that, instead of timing out
ALREADY_APPLIED = json.dumps(
    {
        "ok": False,
        "error": {
            "kind": "duplicate",
            "type": "AlreadyAppliedError",
            "message": "applied before, exactly once; its reply is no longer available",
        },
    },
    separators=(",", ":"),
)


def ok(value: JSON) -> dict[str, Any]:
    return {"ok": True, "reply": value}


def error(kind: str, exc_type: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"kind": kind, "type": exc_type, "message": message}}


def encode(reply: dict[str, Any]) -> str:
    return json.dumps(reply, separators=(",", ":"))


def decode(raw: bytes | str, *, entity: str, key: str, op: str, message_id: str) -> JSON:
    """The reply value, or raise the typed HandlerError the worker reported."""
    doc = json.loads(raw)
    if doc.get("ok"):
        return doc.get("reply")
    err = doc.get("error") or {}
    cls = _ERRORS.get(err.get("kind", ""), HandlerError)
    exc_type = str(err.get("type", ""))
    text = str(err.get("message", "unknown error"))
    prefix = f"{exc_type}: " if exc_type and cls is HandlerCrashedError else ""
    raise cls(
        f"{entity}/{key} {op}: {prefix}{text}",
        entity=entity,
        key=key,
        op=op,
        message_id=message_id,
        exc_type=exc_type,
    )
