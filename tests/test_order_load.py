"""G2 per-key order and G3 once-only under load: two producer threads, two worker processes on
static partition halves, 10,000 messages over 100 keys; every key sees exactly its sends, in
order."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest

from keyq.client import Client
from keyq.repo import Repo
from keyq.routing import split_partitions
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll

pytestmark = pytest.mark.integration

PRODUCERS = 2
KEYS = 100
PER_KEY = 100  # 100 keys x 100 = 10,000 messages


def produce(settings: Settings, keys: list[str], seed: int, errors: list[BaseException]) -> None:
    """Send 0..PER_KEY-1 to each of its keys, interleaving its keys in a new order each round."""
    rng = random.Random(seed)
    try:
        with Client(settings) as client:
            order = list(keys)
            for n in range(PER_KEY):
                rng.shuffle(order)
                for key in order:
                    client.send("sequence", key, "see", n)
    except BaseException as e:  # surfaced in the test thread
        errors.append(e)


def test_every_key_sees_its_producers_sends_in_order_exactly_once(
    start_worker: WorkerFactory, settings: Settings, repo: Repo
) -> None:
    assert settings.partitions == 8
    for spec in split_partitions(settings.partitions, 2):  # "0-3" and "4-7"
        start_worker(partitions=spec)
    keys = [f"load-{i}" for i in range(KEYS)]
    owned = {t: keys[t::PRODUCERS] for t in range(PRODUCERS)}
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=produce, args=(settings, owned[t], t, errors), name=f"producer-{t}")
        for t in range(PRODUCERS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    expected = list(range(PER_KEY))

    def states() -> dict[str, Any]:
        loaded = repo.load([("sequence", k) for k in keys])
        return {key: loaded[("sequence", key)] for (_, key) in loaded}

    def all_done() -> bool:
        got = states()
        return len(got) == KEYS and all(len(s.state["seen"]) >= PER_KEY for s in got.values())

    poll(all_done, timeout=60, interval=0.2, what="10,000 messages applied")
    final = states()
    wrong = {k: s.state["seen"] for k, s in final.items() if s.state["seen"] != expected}
    assert not wrong, (
        f"{len(wrong)} key(s) out of order or duplicated, e.g. {next(iter(wrong.items()))}"
    )
    assert {s.version for s in final.values()} == {PER_KEY}
    assert repo.dead_letters() == []
