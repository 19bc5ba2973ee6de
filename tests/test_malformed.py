"""Messages that reach a worker without going through the Client: malformed ones are
dead-lettered with their reason, pickled ones are never executed, and the partition goes on."""

from __future__ import annotations

import base64
import pathlib
from pathlib import Path
from typing import Any

import pytest
import redis

from keyq.celery_app import DISPATCH_TASK
from keyq.client import Client
from keyq.mailbox import KOMBU_UNACKED
from keyq.repo import Repo
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll
from tests.ops_helpers import free_port, scrape

pytestmark = pytest.mark.integration

PARTITION = 3


def key_on(settings: Settings, partition: int, prefix: str) -> str:
    return next(
        f"{prefix}-{i}"
        for i in range(10_000)
        if partition_for(f"{prefix}-{i}", settings.partitions) == partition
    )


def raw_send(client: Client, settings: Settings, args: list[Any], **options: Any) -> None:
    """Publish keyq.dispatch around the Client's validation, as a foreign producer could."""
    client.app.send_task(DISPATCH_TASK, args=args, queue=settings.queue_name(PARTITION), **options)


def seen(repo: Repo, key: str) -> list[Any]:
    stored = repo.load_one("sequence", key)
    return [] if stored is None else list(stored.state["seen"])


# (task args, words of the dead letter's error)
MALFORMED = [
    ([[{"bad": 1}]], "lacks field(s): id, entity, key, op, partition"),
    ([{"bad": 2}], "lacks field(s): id, entity, key, op, partition"),  # not a list
    (["just a string"], "must be a JSON object, got str"),
    ([[17, None]], "must be a JSON object, got int"),
]


def test_malformed_messages_to_a_running_worker_are_dead_lettered_and_later_ones_apply(
    start_worker: WorkerFactory, client: Client, settings: Settings, repo: Repo
) -> None:
    worker = start_worker()
    key = key_on(settings, PARTITION, "m")
    for i, (args, _) in enumerate(MALFORMED):
        raw_send(client, settings, args)
        client.send("sequence", key, "see", i)
    poll(lambda: seen(repo, key) == list(range(len(MALFORMED))), what="good messages after bad")
    letters = repo.dead_letters(limit=100)
    errors = [d.error_message for d in letters]
    for _, words in MALFORMED:
        assert any(words in e for e in errors), (words, errors)
    assert len(letters) == 5  # [17, None] is two bad envelopes
    assert {d.reason for d in letters} == {"malformed"}
    assert {d.partition for d in letters} == {PARTITION}
    assert worker.proc.poll() is None


def test_malformed_messages_drained_behind_a_good_one_are_dead_lettered(
    start_worker: WorkerFactory, client: Client, settings: Settings, repo: Repo
) -> None:
    key = key_on(settings, PARTITION, "d")
    client.send("sequence", key, "see", "first")  # the trigger; the rest is drained with it
    for i, (args, _) in enumerate(MALFORMED):
        raw_send(client, settings, args)
        client.send("sequence", key, "see", i)
    start_worker()
    expected = ["first", *range(len(MALFORMED))]
    poll(lambda: seen(repo, key) == expected, what="good messages around drained bad ones")
    assert len(repo.dead_letters(reason="malformed", limit=100)) == 5


def test_unknown_entity_and_operation_are_dead_lettered_as_unknown(
    start_worker: WorkerFactory, client: Client, settings: Settings, repo: Repo
) -> None:
    start_worker()
    key = key_on(settings, PARTITION, "u")
    good = client.envelope("sequence", key, "see", "x").to_wire()
    raw_send(client, settings, [[{**good, "id": "u1", "entity": "ghost"}]])
    raw_send(client, settings, [[{**good, "id": "u2", "op": "on_activate"}]])
    client.send("sequence", key, "see", "after")
    poll(lambda: seen(repo, key) == ["after"], what="the message after unknown ones")
    letters = {d.message_id: d for d in repo.dead_letters()}
    assert (
        letters["u1"].reason == "unknown"
        and "unknown entity 'ghost'" in letters["u1"].error_message
    )
    assert (
        letters["u2"].reason == "unknown"
        and "no operation 'on_activate'" in letters["u2"].error_message
    )


def test_garbage_on_a_partition_queue_does_not_stop_the_partition(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    repo: Repo,
    redis_client: redis.Redis,
) -> None:
    key = key_on(settings, PARTITION, "g")
    client.send("sequence", key, "see", 0)
    redis_client.lpush(settings.queue_name(PARTITION), b"not json at all {")
    client.send("sequence", key, "see", 1)
    worker = start_worker()
    client.send("sequence", key, "see", 2)
    poll(lambda: seen(repo, key) == [0, 1, 2], what="messages around broker garbage")
    assert worker.proc.poll() is None
    assert any("undecodable" in d.error_message for d in repo.dead_letters())


def test_garbage_alone_on_a_partition_is_dead_lettered_by_a_housekeeping_batch(
    start_worker: WorkerFactory, settings: Settings, repo: Repo, redis_client: redis.Redis
) -> None:
    """Nothing else arrives on the partition, so no batch takes the refused message along: the
    consumer loop's tick dead-letters it, counted as keyq_batches_total{start="housekeeping"}
    (it was counted as a fetch)."""
    port = free_port()
    start_worker(env={"KEYQ_METRICS_PORT": str(port)})
    queue = settings.queue_name(PARTITION)
    redis_client.lpush(queue, b"not json at all {")
    redis_client.lpush(queue + ":wake", 1)
    [dl] = poll(repo.dead_letters, what="the garbage's dead letter")  # type: ignore[misc]
    assert dl.reason == "undecodable" and base64.b64decode(dl.raw) == b"not json at all {"

    def batches() -> dict[str, float]:
        samples = scrape(port)
        return {
            labels[0][1]: value
            for (name, labels), value in samples.items()
            if name == "keyq_batches_total"
        }

    counted = poll(lambda: batches().get("housekeeping"), what="the housekeeping batch counted")
    assert counted == 1 and "fetch" not in batches(), batches()


class _Touch:
    """Unpickling this creates a file: the proof that a pickle was (or was not) executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.path,))


@pytest.mark.parametrize("worker_first", [True, False], ids=["consumed", "drained"])
def test_pickled_message_is_never_executed(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    repo: Repo,
    tmp_path: Path,
    worker_first: bool,
) -> None:
    marker = tmp_path / "unpickled"
    key = key_on(settings, PARTITION, "p")
    worker = start_worker() if worker_first else None
    if not worker_first:
        client.send("sequence", key, "see", "before")  # the pickle is drained behind it
    raw_send(client, settings, [[_Touch(marker)]], serializer="pickle")
    client.send("sequence", key, "see", "after")
    worker = worker or start_worker()
    expected = ["after"] if worker_first else ["before", "after"]
    poll(lambda: seen(repo, key) == expected, what="messages after the pickle")
    assert not marker.exists(), "a pickled message was deserialized by the worker"
    assert worker.proc.poll() is None
    # never handed to Celery (which would refuse and drop it): dead-lettered with its bytes
    [dl] = poll(repo.dead_letters, what="the pickle's dead letter")  # type: ignore[misc]
    assert "refused content type 'application/x-python-serialize'" in dl.error_message
    assert dl.reason == "undecodable" and dl.raw


@pytest.mark.parametrize("worker_first", [True, False], ids=["consumed", "drained"])
def test_wrong_task_shape_does_not_stop_the_partition(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    repo: Repo,
    redis_client: redis.Redis,
    worker_first: bool,
) -> None:
    key = key_on(settings, PARTITION, "w")
    worker = start_worker() if worker_first else None
    if not worker_first:
        client.send("sequence", key, "see", "before")
    raw_send(client, settings, [])  # no argument at all
    raw_send(client, settings, [[], "extra"])  # one argument too many
    client.app.send_task("os.system", args=["echo pwned"], queue=settings.queue_name(PARTITION))
    client.send("sequence", key, "see", "after")
    worker = worker or start_worker()
    expected = ["after"] if worker_first else ["before", "after"]
    poll(lambda: seen(repo, key) == expected, what="the message after wrongly shaped tasks")
    assert worker.proc.poll() is None
    client.send("sequence", key, "see", "later")
    poll(lambda: seen(repo, key) == [*expected, "later"], what="the partition to go on")
    # nothing was left unacked to be replayed at the next takeover
    # (the last trigger is acked just after its commit: poll)
    poll(lambda: redis_client.hlen(KOMBU_UNACKED) == 0, timeout=5, what="no unacked message left")


def test_nul_characters_do_not_stall_the_partition(
    start_worker: WorkerFactory, client: Client, settings: Settings, repo: Repo
) -> None:
    """PostgreSQL cannot store NUL: a foreign message carrying one is dead-lettered."""
    start_worker()
    key = key_on(settings, PARTITION, "nul")
    wire = client.envelope("sequence", key, "see", "x").to_wire()
    raw_send(client, settings, [[{**wire, "payload": "a\x00b"}]])
    raw_send(client, settings, [[{**wire, "id": "nul-key", "key": key + "\x00"}]])
    client.send("sequence", key, "see", "after")
    poll(lambda: seen(repo, key) == ["after"], what="the message after NUL ones")
    reasons = sorted((d.message_id, d.reason) for d in repo.dead_letters())
    # refused where they enter, before any handler runs
    assert reasons == sorted([(wire["id"], "malformed"), ("nul-key", "malformed")])


def test_compressed_message_applies_whether_consumed_or_drained(
    start_worker: WorkerFactory, client: Client, settings: Settings, repo: Repo
) -> None:
    key = key_on(settings, PARTITION, "z")
    first = client.envelope("sequence", key, "see", 0).to_wire()
    second = client.envelope("sequence", key, "see", 1).to_wire()
    raw_send(client, settings, [[first]], compression="zlib")  # consumed by Celery
    raw_send(client, settings, [[second]], compression="zlib")  # drained behind it
    start_worker()
    poll(lambda: len(seen(repo, key)) + len(repo.dead_letters()) >= 2, what="both handled")
    assert repo.dead_letters() == []
    assert seen(repo, key) == [0, 1]
