"""What the producer's shortcuts (send's per-message cost) must keep: unique ids in their
documented formats, Celery's body bytes, redis-py's command bytes, the published routing."""

from __future__ import annotations

import base64
import json
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

from keyq.celery_app import make_app
from keyq.client import Client
from keyq.envelope import new_message_id, random_id
from keyq.publisher import EMBED, Publisher, uuid4_text, wake_key
from keyq.routing import jump_hash, key_digest, partition_for
from keyq.settings import Settings


def test_message_ids_are_32_hex_digits_and_never_repeat() -> None:
    ids = [new_message_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_threads_never_share_an_id() -> None:
    with ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(lambda _: [random_id() for _ in range(5000)], range(8)))
    ids = [i for batch in batches for i in batch]
    assert len(set(ids)) == len(ids) == 40_000


def test_a_forked_child_never_hands_out_its_parents_next_ids() -> None:
    random_id()  # this thread's ids are cut from the OS's random bytes: the pool is full
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first ids, to the parent
        os.write(write_end, " ".join(random_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {random_id() for _ in range(10)}
    assert len(child) == 10 and not child & parent


def test_task_ids_and_delivery_tags_are_uuid4_text() -> None:
    tags = [uuid4_text() for _ in range(10_000)]
    for tag in tags:
        parsed = uuid.UUID(tag)
        assert str(parsed) == tag and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert len(set(tags)) == len(tags)


def test_a_message_body_is_the_json_celery_writes(client: Client) -> None:
    wires = [
        client.envelope("counter", key, "add", {"by": n, "note": "é-ключ-🔑"}).to_wire()
        for n, key in enumerate(["a", "é", "🔑"])
    ]
    for shown in (wires, tuple(wires), wires[:1]):
        text = json.loads(client.publisher.builder.text(shown, "q"))
        body = base64.b64decode(text["body"]).decode("utf-8")
        assert body == json.dumps([[list(shown)], {}, EMBED])
        uuid.UUID(text["headers"]["id"])  # a batch's task id: Celery's uuid text


def test_the_packed_publish_is_what_redis_py_packs(settings: Settings) -> None:
    for s in (settings, settings.with_(publish_min_replicas=2)):
        with Client(s) as client:
            publisher = Publisher(client.broker, s, make_app(s))
            conn = client.broker.connection_pool.make_connection()
            for queue, limit in (("keyq.p3", 100), ("ключ.p0", 0)):
                message = '{"body": "é"}'.encode()
                head, tail = publisher._command(queue, limit)
                ours = head + b"$%d\r\n" % len(message) + message + tail
                evalsha = ("EVALSHA", publisher._sha, 2, queue, wake_key(queue), message, limit)
                expected = b"".join(conn.pack_command(*evalsha))  # type: ignore[no-untyped-call]
                if s.publish_min_replicas:
                    wait = ("WAIT", 2, s.publish_replica_timeout_ms)
                    expected += b"".join(conn.pack_command(*wait))  # type: ignore[no-untyped-call]
                assert ours == expected


def test_routing_remembers_keys_without_changing_their_partition() -> None:
    keys = [f"user-{i}" for i in range(2000)] + ["alice", "é-ключ-🔑"]
    for partitions in (1, 8, 64, 4096):
        for key in keys:
            expected = jump_hash(key_digest(key), partitions)
            assert partition_for(key, partitions) == expected
            assert partition_for(key, partitions) == expected  # the remembered answer
    assert partition_for("alice", 64) == 55 and partition_for("alice", 8) == 1  # docs/wire.md
