"""Typed payloads: a handler annotated with a pydantic model or a dataclass gets its payload
validated at send (nothing reaches the broker) and again in the worker (dead-lettered as
malformed, never run as a crash); untyped handlers are unchanged."""

from __future__ import annotations

import time
from typing import Any

import pytest

from keyq.client import Client
from keyq.entity import Entity, EntityDefinitionError, EntityRegistry, handler
from keyq.envelope import Envelope
from keyq.errors import InvalidPayloadError, MessageRefusedError, Rejected
from keyq.settings import Settings
from keyq.testing import Harness
from tests.conftest import WorkerFactory, poll
from tests.typed_entities import Amount, DataclassCounter, TypedWallet

MODULES = ("keyq.examples", "tests.entities", "tests.typed_entities")


def test_a_wrong_payload_type_is_refused_by_the_producer() -> None:
    h = Harness(TypedWallet, DataclassCounter)
    with pytest.raises(InvalidPayloadError, match="amount"):
        h.send("typed-wallet", "a", "deposit", {"amount": "ten"})
    with pytest.raises(InvalidPayloadError, match="amount"):
        h.send("typed-wallet", "a", "deposit", {"amount": -1})  # Field(gt=0)
    with pytest.raises(InvalidPayloadError, match="by"):
        h.send("dc-counter", "a", "add", {"label": "no by"})
    assert h.pending() == 0


def test_typed_handlers_get_models_and_states_are_stored_as_json() -> None:
    h = Harness(TypedWallet, DataclassCounter)
    assert h.call("typed-wallet", "a", "deposit", {"amount": 10}) == {"balance": 10}
    assert h.call("typed-wallet", "a", "deposit", Amount(amount=5)) == {"balance": 15}
    assert h.call("typed-wallet", "a", "withdraw", {"amount": "3"}) == 12  # lax: "3" -> 3
    with pytest.raises(Rejected):
        h.call("typed-wallet", "a", "withdraw", {"amount": 100})
    assert h.state("typed-wallet", "a") == {"balance": 12}
    assert h.call("dc-counter", "c", "add", {"by": 2}) == 2
    assert h.state("dc-counter", "c") == {"n": 2}


def test_the_wire_carries_the_canonical_json_form() -> None:
    h = Harness(TypedWallet)
    msg_id = h.send("typed-wallet", "a", "deposit", {"amount": "7"})
    assert h.sent[msg_id]["payload"] == {"amount": 7, "note": None}


def test_untyped_handlers_are_unchanged() -> None:
    registry = EntityRegistry([TypedWallet])
    entity_type = registry.get("typed-wallet")
    assert entity_type.prepare_payload("peek", {"any": ["json", 1]}) == {"any": ["json", 1]}
    assert getattr(entity_type.ops["peek"], "__func__", None) is TypedWallet.peek
    h = Harness(TypedWallet)
    assert h.call("typed-wallet", "a", "peek", {"x": "ten"}) == {"x": "ten"}


def test_a_worker_refuses_a_wrong_payload_from_another_producer_as_malformed() -> None:
    h = Harness(TypedWallet)
    wire = {
        "v": 1,
        "id": "m1",
        "entity": "typed-wallet",
        "key": "a",
        "op": "deposit",
        "payload": {"amount": "ten"},
        "partition": 0,
        "reply": True,
        "sent_at": 0.0,
    }
    from keyq.routing import partition_for

    wire["partition"] = partition_for("a", h.settings.partitions)
    h.send_raw(int(wire["partition"]), wire)
    h.run()
    assert [d.reason for d in h.dead_letters] == ["malformed"]
    assert h.stats.crashed == 0 and h.stats.restarts == 0
    assert '"kind":"refused"' in h.replies["m1"]


def test_a_typed_handler_without_pydantic_says_how_to_fix_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_pydantic(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pydantic":
            raise ImportError("no pydantic here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pydantic)
    with pytest.raises(EntityDefinitionError, match=r"keyq\[typed\]"):

        class _Needs(Entity):
            name = "needs-pydantic"

            @handler
            def go(self, state: Any, payload: Amount) -> Any:
                return state, None


@pytest.mark.integration
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_typed_payloads_with_real_workers(start_worker: WorkerFactory, settings: Settings) -> None:
    typed = settings.with_(entity_modules=MODULES)
    client = Client(typed)
    try:
        with pytest.raises(InvalidPayloadError):
            client.send("typed-wallet", "w", "deposit", {"amount": "ten"})
        assert sum(client.queue_depths().values()) == 0  # never reached the broker
        start_worker(settings_override=typed)
        assert client.call("typed-wallet", "w", "deposit", {"amount": 4}) == {"balance": 4}
        # a producer that skips validation: the worker refuses it, no crash, no restart
        partition = client.envelope("typed-wallet", "w", "peek").partition
        bad = Envelope(
            id="bad-1",
            entity="typed-wallet",
            key="w",
            op="deposit",
            payload={"amount": "ten"},
            partition=partition,
            reply=True,
            sent_at=time.time(),
        )
        client.publish([bad])
        got = client.redis.blpop([typed.redis_key("reply", "bad-1")], timeout=15)
        assert got is not None and b'"refused"' in got[1]
        with pytest.raises(MessageRefusedError):
            from keyq import reply as replies

            replies.decode(got[1], entity="typed-wallet", key="w", op="deposit", message_id="x")
        poll(lambda: client.read("typed-wallet", "w") == {"balance": 4}, what="the state")
    finally:
        client.close()
