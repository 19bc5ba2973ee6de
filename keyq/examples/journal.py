"""A journal per key: op `append` adds any JSON payload to `items`; the reply is the length."""

from __future__ import annotations

from typing import Any

from keyq.entity import Entity, handler


class Journal(Entity):
    name = "journal"
    initial_state = {"items": []}

    @handler
    def append(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        items = [*state["items"], payload]
        return {"items": items}, len(items)
