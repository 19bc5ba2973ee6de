"""Validation at the producer: bad input raises a typed error naming the problem and publishes
nothing; input right at the limits is accepted."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from keyq.client import Client
from keyq.errors import (
    InvalidKeyError,
    InvalidPayloadError,
    KeyqError,
    MalformedMessageError,
    PayloadTooLargeError,
    UnknownEntityError,
    UnknownOperationError,
    ValidationError,
)
from keyq.settings import Settings
from tests.conftest import TEST_PARTITIONS

PAYLOAD_LIMIT = 100  # bytes of encoded JSON, small so the edge is easy to hit exactly


@pytest.fixture
def producer(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> Iterator[Client]:
    """A Client on the test Redis; validation needs no database and no worker."""
    settings = Settings(
        broker_url=redis_url,
        redis_url=redis_url,
        database_url=f"sqlite:///{tmp_path / 'unused.sqlite3'}",
        namespace=f"t{uuid.uuid4().hex[:8]}",
        partitions=TEST_PARTITIONS,
        entity_modules=("keyq.examples", "tests.entities"),
    ).with_(max_payload_bytes=PAYLOAD_LIMIT)
    client = Client(settings)
    yield client
    client.close()


def published(client: Client) -> int:
    return sum(client.queue_depths().values())


class Unencodable:
    pass


BAD_SENDS: list[tuple[str, tuple[Any, ...], type[KeyqError], str]] = [
    ("unknown entity", ("nope", "k", "add", None), UnknownEntityError, "unknown entity 'nope'"),
    ("entity not a str", (7, "k", "add", None), MalformedMessageError, "entity must be a string"),
    ("unknown op", ("counter", "k", "mul", None), UnknownOperationError, "no operation 'mul'"),
    ("op not a str", ("counter", "k", 5, None), UnknownOperationError, "no operation 5"),
    ("key is an int", ("counter", 42, "add", None), InvalidKeyError, "key must be a string"),
    ("key is None", ("counter", None, "add", None), InvalidKeyError, "key must be a string"),
    ("key is empty", ("counter", "", "add", None), InvalidKeyError, "key must not be empty"),
    ("key too long", ("counter", "k" * 257, "add", None), InvalidKeyError, "257 characters"),
    ("key with NUL", ("counter", "a\x00b", "add", None), InvalidKeyError, "must not contain NUL"),
    ("payload NUL", ("journal", "k", "append", "a\x00"), InvalidPayloadError, "NUL"),
    ("payload NUL key", ("journal", "k", "append", {"\x00": 1}), InvalidPayloadError, "NUL"),
    ("payload NaN", ("journal", "k", "append", math.nan), InvalidPayloadError, "not JSON"),
    ("payload inf", ("journal", "k", "append", {"x": math.inf}), InvalidPayloadError, "not JSON"),
    ("payload set", ("journal", "k", "append", {1, 2}), InvalidPayloadError, "set"),
    ("payload bytes", ("journal", "k", "append", b"raw"), InvalidPayloadError, "bytes"),
    (
        "payload object",
        ("journal", "k", "append", {"o": Unencodable()}),
        InvalidPayloadError,
        "Unencodable",
    ),
    (
        "payload too large",
        ("journal", "k", "append", "a" * (PAYLOAD_LIMIT - 1)),
        PayloadTooLargeError,
        f"101 bytes encoded; the limit is {PAYLOAD_LIMIT} \\(KEYQ_MAX_PAYLOAD_BYTES\\)",
    ),
]


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [case[1:] for case in BAD_SENDS],
    ids=[case[0] for case in BAD_SENDS],
)
def test_invalid_send_raises_typed_error_and_publishes_nothing(
    producer: Client,
    redis_client: redis.Redis,
    args: tuple[Any, ...],
    error: type[KeyqError],
    message: str,
) -> None:
    with pytest.raises(error, match=message) as info:
        producer.send(*args)
    assert isinstance(info.value, ValidationError)
    assert published(producer) == 0
    assert redis_client.dbsize() == 0, redis_client.keys("*")


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [case[1:] for case in BAD_SENDS],
    ids=[case[0] for case in BAD_SENDS],
)
def test_invalid_call_raises_before_publishing_or_waiting(
    producer: Client,
    redis_client: redis.Redis,
    args: tuple[Any, ...],
    error: type[KeyqError],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        producer.call(*args, timeout=30)  # a refusal must not wait for a reply
    assert published(producer) == 0
    assert redis_client.dbsize() == 0


def test_send_many_with_one_bad_message_publishes_none_of_them(producer: Client) -> None:
    batch = [("k1", "append", 1), ("k2", "append", 2), ("k3", "append", {1, 2})]
    with pytest.raises(InvalidPayloadError):
        producer.send_many("journal", batch)
    assert published(producer) == 0


def test_key_of_exactly_256_characters_is_accepted(producer: Client) -> None:
    key = "k" * 256
    producer.send("counter", key, "add", {"by": 1})
    depths = producer.queue_depths()
    assert sum(depths.values()) == 1
    assert depths[producer.envelope("counter", key, "add").partition] == 1


def test_payload_of_exactly_the_limit_is_accepted(producer: Client) -> None:
    payload = "a" * (PAYLOAD_LIMIT - 2)  # the two quotes make it exactly the limit
    producer.send("journal", "edge", "append", payload)
    assert published(producer) == 1
    with pytest.raises(PayloadTooLargeError):
        producer.send("journal", "edge", "append", payload + "a")
    assert published(producer) == 1


def test_unicode_key_and_nested_payload_are_accepted(producer: Client) -> None:
    producer.send("journal", "ключ-🔑", "append", {"a": [1, 2.5, None, True, "é"]})
    assert published(producer) == 1


def test_read_validates_entity_and_key(producer: Client) -> None:
    with pytest.raises(UnknownEntityError):
        producer.read("nope", "k")
    with pytest.raises(InvalidKeyError):
        producer.read("counter", "")


def test_text_that_merely_spells_a_nul_escape_is_accepted(producer: Client) -> None:
    producer.send("journal", "spelled", "append", ["\\u0000", "\\\\u0000", "\\x00"])
    assert published(producer) == 1


@pytest.mark.parametrize("message_id", ["", "i" * 129, "a\x00b"])
def test_bad_explicit_message_id_is_refused(producer: Client, message_id: str) -> None:
    with pytest.raises(MalformedMessageError, match="message id must be"):
        producer.envelope("counter", "k", "add", message_id=message_id)


def test_explicit_message_id_of_128_characters_is_accepted(producer: Client) -> None:
    assert producer.envelope("counter", "k", "add", message_id="i" * 128).id == "i" * 128


@pytest.mark.parametrize("timeout", [0, -1, math.nan])
def test_call_with_a_timeout_that_is_not_positive_is_refused(
    producer: Client, timeout: float
) -> None:
    # BLPOP reads 0 as "wait forever": a call must never hang on a typo
    with pytest.raises(ValidationError, match="call timeout must be a positive number"):
        producer.call("counter", "k", "add", timeout=timeout)
    assert published(producer) == 0
