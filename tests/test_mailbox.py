"""The mailbox on a real Redis, in-process: decoding Celery's format, claiming, draining,
requeueing and restoring keep every message in exactly one place, in order, with its delivery
count; an old owner's late ack cannot delete a new owner's record."""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import pytest
import redis

from keyq.celery_app import DISPATCH_TASK
from keyq.mailbox import (
    DELIVERIES_HEADER,
    KOMBU_UNACKED,
    KOMBU_UNACKED_INDEX,
    MAX_ENVELOPES_PER_MESSAGE,
    Mailbox,
    decode,
    partition_of_queue,
    poison_key,
    redelivered,
)
from keyq.settings import Settings

TASKS = (DISPATCH_TASK,)


def celery_message(
    envelopes: list[Any], tag: str, *, body_encoding: str = "base64", **headers: Any
) -> dict[str, Any]:
    """A keyq.dispatch in Celery's protocol 2 JSON format, as kombu's Redis transport stores it."""
    body = json.dumps([[envelopes], {}, {}]).encode()
    if headers.get("compression") == "application/x-gzip":
        body = zlib.compress(body)
    return {
        "body": base64.b64encode(body).decode() if body_encoding == "base64" else body.decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": DISPATCH_TASK, "id": f"id-{tag}", **headers},
        "properties": {
            "delivery_tag": tag,
            "body_encoding": body_encoding,
            "delivery_info": {"exchange": "", "routing_key": "q"},
        },
    }


def raw(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


# --- decoding (pure) ------------------------------------------------------------------------


def test_decode_reads_envelopes_and_delivery_count() -> None:
    msg = celery_message([{"id": "a"}, {"id": "b"}], "t1", **{DELIVERIES_HEADER: 2})
    got = decode(raw(msg), TASKS, DISPATCH_TASK)
    assert got.problem is None
    assert got.envelopes == ({"id": "a"}, {"id": "b"})
    assert got.deliveries == 2 and got.message_id == "id-t1"


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda m: b"not json {", "not a JSON object"),
        (lambda m: b'"\\ud800"', "not a JSON object"),
        (lambda m: raw({**m, "content-type": "application/x-python-serialize"}), "content type"),
        (lambda m: raw({**m, "headers": {**m["headers"], "task": "os.system"}}), "unknown task"),
        (
            lambda m: raw({**m, "properties": {**m["properties"], "body_encoding": "rot13"}}),
            "unknown body encoding",
        ),
        (
            lambda m: raw({**m, "headers": {**m["headers"], "compression": "x-nope"}}),
            "unknown compression",
        ),
        (lambda m: raw({**m, "body": "!!!"}), "body cannot be read"),
        (lambda m: raw({**m, "body": base64.b64encode(b"[]").decode()}), "needs args"),
        (lambda m: raw({**m, "properties": {}}), "no delivery tag"),
    ],
)
def test_decode_names_what_cannot_be_applied(mutate: Any, problem: str) -> None:
    got = decode(mutate(celery_message([{"id": "a"}], "t")), TASKS, DISPATCH_TASK)
    assert got.problem is not None and problem in got.problem


def test_decompression_is_bounded() -> None:
    """A zip bomb: a few KB that inflate past the limit are refused, not inflated."""
    bomb = zlib.compress(b"[" + b" " * 5_000_000 + b"]")
    msg = celery_message([], "t", compression="application/x-gzip")
    msg["body"] = base64.b64encode(bomb).decode()
    got = decode(raw(msg), TASKS, DISPATCH_TASK, limit=1_000_000)
    assert got.problem is not None and "larger than" in got.problem
    ok = celery_message([{"id": "z"}], "t2", compression="application/x-gzip")
    assert decode(raw(ok), TASKS, DISPATCH_TASK).envelopes == ({"id": "z"},)


def test_oversize_envelope_lists_are_refused() -> None:
    many = [{"id": str(i)} for i in range(MAX_ENVELOPES_PER_MESSAGE + 1)]
    got = decode(raw(celery_message(many, "t")), TASKS, DISPATCH_TASK)
    assert got.problem is not None and "envelopes in one message" in got.problem


def test_redelivered_gets_a_new_tag_and_counts_up_keeping_the_body() -> None:
    msg = celery_message([{"id": "a", "n": 12345678901234567890}], "t1")
    once = json.loads(redelivered(raw(msg)))
    twice = json.loads(redelivered(json.dumps(once)))
    assert once["properties"]["delivery_tag"] != "t1"
    assert twice["properties"]["delivery_tag"] != once["properties"]["delivery_tag"]
    assert (once["headers"][DELIVERIES_HEADER], twice["headers"][DELIVERIES_HEADER]) == (1, 2)
    assert twice["body"] == msg["body"]  # the payload bytes are untouched
    assert redelivered(b"garbage") == b"garbage"


def test_partition_of_queue() -> None:
    s = Settings(namespace="ns", partitions=8)
    assert partition_of_queue(s, "ns.p3") == 3
    assert partition_of_queue(s, "ns.p8") is None  # out of range
    assert partition_of_queue(s, "ns.default") is None
    assert partition_of_queue(s, "other.p3") is None


# --- the Redis side ---------------------------------------------------------------------------


@pytest.fixture
def mailbox(redis_url: str, redis_client: redis.Redis) -> Mailbox:
    return Mailbox(redis_client, Settings(redis_url=redis_url, namespace="mb", partitions=4))


def _record_unacked(client: redis.Redis, message: dict[str, Any], queue: str, at: float) -> None:
    """What keyq's fetch leaves behind for a delivered message."""
    tag = message["properties"]["delivery_tag"]
    client.hset(KOMBU_UNACKED, tag, json.dumps([message, "", queue]))
    client.zadd(KOMBU_UNACKED_INDEX, {tag: at})


def _queue(client: redis.Redis, mailbox: Mailbox, p: int) -> list[dict[str, Any]]:
    """The queue from its head (popped first) to its tail."""
    return [json.loads(m) for m in reversed(client.lrange(mailbox.queue(p), 0, -1))]


def _lease(client: redis.Redis, mailbox: Mailbox, p: int, value: str) -> tuple[str, str]:
    key = f"mb:lease:{p}"
    client.set(key, value)
    return key, value


def test_claim_moves_the_delivered_message_into_in_flight_and_out_of_unacked(
    redis_client: redis.Redis, mailbox: Mailbox
) -> None:
    msg = celery_message([{"id": "a"}], "tag-a")
    _record_unacked(redis_client, msg, mailbox.queue(0), 1.0)
    lease = _lease(redis_client, mailbox, 0, "me|1")
    assert mailbox.claim(0, lease, msg) == 1
    assert redis_client.hlen(KOMBU_UNACKED) == 0 and redis_client.zcard(KOMBU_UNACKED_INDEX) == 0
    assert [json.loads(m) for m in redis_client.lrange(mailbox.inflight_key(0), 0, -1)] == [msg]


def test_claim_without_the_lease_returns_the_message_to_the_head_with_a_new_tag(
    redis_client: redis.Redis, mailbox: Mailbox
) -> None:
    """An old owner's message goes back first in line, and its old tag is gone: the new
    owner's record of it (new tag) cannot be deleted by the old owner's late ack."""
    redis_client.lpush(mailbox.queue(0), raw(celery_message([{"id": "newer"}], "n")))
    msg = celery_message([{"id": "a"}], "tag-a")
    _record_unacked(redis_client, msg, mailbox.queue(0), 1.0)
    key, _ = _lease(redis_client, mailbox, 0, "new-owner|2")
    assert mailbox.claim(0, (key, "old-owner|1"), msg) == 0
    head, tail = _queue(redis_client, mailbox, 0)
    assert head["headers"]["id"] == "id-tag-a" and tail["headers"]["id"] == "id-n"
    assert head["properties"]["delivery_tag"] != "tag-a"
    assert redis_client.hlen(KOMBU_UNACKED) == 0
    # a second claim of the same delivery (already handled) does nothing at all
    assert mailbox.claim(0, (key, "old-owner|1"), msg) == -1
    assert len(_queue(redis_client, mailbox, 0)) == 2


def test_drain_stops_before_a_message_delivered_more_than_once_before(
    redis_client: redis.Redis, mailbox: Mailbox
) -> None:
    """Delivered once before (a takeover's in-flight batch): still drained with others; twice
    (its batch died again): it waits at the head, to go alone."""
    q = mailbox.queue(1)
    for i, extra in enumerate([{}, {DELIVERIES_HEADER: 1}, {DELIVERIES_HEADER: 2}, {}]):
        redis_client.lpush(q, raw(celery_message([{"id": str(i)}], f"t{i}", **extra)))
    lease = _lease(redis_client, mailbox, 1, "me|1")
    got = mailbox.drain(1, lease, 10)
    assert got is not None and [decode(m, TASKS, DISPATCH_TASK).envelopes for m in got] == [
        ({"id": "0"},),
        ({"id": "1"},),
    ]
    assert redis_client.llen(q) == 2  # the twice-redelivered one waits at the head
    assert mailbox.drain(1, (lease[0], "someone-else|9"), 10) is None


def test_claim_batch_claims_drains_takes_poison_and_finds_waiting_queues_in_one_step(
    redis_client: redis.Redis, mailbox: Mailbox
) -> None:
    """The batch's first round trip: the delivered message claimed, its queue drained up to a
    redelivered one, its poison list taken, the other held queues that wait reported."""
    q = mailbox.queue(1)
    for i, extra in enumerate([{}, {}, {DELIVERIES_HEADER: 2}]):
        redis_client.lpush(q, raw(celery_message([{"id": str(i)}], f"t{i}", **extra)))
    redis_client.lpush(poison_key(q), b"not json")
    redis_client.lpush(mailbox.queue(3), b"x", b"y")
    msg = celery_message([{"id": "a"}], "tag-a")
    _record_unacked(redis_client, msg, q, 1.0)
    lease = _lease(redis_client, mailbox, 1, "me|1")
    got = mailbox.claim_batch(1, lease, msg, 10, 5, [0, 2, 3], share=True)
    assert got.status == 1
    assert [decode(m, TASKS, DISPATCH_TASK).envelopes for m in got.drained] == [
        ({"id": "0"},),
        ({"id": "1"},),
    ]
    assert got.poison == [b"not json"] and got.waiting == {3: 2}
    assert got.share == 5  # one other queue waits: this one takes half of the room
    inflight = redis_client.lrange(mailbox.inflight_key(1), 0, -1)
    assert [json.loads(inflight[0]), *inflight[1:]] == [msg, *got.drained, b"not json"]
    assert redis_client.llen(q) == 1  # the redelivered one waits at the head, to go alone
    assert redis_client.hlen(KOMBU_UNACKED) == 0
    # alone (room 0): nothing drained; not our lease: back to the head, nothing taken
    msg2 = celery_message([{"id": "b"}], "tag-b")
    _record_unacked(redis_client, msg2, q, 2.0)
    assert mailbox.claim_batch(1, lease, msg2, 0, 5, []).drained == []
    msg3 = celery_message([{"id": "c"}], "tag-c")
    _record_unacked(redis_client, msg3, q, 3.0)
    redis_client.lpush(poison_key(q), b"more poison")
    stale = mailbox.claim_batch(1, (lease[0], "old|0"), msg3, 10, 5, [3])
    assert (stale.status, stale.drained, stale.poison, stale.waiting) == (0, [], [], {})
    assert redis_client.llen(poison_key(q)) == 1
    # without sharing (no partition just taken over) the queue may fill the whole room
    msg4 = celery_message([{"id": "d"}], "tag-d")
    _record_unacked(redis_client, msg4, q, 0.5)
    assert mailbox.claim_batch(1, lease, msg4, 10, 5, [3]).share == 10


def test_drain_many_drains_several_partitions_in_one_step_under_each_lease(
    redis_client: redis.Redis, mailbox: Mailbox
) -> None:
    for p in (0, 2, 3):
        for i in range(3):
            redis_client.lpush(mailbox.queue(p), raw(celery_message([{"id": f"{p}-{i}"}], "t")))
    mine0 = _lease(redis_client, mailbox, 0, "me|1")
    mine2 = _lease(redis_client, mailbox, 2, "me|1")
    theirs3 = _lease(redis_client, mailbox, 3, "other|4")
    got = mailbox.drain_many([(0, mine0, 2), (2, mine2, 5), (3, (theirs3[0], "me|1"), 2)])
    ids = {
        p: None if ms is None else [decode(m, TASKS, DISPATCH_TASK).envelopes[0]["id"] for m in ms]
        for p, ms in got.items()
    }
    assert ids == {0: ["0-0", "0-1"], 2: ["2-0", "2-1", "2-2"], 3: None}
    assert redis_client.llen(mailbox.inflight_key(0)) == 2
    assert redis_client.llen(mailbox.queue(3)) == 3  # not our lease: untouched


def _lease_of(partition: int, token: int) -> tuple[str, str]:
    """The worker's lease of a partition as _lease() writes it (mb:lease:<p>, me|<token>)."""
    return f"mb:lease:{partition}", f"me|{token}"


def test_drain_ready_takes_the_next_batch_in_turn_under_each_lease_after_the_settle(
    redis_client: redis.Redis, mailbox: Mailbox
) -> None:
    """The post-commit round trip's next batch: each held partition in turn, up to the room in
    all, into its own in-flight list; a partition whose lease is not ours is named and left
    alone; the WHOLE in-flight list comes back (what an earlier run of the same pipeline took
    is not left unread); a queue emptied loses its wake token, one still holding keeps it."""
    for p in (0, 1, 2, 3):
        for i in range(3):
            redis_client.lpush(mailbox.queue(p), raw(celery_message([{"id": f"{p}-{i}"}], "t")))
        redis_client.lpush(f"{mailbox.queue(p)}:wake", 1)
    redis_client.rpush(mailbox.inflight_key(1), raw(celery_message([{"id": "1-old"}], "t")))
    for p in (0, 1, 3):
        _lease(redis_client, mailbox, p, "me|1")
    _lease(redis_client, mailbox, 2, "other|4")
    held = {2: 1, 0: 1, 1: 1, 3: 1}  # partition: our token; partition 2's lease is another's
    pipe = redis_client.pipeline(transaction=False)
    pipe.ping()
    read = mailbox.drain_ready(pipe, held, _lease_of, 5)
    got = read(pipe.execute()[-1])
    ids = {
        p: None if ms is None else [decode(m, TASKS, DISPATCH_TASK).envelopes[0]["id"] for m in ms]
        for p, ms in got.items()
    }
    # room 5: partition 0's three, then two of partition 1 behind its unsettled message
    assert ids == {0: ["0-0", "0-1", "0-2"], 1: ["1-old", "1-0", "1-1"], 2: None}
    assert redis_client.llen(mailbox.queue(2)) == 3  # not our lease: untouched
    assert redis_client.llen(mailbox.queue(3)) == 3  # no room left for it
    assert not redis_client.exists(f"{mailbox.queue(0)}:wake")  # emptied: token gone
    assert redis_client.exists(f"{mailbox.queue(1)}:wake")  # one message still waits
    # a second run (a pipeline sent again) returns what both took
    pipe = redis_client.pipeline(transaction=False)
    read = mailbox.drain_ready(pipe, {0: 1, 3: 1}, _lease_of, 2)
    again = read(pipe.execute()[-1])
    assert [len(again[0] or []), len(again[3] or [])] == [3, 2]


def test_drain_ready_leaves_a_twice_delivered_message_for_the_fetch(
    redis_client: redis.Redis, mailbox: Mailbox
) -> None:
    """A message delivered more than once before is applied alone (the broker fetch hands it
    over): the follow-on drain stops in front of it."""
    q = mailbox.queue(0)
    redis_client.lpush(q, raw(celery_message([{"id": "a"}], "ta")))
    redis_client.lpush(q, redelivered(redelivered(raw(celery_message([{"id": "b"}], "tb")))))
    redis_client.lpush(q, raw(celery_message([{"id": "c"}], "tc")))
    _lease(redis_client, mailbox, 0, "me|1")
    pipe = redis_client.pipeline(transaction=False)
    read = mailbox.drain_ready(pipe, {0: 1}, _lease_of, 10)
    got = read(pipe.execute()[-1])
    assert [decode(m, TASKS, DISPATCH_TASK).envelopes[0]["id"] for m in got[0] or []] == ["a"]
    assert [m["headers"]["id"] for m in _queue(redis_client, mailbox, 0)] == ["id-tb", "id-tc"]


def test_requeue_puts_the_batch_back_in_order_with_counts_up(
    redis_client: redis.Redis, mailbox: Mailbox
) -> None:
    q = mailbox.queue(2)
    for i in range(4):
        redis_client.lpush(q, raw(celery_message([{"id": str(i)}], f"t{i}")))
    lease = _lease(redis_client, mailbox, 2, "me|1")
    assert len(mailbox.drain(2, lease, 3) or []) == 3
    assert mailbox.requeue(2, (lease[0], "not-me|0")) == -1  # only under our lease
    assert mailbox.requeue(2, lease) == 3
    back = _queue(redis_client, mailbox, 2)
    assert [m["headers"]["id"] for m in back] == ["id-t0", "id-t1", "id-t2", "id-t3"]
    assert [m["headers"].get(DELIVERIES_HEADER) for m in back] == [1, 1, 1, None]
    assert redis_client.llen(mailbox.inflight_key(2)) == 0


def test_restore_puts_a_dead_owners_messages_first_and_leaves_other_queues_alone(
    redis_client: redis.Redis, mailbox: Mailbox
) -> None:
    q = mailbox.queue(3)
    redis_client.lpush(q, raw(celery_message([{"id": "newest"}], "nn")))
    trigger = celery_message([{"id": "t"}], "trig")
    _record_unacked(redis_client, trigger, q, 5.0)
    other = celery_message([{"id": "o"}], "other")
    _record_unacked(redis_client, other, mailbox.queue(0), 4.0)
    redis_client.rpush(mailbox.inflight_key(3), raw(celery_message([{"id": "d"}], "dr")))
    assert mailbox.restore(3) == 2
    assert [m["headers"]["id"] for m in _queue(redis_client, mailbox, 3)] == [
        "id-trig",
        "id-dr",
        "id-nn",
    ]
    assert redis_client.hkeys(KOMBU_UNACKED) == [b"other"]


def test_settle_clears_in_flight_only_under_the_lease(
    redis_client: redis.Redis, mailbox: Mailbox
) -> None:
    redis_client.rpush(mailbox.inflight_key(0), b"x")
    key, _ = _lease(redis_client, mailbox, 0, "me|3")
    assert not mailbox.settle(0, (key, "me|2"))
    assert redis_client.llen(mailbox.inflight_key(0)) == 1
    assert mailbox.settle(0, (key, "me|3"))
    assert redis_client.llen(mailbox.inflight_key(0)) == 0


def test_a_payload_integer_beyond_64_bits_is_decoded_exactly() -> None:
    big = 123456789012345678901234567890  # orjson alone would read 1.2345678901234568e+29
    msg = celery_message([{"id": "a", "payload": {"by": big, "n": -(2**63) - 1}}], "t1")
    got = decode(raw(msg), TASKS, DISPATCH_TASK)
    assert got.problem is None
    assert got.envelopes[0]["payload"] == {"by": big, "n": -(2**63) - 1}
