"""keyq.testing: real entities through the worker's own apply step, in memory, on a fake clock,
with injected faults; and the same scenario through real workers ends in the same states."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import pytest

from keyq import Entity, Reject, handler
from keyq.client import Client
from keyq.context import current
from keyq.errors import (
    AlreadyAppliedError,
    HandlerCrashedError,
    HandlerError,
    Rejected,
    StaleWriteError,
)
from keyq.settings import Settings
from keyq.testing import Harness
from tests.conftest import WorkerFactory


class Wallet(Entity):
    """The README's Wallet, as a user writes it."""

    name = "wallet"
    initial_state: ClassVar[dict[str, int]] = {"balance": 0}
    max_restarts, within_seconds = 3, 5

    @handler
    def deposit(self, state: dict[str, int], payload: dict[str, int]) -> tuple[Any, int]:
        balance = state["balance"] + payload["amount"]
        return {"balance": balance}, balance

    @handler("withdraw")
    def withdraw(self, state: dict[str, int], payload: dict[str, int]) -> tuple[Any, int]:
        if payload["amount"] > state["balance"]:
            raise Reject("insufficient funds")
        balance = state["balance"] - payload["amount"]
        return {"balance": balance}, balance


class Log(Entity):
    """Appends payloads: the witness of order and once-only."""

    name = "h-log"
    initial_state: ClassVar[dict[str, list[Any]]] = {"seen": []}

    @handler
    def see(self, state: dict[str, Any], payload: Any) -> tuple[Any, int]:
        seen = [*state["seen"], payload]
        return {"seen": seen}, len(seen)

    @handler
    def boom(self, state: dict[str, Any], payload: Any) -> tuple[Any, int]:
        state["seen"].append("corrupted before the crash")
        raise ValueError(f"boom {payload}")


class Beacon(Entity):
    """Timers: `arm` schedules a one-shot or periodic `tick` with a catch-up policy."""

    name = "h-beacon"
    initial_state: ClassVar[dict[str, Any]] = {"ticks": [], "status": "idle"}

    @handler
    def arm(self, state: dict[str, Any], payload: dict[str, Any]) -> tuple[Any, None]:
        current().schedule(
            payload["delay"],
            "tick",
            name="t",
            every_s=payload.get("every"),
            catch_up=payload.get("catch_up", "coalesce"),
        )
        return {**state, "status": "armed"}, None

    @handler
    def tick(self, state: dict[str, Any], payload: Any) -> tuple[Any, None]:
        fire = current().timer
        missed = fire.missed if fire is not None else -1
        return {**state, "ticks": [*state["ticks"], [round(current().now), missed]]}, None


class Hooked(Entity):
    """Counts activations in its state; records passivations in a class list."""

    name = "h-hooked"
    initial_state: ClassVar[dict[str, int]] = {"activations": 0, "n": 0}
    passivations: ClassVar[list[dict[str, int]]] = []

    def on_activate(self, state: Any) -> Any:
        return {**state, "activations": state["activations"] + 1}

    def on_passivate(self, state: Any) -> None:
        Hooked.passivations.append(state)

    @handler
    def inc(self, state: dict[str, int], payload: Any) -> tuple[Any, dict[str, int]]:
        new = {**state, "n": state["n"] + 1}
        return new, new


def test_the_readme_wallet_is_tested_in_milliseconds(keyq_harness: Any) -> None:
    started = time.perf_counter()
    h = keyq_harness(Wallet)
    assert h.call("wallet", "alice", "deposit", {"amount": 10}) == 10
    assert h.call("wallet", "alice", "withdraw", {"amount": 3}) == 7
    with pytest.raises(Rejected, match="insufficient funds"):
        h.call("wallet", "alice", "withdraw", {"amount": 100})
    assert h.state("wallet", "alice") == {"balance": 7}
    assert h.state("wallet", "bob") is None
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"the harness took {elapsed:.3f}s"


def test_messages_of_a_key_apply_in_send_order_and_keys_stay_apart() -> None:
    h = Harness(Log)
    for i in range(60):
        h.send("h-log", f"k{i % 3}", "see", i)
    h.run()
    for k in range(3):
        assert h.state("h-log", f"k{k}") == {"seen": list(range(k, 60, 3))}
    assert h.stats.applied == 60
    assert h.version("h-log", "k0") == 20


def test_a_duplicate_delivery_is_applied_once() -> None:
    h = Harness(Log)
    first = h.send("h-log", "a", "see", 1)
    h.run()
    h.duplicate(first)
    h.send("h-log", "a", "see", 2)
    h.duplicate(first)  # even behind a newer message
    h.run()
    assert h.state("h-log", "a") == {"seen": [1, 2]}
    assert h.stats.duplicates == 2


def test_a_crash_restarts_from_the_repo_then_dead_letters_past_the_intensity() -> None:
    h = Harness(Log, settings=Settings(partitions=8, max_restarts=2, restart_window_s=60))
    h.call("h-log", "a", "see", "before")
    with pytest.raises(HandlerCrashedError, match="boom 1"):
        h.call("h-log", "a", "boom", 1)
    assert h.call("h-log", "a", "see", "after") == 2  # the key's next messages go on
    assert h.state("h-log", "a") == {"seen": ["before", "after"]}  # no half-made state
    assert [d.reason for d in h.dead_letters] == ["crashed"]
    assert h.dead_letters[0].error_type == "ValueError"
    assert h.stats.restarts == 2
    assert len(h.clock.slept) == 2  # backoffs ran on the fake clock


def test_a_one_shot_timer_fires_when_its_time_comes() -> None:
    h = Harness(Beacon)
    h.call("h-beacon", "d", "arm", {"delay": 60})
    assert h.advance(59) == 0
    assert h.state("h-beacon", "d")["ticks"] == []
    assert h.advance(2) == 1
    assert h.state("h-beacon", "d")["ticks"] == [[round(h.clock.now - 1), 0]]
    assert h.timers("h-beacon", "d") == {}


@pytest.mark.parametrize(
    ("catch_up", "fires", "missed"),
    [("coalesce", 1, [2]), ("skip", 0, []), ("each", 3, [2, 1, 0])],
)
def test_periodic_timers_catch_up_by_their_policy_after_downtime(
    catch_up: str, fires: int, missed: list[int]
) -> None:
    h = Harness(Beacon)
    h.call("h-beacon", "d", "arm", {"delay": 10, "every": 10, "catch_up": catch_up})
    assert h.advance(35, down=True) == fires
    assert [m for _, m in h.state("h-beacon", "d")["ticks"]] == missed
    # the timer goes on at its period afterwards, on time again
    assert h.advance(10) == 1


def test_periodic_timers_fire_once_per_period_on_a_live_worker() -> None:
    h = Harness(Beacon)
    start = h.clock.now
    h.call("h-beacon", "d", "arm", {"delay": 10, "every": 10, "catch_up": "skip"})
    assert h.advance(35) == 3
    ticks = h.state("h-beacon", "d")["ticks"]
    assert [t - round(start) for t, _ in ticks] == [10, 20, 30]
    assert [m for _, m in ticks] == [0, 0, 0]


def test_idle_keys_are_passivated_and_come_back_with_on_activate() -> None:
    Hooked.passivations.clear()
    h = Harness(Hooked, settings=Settings(partitions=8, idle_timeout_s=60))
    assert h.call("h-hooked", "x", "inc") == {"activations": 1, "n": 1}
    h.advance(30)
    assert h.is_active("h-hooked", "x")
    h.advance(31)
    assert not h.is_active("h-hooked", "x")
    assert Hooked.passivations == [{"activations": 1, "n": 1}]
    assert h.call("h-hooked", "x", "inc") == {"activations": 2, "n": 2}


def test_the_activation_cap_passivates_the_least_recently_used() -> None:
    Hooked.passivations.clear()
    h = Harness(Hooked, settings=Settings(partitions=8, max_activations=2))
    for key in ("a", "b", "a", "c"):
        h.call("h-hooked", key, "inc")
    assert h.passivated == [("h-hooked", "b")]
    assert h.is_active("h-hooked", "a") and h.is_active("h-hooked", "c")


def test_a_process_killed_before_its_commit_loses_nothing() -> None:
    h = Harness(Wallet)
    h.call("wallet", "w", "deposit", {"amount": 5})
    h.crash_next_commit()
    assert h.call("wallet", "w", "deposit", {"amount": 7}) == 12  # redelivered to the next owner
    assert h.stats.process_deaths == 1
    assert h.state("wallet", "w") == {"balance": 12}


def test_a_redelivery_after_takeover_of_a_committed_batch_is_skipped() -> None:
    h = Harness(Wallet)
    h.send("wallet", "w", "deposit", {"amount": 5})
    h.crash_next_commit(after=True)  # committed, then killed before the ack and the reply
    with pytest.raises(AlreadyAppliedError):  # the redelivery's answer, not a timeout
        h.call("wallet", "w", "deposit", {"amount": 7})
    assert h.state("wallet", "w") == {"balance": 12}  # applied once, not twice
    assert h.stats.duplicates == 2
    assert h.stats.takeovers == 1


def test_a_stale_owner_cannot_write_after_a_takeover() -> None:
    h = Harness(Wallet)
    h.call("wallet", "w", "deposit", {"amount": 5})
    old = h.takeover()
    with pytest.raises(StaleWriteError):
        h.apply_as(old, "wallet", "w", "deposit", {"amount": 1000})
    assert h.call("wallet", "w", "deposit", {"amount": 1}) == 6


def test_an_idempotency_key_is_applied_once() -> None:
    h = Harness(Wallet)
    h.send("wallet", "w", "deposit", {"amount": 5}, idempotency_key="req-1")
    h.send("wallet", "w", "deposit", {"amount": 5}, idempotency_key="req-1")
    h.send("wallet", "w", "deposit", {"amount": 5}, idempotency_key="req-2")
    h.run()
    assert h.state("wallet", "w") == {"balance": 10}


# --- the same scenario through the harness and through real workers --------------------------

SCENARIO: list[tuple[str, str, str, Any]] = [
    ("cart", "c1", "add", {"item": "apple", "qty": 2}),
    ("cart", "c1", "add", {"item": "pear"}),
    ("cart", "c2", "remove", {"item": "apple"}),  # refused: not in the cart
    ("counter", "n1", "add", {"by": 5}),
    ("cart", "c1", "remove", {"item": "apple", "qty": 1}),
    ("counter", "n1", "add", {"by": -2}),
    ("cart", "c1", "checkout", None),
    ("cart", "c1", "add", {"item": "plum"}),  # refused: checked out
    ("cart", "c2", "add", {"item": "fig", "qty": 3}),
    ("counter", "n2", "get", None),
]
FINAL_KEYS = [("cart", "c1"), ("cart", "c2"), ("counter", "n1"), ("counter", "n2")]


def _outcome(call: Any) -> Any:
    try:
        return ["ok", call()]
    except HandlerError as e:
        return ["error", type(e).__name__, str(e)]


@pytest.mark.integration
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_the_harness_and_real_workers_agree(
    start_worker: WorkerFactory, client: Client, settings: Settings
) -> None:
    h = Harness(modules=("keyq.examples",), settings=settings.with_(entity_modules=()))
    by_harness = [_outcome(lambda m=m: h.call(*m)) for m in SCENARIO]
    start_worker()
    by_workers = [_outcome(lambda m=m: client.call(*m, timeout=15)) for m in SCENARIO]
    assert by_harness == by_workers
    assert by_harness[2][:2] == ["error", "Rejected"]  # the scenario does exercise refusals
    for entity, key in FINAL_KEYS:
        assert h.state(entity, key) == client.read(entity, key), (entity, key)
