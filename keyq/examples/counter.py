"""A counter per key: op `add` with {"by": n}; the reply is the new value."""

from __future__ import annotations

from typing import Any

from keyq.entity import Entity, handler
from keyq.errors import Rejected


class Counter(Entity):
    name = "counter"
    initial_state = {"value": 0}

    @handler
    def add(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        by = 1 if payload is None else (payload or {}).get("by", 1)
        if not isinstance(by, int) or isinstance(by, bool):
            raise Rejected(f"'by' must be an integer, got {by!r}")
        value = int(state["value"]) + by
        return {"value": value}, value

    @handler
    def get(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        return state, int(state["value"])
