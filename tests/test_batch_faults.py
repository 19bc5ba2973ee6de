"""Whatever raises inside a batch, each message the batch took ends committed and acked, back at
the head of its own queue in order, or dead-lettered: faults are injected into a real worker at
each step of the batch (tests/faults.py), under a journal load over several partitions, and the
journal invariant is checked (nothing lost, doubled or reordered)."""

from __future__ import annotations

from typing import Any

import pytest

from keyq.client import Client
from keyq.repo import Repo
from keyq.settings import Settings
from tests import faults
from tests.conftest import WorkerFactory, poll
from tests.ownership_helpers import database_url  # noqa: F401  (PostgreSQL only)

pytestmark = pytest.mark.integration

KEYS = [f"k{i}" for i in range(24)]
ROUNDS = 12

# (where, on which call): every Redis call of a batch, the parse, the handler step, the commit,
# each post-commit write
FAULT_POINTS = [
    "Mailbox.claim_batch=3",  # with KEYQ_FETCH_CLAIM=0: the worker claims what the fetch recorded
    "WorkerRuntime.handle_claimed=3",  # the delivery of what the fetch claimed itself
    "Mailbox.drain_many=2",
    "Mailbox.drain_ready=3",
    "Mailbox.settle=2",
    "Applier._parse=2",
    "Applier._run_key=5",
    "Applier._load_missing=1",
    "Repo.commit=2",
    "StateCache.put_many=2",
    "NameRegistry.register_many=2",
    "WorkerRuntime._count=2",
]


def journal(repo: Repo, key: str) -> list[Any]:
    stored = repo.load_one("journal", key)
    return [] if stored is None else list(stored.state["items"])


@pytest.mark.parametrize("fault", FAULT_POINTS)
def test_a_fault_at_any_step_of_a_batch_loses_doubles_and_reorders_nothing(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    repo: Repo,
    fault: str,
) -> None:
    worker = start_worker(
        env={
            faults.FAULTS_ENV: fault,
            "KEYQ_ENTITY_MODULES": f"keyq.examples,tests.entities,{faults.MODULE}",
            "KEYQ_FETCH_CLAIM": "0" if fault.startswith("Mailbox.claim_batch") else "1",
        }
    )
    for n in range(ROUNDS):
        client.send_many("journal", [(k, "append", n) for k in KEYS])
        if n % 4 == 0:
            client.send("journal", KEYS[n], "append", "single")
        # one round at a time: at least one batch per round, whatever the machine's speed,
        # so the fault's call number is reached
        poll(
            lambda n=n: len(journal(repo, KEYS[-1])) >= n + 1,
            timeout=30,
            what=f"round {n} applied",
        )
    expected = {k: [] for k in KEYS}
    for n in range(ROUNDS):
        for k in KEYS:
            expected[k].append(n)
        if n % 4 == 0:
            expected[KEYS[n]].append("single")
    try:
        poll(
            lambda: all(journal(repo, k) == expected[k] for k in KEYS),
            timeout=60,
            what=f"every journal exactly as sent despite the fault {fault}",
        )
    except AssertionError as e:
        wrong = {k: journal(repo, k) for k in KEYS if journal(repo, k) != expected[k]}
        raise AssertionError(f"{e}; wrong journals {wrong}\n{worker.log()[-4000:]}") from None
    assert worker.proc.poll() is None, worker.log()[-2000:]
    assert "injected fault" in worker.log(), "the fault never fired: the test proved nothing"
    assert repo.dead_letters() == []


def test_data_the_database_refuses_is_dead_lettered_alone_and_the_rest_committed(
    start_worker: WorkerFactory, client: Client, repo: Repo
) -> None:
    """A non-transient database error is isolated to the message that caused it: the batch is
    split (its messages applied one by one), the culprit is dead-lettered with the database's
    words, and every other message is committed once and in order."""
    start_worker(
        env={
            faults.FAULTS_ENV: "refuse-state=BAD",
            "KEYQ_ENTITY_MODULES": f"keyq.examples,tests.entities,{faults.MODULE}",
        }
    )
    for n in range(6):
        client.send_many("journal", [(k, "append", n) for k in KEYS])
        if n == 2:
            client.send("journal", KEYS[5], "append", "BAD")
    poll(lambda: repo.dead_letters(), what="the refused message's dead letter")
    [dl] = repo.dead_letters()
    assert dl.reason == "data" and dl.key == KEYS[5]
    assert "refuses a state holding 'BAD'" in dl.error_message
    poll(
        lambda: all(journal(repo, k) == list(range(6)) for k in KEYS),
        timeout=60,
        what="every other message applied once, in order",
    )
