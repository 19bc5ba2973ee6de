"""Routing: a key always lands on the same partition, on every machine, and growing the
partition count moves only about 1/n of the keys (jump consistent hash)."""

from __future__ import annotations

import ctypes
import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyq.routing import (
    jump_hash,
    key_digest,
    parse_partition_spec,
    partition_for,
    split_partitions,
)

# (digest, buckets) -> bucket, published by ClickHouse for its jumpConsistentHash
# (tests/queries/0_stateless/00580_consistent_hashing_functions.reference), an implementation
# independent of ours: if these move, every deployed key would move with them.
PUBLISHED_JUMP_VECTORS = [
    (1, 1, 0),
    (42, 57, 43),
    (256, 1024, 520),
    (3735883980, 1, 0),
    (3735883980, 666, 361),
    (16045690984833335023, 255, 237),
]

# key -> (blake2b-64 digest, partition of 8, of 64, of 4096), computed once with keyq 0.1.0.
# A change here re-routes live keys: it is a data migration, never a refactor.
FIXED_KEY_VECTORS = [
    ("alice", 0x4DEAEC0CCE54DA89, 1, 55, 1261),
    ("bob", 0x74F32B2BB966A492, 7, 50, 3532),
    ("user-1", 0x9AAC5A8621EAE188, 4, 32, 666),
    ("cart:42", 0x529DDA507432FFB6, 6, 46, 829),
    ("é-ключ-🔑", 0xD410E6A56D5956A8, 5, 22, 4035),
    ("x" * 256, 0x1350AD21B0246597, 3, 29, 3257),
]


def reference_jump_hash(key: int, num_buckets: int) -> int:
    """The paper's C++ (arXiv:1406.2294, figure 1) transcribed with C integer types."""
    k = ctypes.c_uint64(key)
    b, j = ctypes.c_int64(-1), ctypes.c_int64(0)
    while j.value < num_buckets:
        b.value = j.value
        k.value = k.value * 2862933555777941757 + 1  # c_uint64 wraps like unsigned long long
        j.value = int((b.value + 1) * (float(1 << 31) / float((k.value >> 33) + 1)))
    return b.value


@pytest.mark.parametrize(("digest", "buckets", "expected"), PUBLISHED_JUMP_VECTORS)
def test_jump_hash_matches_published_vectors(digest: int, buckets: int, expected: int) -> None:
    assert jump_hash(digest, buckets) == expected
    assert reference_jump_hash(digest, buckets) == expected


@pytest.mark.parametrize(("key", "digest", "p8", "p64", "p4096"), FIXED_KEY_VECTORS)
def test_partition_for_is_fixed_across_versions(
    key: str, digest: int, p8: int, p64: int, p4096: int
) -> None:
    assert key_digest(key) == digest
    expected = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    assert key_digest(key) == expected
    assert (partition_for(key, 8), partition_for(key, 64), partition_for(key, 4096)) == (
        p8,
        p64,
        p4096,
    )


def test_jump_hash_agrees_with_reference_implementation_on_random_digests() -> None:
    rng = random.Random(20240601)
    for _ in range(400):
        digest = rng.getrandbits(64)
        buckets = rng.choice([1, 2, 3, 7, 8, 64, 100, 1000, 4096, rng.randint(1, 5000)])
        assert jump_hash(digest, buckets) == reference_jump_hash(digest, buckets), (
            digest,
            buckets,
        )


def test_jump_hash_refuses_zero_buckets() -> None:
    with pytest.raises(ValueError, match="buckets must be >= 1"):
        jump_hash(123, 0)


@settings(max_examples=200, deadline=None)
@given(key=st.text(min_size=1, max_size=256), partitions=st.integers(1, 4096))
def test_same_key_always_routes_to_same_partition(key: str, partitions: int) -> None:
    first = partition_for(key, partitions)
    assert 0 <= first < partitions
    assert all(partition_for(key, partitions) == first for _ in range(3))


@pytest.mark.parametrize("n", [1, 4, 8, 63, 64])
def test_growing_partitions_moves_only_about_one_in_n_plus_one_keys(n: int) -> None:
    keys = [f"key-{i}" for i in range(20_000)]
    moved = [k for k in keys if partition_for(k, n) != partition_for(k, n + 1)]
    # every moved key goes to the new partition, never between old ones
    assert all(partition_for(k, n + 1) == n for k in moved)
    expected = len(keys) / (n + 1)
    assert 0.8 * expected <= len(moved) <= 1.2 * expected, (len(moved), expected)


def test_keys_spread_evenly_over_partitions() -> None:
    counts = [0] * 8
    for i in range(16_000):
        counts[partition_for(f"user-{i}", 8)] += 1
    assert min(counts) > 1_800 and max(counts) < 2_200, counts


@pytest.mark.parametrize(
    ("spec", "partitions", "expected"),
    [
        ("0-7", 8, tuple(range(8))),
        ("3", 8, (3,)),
        ("0-1,6-7", 8, (0, 1, 6, 7)),
        (" 5 , 1-2 ,, 2", 8, (1, 2, 5)),
        ("63", 64, (63,)),
    ],
)
def test_parse_partition_spec_accepts_ranges_and_lists(
    spec: str, partitions: int, expected: tuple[int, ...]
) -> None:
    assert parse_partition_spec(spec, partitions) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("8", "outside 0-7"),
        ("0-8", "outside 0-7"),
        ("5-2", "outside 0-7"),
        ("-1", "bad partition range"),
        ("a-b", "bad partition range"),
        ("1-2-3", "bad partition range"),
        ("", "no partitions"),
        (" , ", "no partitions"),
    ],
)
def test_parse_partition_spec_refuses_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_partition_spec(spec, 8)


@pytest.mark.parametrize(
    ("partitions", "parts", "expected"),
    [
        (8, 2, ["0-3", "4-7"]),
        (8, 3, ["0-1", "2-4", "5-7"]),
        (64, 4, ["0-15", "16-31", "32-47", "48-63"]),
        (3, 5, ["0-0", "1-1", "2-2"]),
        (8, 1, ["0-7"]),
    ],
)
def test_split_partitions_covers_every_partition_once(
    partitions: int, parts: int, expected: list[str]
) -> None:
    specs = split_partitions(partitions, parts)
    assert specs == expected
    covered = [p for s in specs for p in parse_partition_spec(s, partitions)]
    assert sorted(covered) == list(range(partitions))
