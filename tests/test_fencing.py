"""Leases with fencing tokens: a grant is exclusive, every grant gets a larger token, and a
paused former owner's pending write is refused once a newer owner has taken the partition."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis

from keyq.client import Client
from keyq.ownership import Leases
from keyq.repo import Repo
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll
from tests.ownership_helpers import database_url  # noqa: F401  (PostgreSQL only)


def test_a_lease_is_exclusive_and_every_grant_has_a_larger_token(
    redis_client: redis.Redis, settings: Settings
) -> None:
    leases = Leases(redis_client, settings.with_(lease_ttl_ms=200))
    first = leases.claim(3, "node-a")
    assert first is not None
    assert leases.claim(3, "node-b") is None, "a held lease is refused to others"
    assert leases.claim(3, "node-a") == first, "re-asserting our own lease keeps its token"
    assert leases.renew("node-b", {3: first}) == {3: False}
    assert leases.release(3, "node-b", first) is False, "only the holder may release"
    assert leases.release(3, "node-a", first) is True
    second = leases.claim(3, "node-b")
    assert second is not None and second > first
    poll(lambda: leases.claim(3, "node-a"), 5.0, 0.02, what="lease to expire and be re-granted")
    third = leases.holders()[3].token
    assert third > second
    assert leases.renew("node-b", {3: second}) == {3: False}, "an expired holder cannot renew"
    assert leases.release(3, "node-b", second) is False


def test_paused_owner_write_is_refused_after_takeover(
    start_worker: WorkerFactory, client: Client, repo: Repo, settings: Settings, tmp_path: Path
) -> None:
    mark = tmp_path / "inside-handler"
    # queued before any worker runs, so one batch holds them all: the first message pauses the
    # first worker inside its handler, after it took the other two into its in-flight list
    client.send("slow", "k", "see", {"i": 0, "mark": str(mark), "seconds": 1.0})
    client.send("slow", "k", "see", {"i": 1})
    client.send("slow", "k", "see", {"i": 2})
    first = start_worker()
    poll(mark.exists, what="the first worker to be inside the slow handler")
    first.signal(signal.SIGSTOP)
    try:
        second = start_worker()  # takes the partitions once the paused worker's leases expire
        client.send("slow", "k", "see", {"i": 3})

        def applied_by_second() -> bool:
            state = client.read("slow", "k") or {"log": []}
            return [entry[0]["i"] for entry in state["log"]] == [0, 1, 2, 3]

        poll(applied_by_second, what="the second worker to apply messages 0..3")
    finally:
        first.signal(signal.SIGCONT)
    poll(lambda: "keyq write refused" in first.log(), what="the resumed worker's refused write")

    stored = repo.load_one("slow", "k")
    assert stored is not None
    assert [entry[0]["i"] for entry in stored.state["log"]] == [0, 1, 2, 3]
    assert {entry[1] for entry in stored.state["log"]} == {second.pid}, "the new owner's state"
    assert stored.version == 4
    # the resumed node goes on serving (it rejoins and may take partitions back): nothing lost
    client.send("slow", "k", "see", {"i": 4})
    poll(
        lambda: (
            [e[0]["i"] for e in (client.read("slow", "k") or {"log": []})["log"]] == [0, 1, 2, 3, 4]
        ),
        what="a message after the resume to be applied once",
    )


@pytest.mark.parametrize("batch_max", [1])
def test_paused_owner_with_single_message_batches_loses_nothing(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    tmp_path: Path,
    batch_max: int,
) -> None:
    """Without a drain (batch of one) the lease check still runs before the batch is applied."""
    s = settings.with_(batch_max=batch_max, dedupe_window=max(batch_max, 16))
    mark = tmp_path / "inside-handler"
    with Client(s) as c:
        c.send("slow", "k", "see", {"i": 0, "mark": str(mark), "seconds": 1.0})
        c.send("slow", "k", "see", {"i": 1})
    first = start_worker(settings_override=s)
    poll(mark.exists, what="the first worker to be inside the slow handler")
    first.signal(signal.SIGSTOP)
    try:
        second = start_worker(settings_override=s)
        with Client(s) as c:
            c.send("slow", "k", "see", {"i": 2})
        poll(
            lambda: (
                [e[0]["i"] for e in (client.read("slow", "k") or {"log": []})["log"]] == [0, 1, 2]
            ),
            what="the second worker to apply 0..2",
        )
    finally:
        first.signal(signal.SIGCONT)
    poll(lambda: "keyq write refused" in first.log(), what="the resumed worker's refused write")
    state = client.read("slow", "k") or {"log": []}
    assert [e[0]["i"] for e in state["log"]] == [0, 1, 2]
    assert {e[1] for e in state["log"]} == {second.pid}
