"""A device twin: online while heartbeats arrive, marked offline by a timer after silence.

Each heartbeat (re)schedules the key's "liveness" timer; if no heartbeat comes before it is
due, the timer's fire applies `went_offline`. The timer lives in the Repo with the state, so a
device still goes offline when the worker that owned it crashed in between.
"""

from __future__ import annotations

from typing import Any

from keyq.context import current
from keyq.entity import Entity, handler
from keyq.errors import Rejected

OFFLINE_AFTER_S = 60.0  # silence after which a device counts as offline


class Device(Entity):
    name = "device"
    initial_state = {"status": "unknown", "beats": 0, "last_seen": None}

    @handler
    def heartbeat(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], str]:
        """Payload: optional {"offline_after_s": seconds}."""
        after = (payload or {}).get("offline_after_s", OFFLINE_AFTER_S)
        if not isinstance(after, int | float) or isinstance(after, bool) or after <= 0:
            raise Rejected(f"offline_after_s must be a positive number, got {after!r}")
        ctx = current()
        ctx.schedule(after, "went_offline", name="liveness")
        beats = int(state["beats"]) + 1
        return {"status": "online", "beats": beats, "last_seen": ctx.now}, "online"

    @handler
    def went_offline(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], str]:
        return {**state, "status": "offline"}, "offline"
