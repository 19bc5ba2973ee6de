"""Entities for the supervisor, passivation, dead-letter and timer tests (loaded by workers)."""

from __future__ import annotations

import os
from typing import Any

from keyq.context import current
from keyq.entity import Entity, handler

LIFECYCLE_LOG = "KEYQ_TEST_LIFECYCLE_LOG"  # a file the worker appends hook calls to

_attempts: dict[tuple[str, Any], int] = {}  # process-local: failures so far per (key, payload)


def _note(line: str) -> None:
    path = os.environ.get(LIFECYCLE_LOG)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class Lifecycle(Entity):
    """Counts its activations in its state and logs its hooks to a file."""

    name = "lifecycle"
    initial_state: dict[str, Any] = {"activations": 0}

    def on_activate(self, state: Any) -> Any:
        _note(f"activate {os.getpid()}")
        return {**state, "activations": state["activations"] + 1}

    def on_passivate(self, state: Any) -> None:
        _note(f"passivate {state.get('key')}")

    @handler
    def touch(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], Any]:
        new = {**state, "key": current().key}
        return new, new


class Transient(Entity):
    """`see` fails the first `fail` tries of a payload, then records it: retries keep order."""

    name = "transient"
    initial_state: dict[str, Any] = {"seen": []}
    max_restarts = 5
    within_seconds = 30.0

    @handler
    def see(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        value, fail = payload["value"], payload.get("fail", 0)
        tries = _attempts.get((current().key, value), 0)
        if tries < fail:
            _attempts[(current().key, value)] = tries + 1
            state["seen"].append("corrupt")  # mutated before raising: must not survive
            raise ConnectionError(f"transient failure {tries + 1} of {fail} for {value}")
        seen = [*state["seen"], value]
        return {"seen": seen}, len(seen)


class Guarded(Entity):
    """`charge` crashes until `enable` ran: a dead letter that a replay can later apply."""

    name = "guarded"
    initial_state: dict[str, Any] = {"enabled": False, "charges": []}
    max_restarts = 1

    @handler
    def enable(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], bool]:
        return {**state, "enabled": True}, True

    @handler
    def charge(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        if not state["enabled"]:
            raise RuntimeError("charging is not enabled")
        charges = [*state["charges"], payload]
        return {**state, "charges": charges}, len(charges)


class Ticker(Entity):
    """Timers: one-shot and periodic `tick`s, a cancel, and a timer whose handler crashes."""

    name = "ticker"
    initial_state: dict[str, Any] = {"ticks": 0, "missed": [], "fired": []}
    max_restarts = 1

    @handler
    def once(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], None]:
        current().schedule(payload["delay_s"], "tick", {"kind": "once"}, name="t")
        return state, None

    @handler
    def every(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], None]:
        current().schedule(
            payload.get("delay_s", payload["every_s"]),
            "tick",
            {"kind": "every"},
            name="t",
            every_s=payload["every_s"],
            catch_up=payload.get("catch_up", "coalesce"),
        )
        return state, None

    @handler
    def stop(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], None]:
        current().cancel("t")
        return state, None

    @handler
    def tick(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        fire = current().timer
        missed = [*state["missed"], fire.missed if fire else None]
        fired = [*state["fired"], current().message_id]
        return {**state, "ticks": state["ticks"] + 1, "missed": missed, "fired": fired}, 0

    @handler
    def bomb(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], None]:
        current().schedule(payload["delay_s"], "explode", name="bomb")
        return state, None

    @handler
    def explode(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], None]:
        raise RuntimeError("the timer's handler always fails")

    @handler
    def schedule_then_crash(self, state: dict[str, Any], payload: Any) -> tuple[Any, None]:
        current().schedule(0.05, "tick", name="ghost")
        raise RuntimeError("crashed after scheduling: the timer must not exist")


class Recovering(Entity):
    """`until` crashes while the wall clock is before payload["until"] (a dependency that is
    down for a while): the key restarts after a fixed 0.3 s backoff until it passes; `see`
    appends its payload."""

    name = "recovering"
    initial_state: dict[str, Any] = {"seen": []}
    max_restarts = 100
    within_seconds = 60.0
    backoff_min_s = 0.3
    backoff_max_s = 0.3

    @handler
    def until(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], Any]:
        import time

        if time.time() < float(payload["until"]):
            raise ConnectionError("the dependency is still down")
        return {"seen": [*state["seen"], "recovered"]}, "recovered"

    @handler
    def see(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], Any]:
        return {"seen": [*state["seen"], payload]}, payload
