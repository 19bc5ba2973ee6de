"""Idempotency keys: the same (entity, key, idempotency_key) is applied once, also when the
request is sent again around a worker's kill -9 (the id is derived, the dedupe window does
the rest in the same transaction as the state)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from keyq.client import Client
from keyq.entity import EntityRegistry
from keyq.envelope import idempotent_message_id, make_envelope
from keyq.errors import AlreadyAppliedError, ValidationError
from tests.conftest import WorkerFactory, poll

REGISTRY = EntityRegistry.from_modules(["keyq.examples", "tests.entities"])


def _env(key: str, idem: str | None, message_id: str | None = None) -> Any:
    return make_envelope(
        REGISTRY,
        "sequence",
        key,
        "see",
        1,
        partitions=8,
        max_key_length=256,
        max_payload_bytes=1024,
        idempotency_key=idem,
        message_id=message_id,
    )


def test_the_message_id_is_derived_from_entity_key_and_idempotency_key() -> None:
    a, b = _env("k", "req-1"), _env("k", "req-1")
    assert a.id == b.id == idempotent_message_id("sequence", "k", "req-1")
    assert re.fullmatch(r"[0-9a-f]{32}", a.id)
    assert _env("k", "req-2").id != a.id
    assert _env("other", "req-1").id != a.id
    assert idempotent_message_id("sequence", "k|x", "y") != idempotent_message_id(
        "sequence", "k", "x|y"
    )
    assert _env("k", None).id != _env("k", None).id  # without a key: random as before


@pytest.mark.parametrize("bad", ["", "x" * 257, "\ud800"])
def test_a_bad_idempotency_key_is_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        _env("k", bad)


def test_an_idempotency_key_and_a_message_id_together_are_refused() -> None:
    with pytest.raises(ValidationError, match="not both"):
        _env("k", "req-1", message_id="abc")


def _seen(client: Client, entity: str, key: str) -> list[Any]:
    stored = client.repo.load_one(entity, key)
    if stored is None:
        return []
    return list(stored.state.get("seen") or stored.state.get("log") or [])


@pytest.mark.integration
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_request_sent_again_after_a_kill_is_applied_once(
    start_worker: WorkerFactory, client: Client, tmp_path: Path
) -> None:
    # 1. applied, the worker is killed, the client retries (send, call and send_many)
    first = start_worker()
    assert client.call("sequence", "k", "see", "charge", idempotency_key="req-1") == 1
    first.kill()
    client.send("sequence", "k", "see", "charge", idempotency_key="req-1")
    client.send_many("sequence", [("k", "see", "charge", "req-1"), ("k", "see", "other", None)])
    # 2. killed inside the handler, before the commit; the retry is queued behind it
    mark = tmp_path / "inside"
    payload = {"mark": str(mark), "seconds": 30.0}
    second = start_worker()
    client.send("slow", "s", "see", payload, idempotency_key="req-9")
    poll(mark.exists, what="the worker to be inside the handler")
    second.kill()
    client.send("slow", "s", "see", payload, idempotency_key="req-9")
    client.send("slow", "s", "see", "marker")
    start_worker()
    assert client.call("sequence", "k", "see", "marker", timeout=20) == 3
    poll(lambda: len(_seen(client, "slow", "s")) >= 2, what="the slow key's marker")
    assert _seen(client, "sequence", "k") == ["charge", "other", "marker"]
    applied = [p for p, _pid in _seen(client, "slow", "s")]
    assert applied == [payload, "marker"]


@pytest.mark.integration
def test_a_retried_call_gets_the_first_reply_or_learns_it_was_applied(
    start_worker: WorkerFactory, client: Client
) -> None:
    """A call retried with the same idempotency key (its first reply already read) gets that
    same reply at once; once that reply is gone (expired), the retry is told the request was
    applied before (AlreadyAppliedError), never a timeout; the state changed once."""
    start_worker()
    assert client.call("sequence", "r", "see", "pay", idempotency_key="req-7", timeout=10) == 1
    assert client.call("sequence", "r", "see", "pay", idempotency_key="req-7", timeout=10) == 1
    message_id = idempotent_message_id("sequence", "r", "req-7")
    client.redis.delete(client.settings.redis_key("reply", message_id))  # as if it expired
    with pytest.raises(AlreadyAppliedError) as caught:
        client.call("sequence", "r", "see", "pay", idempotency_key="req-7", timeout=10)
    assert caught.value.message_id == message_id
    assert _seen(client, "sequence", "r") == ["pay"]
    assert client.call("sequence", "r", "see", "next", timeout=10) == 2
