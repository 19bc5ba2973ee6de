"""Under a steady stream a worker goes from batch to batch without the broker fetch: the next
batch is taken in the post-commit round trip of the one before (Mailbox.drain_ready). On a real
worker: the batches it reports as followed on, every journal exactly as sent; and when the
reply of such a round trip is lost after Redis ran it (the next batch sits in the in-flight
lists, unseen by the worker), or the batch fails after it, nothing is lost, doubled or
reordered."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from keyq.client import Client
from keyq.repo import Repo
from keyq.settings import Settings
from tests import faults
from tests.conftest import WorkerFactory, poll
from tests.ops_helpers import free_port, scrape
from tests.ownership_helpers import keys_in_partition, sigterm_inside_a_slow_batch

pytestmark = pytest.mark.integration

KEYS = [f"s{i}" for i in range(16)]
ROUNDS = 40
ENTITY_MODULES = f"keyq.examples,tests.entities,{faults.MODULE}"


def journal(repo: Repo, key: str) -> list[Any]:
    stored = repo.load_one("journal", key)
    return [] if stored is None else list(stored.state["items"])


def stream(client: Client, pause_after: int | None = None) -> threading.Thread:
    """One producer sending round after round to every key, as fast as it can: messages keep
    arriving while the worker applies the ones before. With `pause_after`, it stops for a
    moment after that round (the worker goes idle: the next message comes through the fetch
    and its claim)."""

    def run() -> None:
        for n in range(ROUNDS):
            for k in KEYS:
                client.send("journal", k, "append", n)
            if n == pause_after:
                time.sleep(0.5)

    sender = threading.Thread(target=run, name="stream")
    sender.start()
    return sender


def all_applied(repo: Repo) -> bool:
    return all(journal(repo, k) == list(range(ROUNDS)) for k in KEYS)


def test_a_steady_stream_is_applied_batch_after_batch_without_the_fetch(
    start_worker: WorkerFactory, client: Client, repo: Repo
) -> None:
    port = free_port()
    start_worker(env={"KEYQ_METRICS_PORT": str(port)})
    stream(client).join(60)
    poll(lambda: all_applied(repo), timeout=60, what="every journal exactly as sent")
    samples = scrape(port)
    followed = samples.get(("keyq_batches_total", (("start", "follow"),)))
    fetched = samples.get(("keyq_batches_total", (("start", "fetch"),)))
    assert followed is not None and fetched is not None, sorted(
        k for k in samples if k[0].startswith("keyq_batches")
    )
    assert followed >= 1, f"no batch followed on: {followed} followed, {fetched} fetched"
    assert fetched >= 1  # the first batch of the stream came through the broker fetch
    assert repo.dead_letters() == []


def test_with_the_follow_on_switched_off_every_batch_begins_with_the_fetch(
    start_worker: WorkerFactory, client: Client, repo: Repo
) -> None:
    """KEYQ_FOLLOW_ON=0: the same stream, every journal as sent, and no batch followed on."""
    port = free_port()
    start_worker(env={"KEYQ_METRICS_PORT": str(port), "KEYQ_FOLLOW_ON": "0"})
    stream(client).join(60)
    poll(lambda: all_applied(repo), timeout=60, what="every journal exactly as sent")
    samples = scrape(port)
    followed = samples.get(("keyq_batches_total", (("start", "follow"),)), 0.0)
    fetched = samples.get(("keyq_batches_total", (("start", "fetch"),)))
    assert fetched is not None and fetched >= 2, fetched
    assert followed == 0, f"{followed} batches followed on with KEYQ_FOLLOW_ON=0"
    assert repo.dead_letters() == []


def test_a_batch_running_when_sigterm_comes_is_the_last_the_follow_on_takes_nothing_more(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """A warm shutdown finishes the batch in flight and hands the partition over: the
    messages that arrived meanwhile are the next owner's, not a follow-on batch of the worker
    that is leaving (it took them once the partition it holds had been served: CI, stop 22)."""
    partition = 2
    a = start_worker(partitions=str(partition))
    key = keys_in_partition(partition, settings, 1, "last")[0]
    sigterm_inside_a_slow_batch(client, a, key, tmp_path / "inside-handler")
    assert redis_client.llen(settings.queue_name(partition)) == 2, "left for the next owner"
    b = start_worker(partitions=str(partition))

    def log() -> list[Any]:
        return list((client.read("slow", key) or {"log": []})["log"])

    poll(lambda: [e[0]["i"] for e in log()] == [0, 1, 2], what="the next owner to apply 1, 2")
    assert [pid for _, pid in log()] == [a.pid, b.pid, b.pid]


def stream_under_fault(
    start_worker: WorkerFactory,
    client: Client,
    repo: Repo,
    fault: str,
    fired: str,
    pause_after: int | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """The stream on a worker with this fault: every journal exactly as sent, the worker alive,
    the fault fired (its log says `fired`), nothing dead-lettered."""
    worker = start_worker(
        env={faults.FAULTS_ENV: fault, "KEYQ_ENTITY_MODULES": ENTITY_MODULES, **(env or {})}
    )
    stream(client, pause_after).join(60)
    try:
        poll(lambda: all_applied(repo), timeout=60, what="every journal exactly as sent")
    except AssertionError as e:
        wrong = {k: journal(repo, k) for k in KEYS if journal(repo, k) != list(range(ROUNDS))}
        raise AssertionError(f"{e}; wrong journals {wrong}") from None
    assert worker.proc.poll() is None, worker.log()[-2000:]
    assert fired in worker.log(), "the fault never fired: the test proved nothing"
    assert repo.dead_letters() == []


def test_a_lost_follow_on_reply_loses_doubles_and_reorders_nothing(
    start_worker: WorkerFactory, client: Client, repo: Repo
) -> None:
    stream_under_fault(
        start_worker,
        client,
        repo,
        "follow-reply-lost=2",
        "injected fault: follow-on reply 2 lost",
    )


def test_a_batch_that_fails_after_taking_the_next_one_loses_nothing(
    start_worker: WorkerFactory, client: Client, repo: Repo
) -> None:
    """Something unplanned raises after the post-commit round trip took the next batch into
    the in-flight lists: that batch goes back to its queue heads, not left behind (a later
    claim's settle would have deleted it)."""
    stream_under_fault(
        start_worker,
        client,
        repo,
        "follow-then-fail=2",
        "injected fault: batch 2 that followed on failed after",
    )


def test_a_partition_given_up_after_a_failed_claim_is_not_followed_on_until_claimed_again(
    start_worker: WorkerFactory, client: Client, repo: Repo
) -> None:
    """A claim that fails (Redis errs) gives the partition up at once: its trigger waits in
    the unacked records for the restore of the next claim. Its lease is still this node's in
    Redis until then, so a follow-on drain that named it took the messages behind the trigger
    and applied them first (found by the batch fault walk: a journal read [.., 1, 3, 2, ..])."""
    stream_under_fault(
        start_worker,
        client,
        repo,
        "Mailbox.claim_batch=2",
        "injected fault in Mailbox.claim_batch (call 2)",
        pause_after=0,
        env={"KEYQ_FETCH_CLAIM": "0"},  # the worker claims what the fetch recorded
    )
