"""Key -> partition routing: a jump consistent hash over a fixed digest.

Python's ``hash()`` is salted per process, so it would route one key to different partitions in
different producers. We digest the UTF-8 key with BLAKE2b (8 bytes) and feed the 64-bit integer to
Lamping and Veach's jump consistent hash, which moves only 1/n of the keys when n grows.

Every send routes its key and every worker re-checks the partition of each message it applies;
recently routed keys are remembered (a bounded LRU), so a hot key is hashed once.
"""

from __future__ import annotations

import functools
import hashlib

_MASK64 = (1 << 64) - 1
_JUMP_MULTIPLIER = 2862933555777941757  # the LCG constant of the published algorithm
ROUTE_CACHE_SIZE = 8192  # (key, partitions) -> partition pairs remembered per process


def key_digest(key: str) -> int:
    """A stable 64-bit digest of a key, the same on every machine and Python version."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


def jump_hash(digest: int, buckets: int) -> int:
    """Jump consistent hash (arXiv:1406.2294): a bucket in [0, buckets)."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    key = digest & _MASK64
    bucket, jump = -1, 0
    while jump < buckets:
        bucket = jump
        key = (key * _JUMP_MULTIPLIER + 1) & _MASK64
        jump = int((bucket + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return bucket


def partition_for(key: str, partitions: int) -> int:
    """The partition that owns a key."""
    return _route(key, partitions)


@functools.lru_cache(maxsize=ROUTE_CACHE_SIZE)
def _route(key: str, partitions: int) -> int:
    return jump_hash(key_digest(key), partitions)


def parse_partition_spec(spec: str, partitions: int) -> tuple[int, ...]:
    """Parse '0-7,12,20-21' into sorted partition numbers, refusing any out of range."""
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise ValueError(f"bad partition range {part!r} (use e.g. '0-7,12')") from None
        if lo > hi or lo < 0 or hi >= partitions:
            raise ValueError(f"partition range {part!r} is outside 0-{partitions - 1}")
        chosen.update(range(lo, hi + 1))
    if not chosen:
        raise ValueError(f"no partitions in {spec!r}")
    return tuple(sorted(chosen))


def split_partitions(partitions: int, parts: int) -> list[str]:
    """Split 0..partitions-1 into `parts` contiguous specs (for static worker layouts)."""
    specs = []
    for i in range(parts):
        lo = i * partitions // parts
        hi = (i + 1) * partitions // parts - 1
        if lo <= hi:
            specs.append(f"{lo}-{hi}")
    return specs
