"""The entity catalogue: workers publish it on start; a producer built from it (no entity code)
validates like one with the code; `keyq schema` prints it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import redis

from keyq import catalogue
from keyq.client import Client
from keyq.entity import EntityRegistry
from keyq.envelope import make_envelope
from keyq.errors import (
    ConfigurationError,
    InvalidPayloadError,
    UnknownEntityError,
    UnknownOperationError,
)
from keyq.settings import Settings
from tests.conftest import ROOT, WorkerFactory, poll, settings_env

MODULES = ("keyq.examples", "tests.entities", "tests.typed_entities")
LOCAL = EntityRegistry.from_modules(MODULES)
REMOTE = catalogue.registry_from(json.loads(json.dumps(catalogue.describe(LOCAL))))


def _build(registry: EntityRegistry, entity: str, op: str, payload: Any) -> Any:
    return make_envelope(
        registry,
        entity,
        "k",
        op,
        payload,
        partitions=8,
        max_key_length=256,
        max_payload_bytes=65536,
    ).payload


def test_a_typed_op_publishes_its_payload_schema() -> None:
    doc = catalogue.describe(LOCAL)["typed-wallet"]
    schema = doc["ops"]["deposit"]["payload_schema"]
    assert schema["properties"]["amount"]["type"] == "integer"
    assert schema["required"] == ["amount"]
    assert doc["ops"]["peek"]["payload_schema"] is None
    assert doc["version"] == catalogue.describe(LOCAL)["typed-wallet"]["version"]
    assert catalogue.describe(LOCAL)["counter"]["version"] != doc["version"]


@pytest.mark.parametrize(
    ("entity", "op", "payload"),
    [
        ("typed-wallet", "deposit", {"amount": 5}),
        ("typed-wallet", "deposit", {"amount": 5, "note": "hi"}),
        ("typed-wallet", "deposit", {"amount": "ten"}),
        ("typed-wallet", "deposit", {"amount": 0}),
        ("typed-wallet", "deposit", {"note": "no amount"}),
        ("typed-wallet", "deposit", ["not", "an", "object"]),
        ("typed-wallet", "peek", {"anything": ["goes"]}),
        ("dc-counter", "add", {"by": 2}),
        ("dc-counter", "add", {"by": 2.5}),
        ("counter", "add", {"by": "x"}),  # untyped: the handler decides
    ],
)
def test_the_catalogue_refuses_what_the_code_refuses(entity: str, op: str, payload: Any) -> None:
    try:
        _build(LOCAL, entity, op, payload)
        local_ok = True
    except InvalidPayloadError:
        local_ok = False
    if local_ok:
        _build(REMOTE, entity, op, payload)
    else:
        with pytest.raises(InvalidPayloadError):
            _build(REMOTE, entity, op, payload)


def test_unknown_entities_and_ops_are_refused_from_the_catalogue() -> None:
    with pytest.raises(UnknownEntityError):
        _build(REMOTE, "nope", "add", None)
    with pytest.raises(UnknownOperationError):
        _build(REMOTE, "counter", "nope", None)


def test_a_producer_without_a_catalogue_is_told_what_to_do(
    settings: Settings, redis_client: redis.Redis
) -> None:
    with pytest.raises(ConfigurationError, match="start a worker"):
        catalogue.load_registry(redis_client, settings)


@pytest.mark.integration
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_workers_publish_and_a_client_without_entity_code_uses_it(
    start_worker: WorkerFactory, settings: Settings, redis_client: redis.Redis
) -> None:
    typed = settings.with_(entity_modules=MODULES)
    start_worker(settings_override=typed)
    poll(lambda: redis_client.hlen(catalogue.catalogue_key(typed)) >= len(MODULES), what="it")
    producer = Client(typed.with_(entity_modules=()))  # no entity code: the catalogue
    try:
        assert "typed-wallet" in producer.registry
        with pytest.raises(InvalidPayloadError):
            producer.send("typed-wallet", "w", "deposit", {"amount": "ten"})
        assert sum(producer.queue_depths().values()) == 0
        assert producer.call("typed-wallet", "w", "deposit", {"amount": 3}) == {"balance": 3}
    finally:
        producer.close()
    env = settings_env(typed)
    out = subprocess.run(
        [sys.executable, "-m", "keyq", "schema", "typed-wallet"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["typed-wallet"]["ops"]["deposit"]["payload_schema"]["required"] == ["amount"]
    assert printed["typed-wallet"]["published_by"]
    missing = subprocess.run(
        [sys.executable, "-m", "keyq", "schema", "nope"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "no entity 'nope'" in missing.stderr
    # a producer process with KEYQ_ENTITY_MODULES set empty validates against the catalogue
    bare = {**env, "KEYQ_ENTITY_MODULES": ""}
    refused = subprocess.run(
        [sys.executable, "-m", "keyq", "send", "typed-wallet", "w", "deposit", '{"amount": "x"}'],
        env=bare,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "InvalidPayloadError" in refused.stderr, refused.stderr
