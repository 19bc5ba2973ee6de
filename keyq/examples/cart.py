"""A shopping cart: add and remove items, then checkout; after checkout adds are refused."""

from __future__ import annotations

from typing import Any

from keyq.entity import Entity, handler
from keyq.errors import Rejected


def _item_and_qty(payload: Any) -> tuple[str, int]:
    if not isinstance(payload, dict) or not isinstance(payload.get("item"), str):
        raise Rejected('payload must be {"item": "<name>", "qty": <int>}')
    qty = payload.get("qty", 1)
    if not isinstance(qty, int) or isinstance(qty, bool) or qty < 1:
        raise Rejected(f"qty must be a positive integer, got {qty!r}")
    return payload["item"], qty


class Cart(Entity):
    """States: open -> checked_out. Items map item name -> quantity."""

    name = "cart"
    initial_state = {"status": "open", "items": {}}

    @handler
    def add(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], dict[str, int]]:
        if state["status"] != "open":
            raise Rejected("cart is checked out: no more adds")
        item, qty = _item_and_qty(payload)
        items = dict(state["items"])
        items[item] = items.get(item, 0) + qty
        return {**state, "items": items}, items

    @handler
    def remove(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], dict[str, int]]:
        if state["status"] != "open":
            raise Rejected("cart is checked out: no more removes")
        item, qty = _item_and_qty(payload)
        items = dict(state["items"])
        if item not in items:
            raise Rejected(f"{item!r} is not in the cart")
        left = items[item] - qty
        if left > 0:
            items[item] = left
        else:
            del items[item]
        return {**state, "items": items}, items

    @handler
    def checkout(
        self, state: dict[str, Any], payload: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if state["status"] != "open":
            raise Rejected("cart is already checked out")
        if not state["items"]:
            raise Rejected("cannot check out an empty cart")
        total = sum(state["items"].values())
        return {**state, "status": "checked_out"}, {"items": state["items"], "count": total}
