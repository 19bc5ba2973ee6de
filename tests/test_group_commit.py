"""Cross-partition group commit: batches of several partitions go to the Repo in ONE
transaction, each partition's fencing token checked, all or nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from keyq.activations import ActivationTable
from keyq.applier import Applier
from keyq.entity import EntityRegistry
from keyq.envelope import make_envelope
from keyq.errors import StaleWriteError
from keyq.repo import Repo
from keyq.routing import partition_for
from keyq.settings import Settings

PARTITIONS = 8


@pytest.fixture
def repo(database_url: str) -> Iterator[Repo]:
    r = Repo(database_url)
    yield r
    r.dispose()


@pytest.fixture
def applier(database_url: str, repo: Repo) -> Applier:
    settings = Settings(database_url=database_url, partitions=PARTITIONS)
    registry = EntityRegistry.from_modules(("keyq.examples",))
    return Applier(settings, registry, repo, ActivationTable(1000, 300.0))


def _keys_on_two_partitions() -> tuple[tuple[str, int], tuple[str, int]]:
    first = ("a0", partition_for("a0", PARTITIONS))
    i = 1
    while partition_for(f"a{i}", PARTITIONS) == first[1]:
        i += 1
    return first, (f"a{i}", partition_for(f"a{i}", PARTITIONS))


def _adds(applier: Applier, key: str, n: int) -> list[Any]:
    return [
        make_envelope(
            applier.registry,
            "counter",
            key,
            "add",
            {"by": 1},
            partitions=PARTITIONS,
            max_key_length=256,
            max_payload_bytes=65536,
        ).to_wire()
        for _ in range(n)
    ]


def test_group_commit_applies_every_partition_in_order_with_its_own_token(
    applier: Applier, repo: Repo
) -> None:
    (k1, p1), (k2, p2) = _keys_on_two_partitions()
    repo.record_fence(p1, 3)
    repo.record_fence(p2, 7)
    outcome = applier.apply_group([(p1, 3, _adds(applier, k1, 3)), (p2, 7, _adds(applier, k2, 2))])
    assert outcome.applied == 5
    one, two = repo.load_one("counter", k1), repo.load_one("counter", k2)
    assert one is not None and one.state == {"value": 3} and one.fence == 3
    assert two is not None and two.state == {"value": 2} and two.fence == 7
    assert [p for p, _ in outcome.sent] == [p1] * 3 + [p2] * 2


def test_group_commit_with_one_stale_partition_writes_nothing(applier: Applier, repo: Repo) -> None:
    (k1, p1), (k2, p2) = _keys_on_two_partitions()
    repo.record_fence(p1, 3)
    repo.record_fence(p2, 9)  # a newer owner of p2 exists
    with pytest.raises(StaleWriteError):
        applier.apply_group(
            [(p1, 3, _adds(applier, k1, 2)), (p2, 8, _adds(applier, k2, 2))],
            keep_trying=lambda: False,
        )
    assert repo.load_one("counter", k1) is None  # the healthy partition was not half-committed
    assert repo.load_one("counter", k2) is None
    assert len(applier.activations) == 0  # in-memory states of the failed batch are dropped
    outcome = applier.apply(p1, 3, _adds(applier, k1, 2))  # alone, p1 still commits
    assert outcome.applied == 2
    stored = repo.load_one("counter", k1)
    assert stored is not None and stored.state == {"value": 2}
