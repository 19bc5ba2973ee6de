"""The core path on real parts: producer -> partition queue -> worker -> Repo + cache -> reply."""

from __future__ import annotations

import pytest

from keyq.client import Client
from keyq.errors import Rejected
from keyq.repo import Repo
from tests.conftest import WorkerFactory, poll

pytestmark = pytest.mark.integration


def test_call_applies_handler_and_replies(start_worker: WorkerFactory, client: Client) -> None:
    start_worker()
    assert client.call("counter", "user-1", "add", {"by": 2}) == 2
    assert client.call("counter", "user-1", "add", {"by": 3}) == 5


def test_state_is_committed_before_reply_and_read_needs_no_worker(
    start_worker: WorkerFactory, client: Client, repo: Repo
) -> None:
    worker = start_worker()
    client.call("cart", "alice", "add", {"item": "apple", "qty": 2})
    stored = repo.load_one("cart", "alice")
    assert stored is not None and stored.state["items"] == {"apple": 2} and stored.version == 1
    worker.stop()
    assert client.read("cart", "alice") == {"status": "open", "items": {"apple": 2}}
    client.cache.drop("cart", "alice")  # a cold cache falls back to the Repo
    assert client.read("cart", "alice") == {"status": "open", "items": {"apple": 2}}
    assert client.read("cart", "nobody") is None


def test_cart_refuses_adds_after_checkout(start_worker: WorkerFactory, client: Client) -> None:
    start_worker()
    client.call("cart", "bob", "add", {"item": "pear"})
    assert client.call("cart", "bob", "checkout")["count"] == 1
    with pytest.raises(Rejected, match="checked out"):
        client.call("cart", "bob", "add", {"item": "plum"})
    assert client.read("cart", "bob")["items"] == {"pear": 1}


def test_sent_messages_are_applied_in_order(start_worker: WorkerFactory, client: Client) -> None:
    start_worker()
    for i in range(50):
        client.send("journal", "j1", "append", i)
    poll(
        lambda: (client.read("journal", "j1") or {}).get("items") == list(range(50)),
        what="50 journal items in order",
    )


def test_integers_beyond_64_bits_are_applied_stored_and_cached_exactly(
    start_worker: WorkerFactory, client: Client, repo: Repo
) -> None:
    """keyq.fast_json: orjson alone reads such a number as a float and refuses to write it."""
    start_worker()
    big = 2**80 + 1
    assert client.call("counter", "huge", "add", {"by": big}) == big
    assert client.call("counter", "huge", "add", {"by": 1}) == big + 1
    stored = repo.load_one("counter", "huge")
    assert stored is not None and stored.state["value"] == big + 1
    assert client.read("counter", "huge") == {"value": big + 1}  # from the cache
    client.cache.drop("counter", "huge")
    assert client.read("counter", "huge") == {"value": big + 1}  # from the Repo
