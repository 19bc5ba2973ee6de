"""Rendezvous assignment, as pure functions: every partition has one owner, and a join or a
leave moves only the partitions that must move (about 1/n of them)."""

from __future__ import annotations

from keyq.ownership import assignment, rendezvous_owner

PARTITIONS = 64


def owners(members: list[str]) -> dict[int, str]:
    return {p: m for m, ps in assignment(PARTITIONS, members).items() for p in ps}


def test_every_partition_has_exactly_one_owner() -> None:
    got = assignment(PARTITIONS, ["a", "b", "c"])
    all_assigned = [p for ps in got.values() for p in ps]
    assert sorted(all_assigned) == list(range(PARTITIONS))
    assert all(ps for ps in got.values()), "each of three members gets some of 64 partitions"


def test_assignment_does_not_depend_on_member_order_or_duplicates() -> None:
    assert assignment(PARTITIONS, ["c", "a", "b"]) == assignment(PARTITIONS, ["a", "b", "c", "a"])


def test_adding_a_third_node_moves_about_a_third_and_only_to_the_newcomer() -> None:
    before = owners(["node-a", "node-b"])
    after = owners(["node-a", "node-b", "node-c"])
    moved = [p for p in range(PARTITIONS) if before[p] != after[p]]
    assert all(after[p] == "node-c" for p in moved), "a join only moves partitions to the joiner"
    assert 64 // 3 - 10 <= len(moved) <= 64 // 3 + 10, f"moved {len(moved)} of 64"


def test_a_leaving_node_gives_up_only_its_own_partitions() -> None:
    before = owners(["node-a", "node-b", "node-c"])
    after = owners(["node-a", "node-c"])
    moved = [p for p in range(PARTITIONS) if before[p] != after[p]]
    assert moved == sorted(p for p in range(PARTITIONS) if before[p] == "node-b")


def test_moves_stay_near_one_over_n_over_many_memberships() -> None:
    total_moved = 0
    for n in range(2, 12):
        members = [f"host-{i}-{i * 7919}" for i in range(n)]
        before = owners(members)
        after = owners([*members, f"host-new-{n}"])
        total_moved += sum(1 for p in range(PARTITIONS) if before[p] != after[p])
    expected = sum(PARTITIONS / (n + 1) for n in range(2, 12))
    assert 0.6 * expected <= total_moved <= 1.4 * expected


def test_no_members_means_no_owner() -> None:
    assert rendezvous_owner(3, []) is None
    assert assignment(PARTITIONS, []) == {}
