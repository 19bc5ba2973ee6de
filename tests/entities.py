"""Entities used by the tests (loaded by workers through KEYQ_ENTITY_MODULES)."""

from __future__ import annotations

import os
from typing import Any

from keyq.entity import Entity, handler


class Sequence(Entity):
    """Records every payload it sees, in order: the witness of per-key order and once-only."""

    name = "sequence"
    initial_state: dict[str, Any] = {"seen": []}

    @handler
    def see(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        seen = [*state["seen"], payload]
        return {"seen": seen}, len(seen)


class Witness(Entity):
    """Records which worker process applied each message (pid), to check single activation."""

    name = "witness"
    initial_state: dict[str, Any] = {"log": []}

    @handler
    def see(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        log = [*state["log"], [payload, os.getpid()]]
        return {"log": log}, len(log)


class Flaky(Entity):
    """Fails on purpose: `boom` always raises, `mutate_then_boom` corrupts state then raises."""

    name = "flaky"
    initial_state: dict[str, Any] = {"n": 0, "junk": []}
    max_restarts = 2
    within_seconds = 5.0

    @handler
    def inc(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        return {**state, "n": state["n"] + 1}, state["n"] + 1

    @handler
    def boom(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        raise ValueError(f"boom {payload}")

    @handler
    def mutate_then_boom(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        state["junk"].append("corrupt")
        state["n"] = -999
        raise RuntimeError("mutated then crashed")

    @handler
    def bad_state(self, state: dict[str, Any], payload: Any) -> tuple[Any, int]:
        return {"not json": {1, 2}}, 0


class Slow(Entity):
    """Records [payload, pid] like the witness; a payload {"mark": path, "seconds": s} makes the
    first process that applies it write the mark file and then sleep inside the handler, before
    its commit, so a test can stop (SIGSTOP) or kill it there: a deterministic pending write."""

    name = "slow"
    initial_state: dict[str, Any] = {"log": []}

    @handler
    def see(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        if isinstance(payload, dict) and payload.get("mark"):
            import pathlib
            import time

            mark = pathlib.Path(str(payload["mark"]))
            if not mark.exists():
                mark.write_text(str(os.getpid()))
                time.sleep(float(payload.get("seconds", 1.0)))
        log = [*state["log"], [payload, os.getpid()]]
        return {"log": log}, len(log)


class Beacon(Entity):
    """Always on: the reconciler keeps each of its keys activated somewhere (a device twin)."""

    name = "beacon"
    initial_state: dict[str, Any] = {"pings": 0}
    always_on = True

    @handler
    def ping(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        return {"pings": state["pings"] + 1}, state["pings"] + 1


class Pill(Entity):
    """A poison pill: `see` appends like the sequence, but the payload "die" ends the process
    that applies it (os._exit), wherever it is delivered."""

    name = "pill"
    initial_state: dict[str, Any] = {"seen": []}

    @handler
    def see(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        if payload == "die":
            os._exit(3)
        seen = [*state["seen"], payload]
        return {"seen": seen}, len(seen)


class Spinner(Entity):
    """`see` appends, but the payload "spin" loops forever: the handler time limit must stop it."""

    name = "spinner"
    initial_state: dict[str, Any] = {"seen": []}
    max_handler_seconds = 2.0

    @handler
    def see(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        while payload == "spin":
            pass
        seen = [*state["seen"], payload]
        return {"seen": seen}, len(seen)

    @handler
    def stuck(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        """Spins with SIGALRM ignored: out of the time limit's reach, as native code would be."""
        import signal

        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        while True:
            pass


class Sluggish(Entity):
    """Appends like the sequence, 50 ms per message: a partition that drains slowly."""

    name = "sluggish"
    initial_state: dict[str, Any] = {"seen": []}

    @handler
    def see(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        import time

        time.sleep(0.05)
        seen = [*state["seen"], payload]
        return {"seen": seen}, len(seen)
