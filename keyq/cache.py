"""The hot-read cache: {version, state} per key in Redis, written only forward in version.

Workers write after their commit and ``Client.read`` fills on a miss; both go through one
compare-and-set Lua script, so a slow writer or a slow fill never moves an entry back. Beside
the entries Redis keeps, per namespace:

- a recency index (sorted set, member ``entity:key``, score = last read or write in ms), which
  the sweep (keyq.sweeper) uses to drop the least recently read entries first;
- read counts (sorted set, member ``entity:key``), which the reconciler uses to warm the
  most-read keys;
- hit and miss counters (hash), so every producer's reads add up to one ratio.

A read is one round trip (one Lua script) that returns the entry and updates all three.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from keyq import fast_json
from keyq.entity import JSON
from keyq.errors import CacheUnavailableError
from keyq.scripts import register
from keyq.settings import Settings

TOMBSTONE_TTL_MS = 60_000  # a swept entry keeps its version this long, against stale fills


@dataclass(frozen=True, slots=True)
class CachedState:
    version: int
    state: JSON


class StateCache:
    """Redis-backed, versioned, TTL'd copy of each active key's state."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._ttl_ms = int(settings.cache_ttl_s * 1000)
        self._set = register(client, "cache_set")
        self._read = register(client, "cache_read")
        self._drop = register(client, "cache_drop")
        self.prefix = settings.redis_key("c") + ":"
        self.recency_key = settings.redis_key("cache", "recency")
        self.reads_key = settings.redis_key("cache", "reads")
        self.stats_key = settings.redis_key("stats", "cache")

    # --- names -----------------------------------------------------------------------------

    def key_for(self, entity: str, key: str) -> str:
        return self.prefix + member(entity, key)

    # --- reads -----------------------------------------------------------------------------

    def read(self, entity: str, key: str) -> CachedState | None:
        """A counted read (one round trip): hit or miss, recency and read count updated."""
        m = member(entity, key)
        try:
            got = self._read(
                keys=[self.prefix + m, self.recency_key, self.reads_key, self.stats_key],
                args=[m],
            )
        except redis.RedisError as e:
            raise CacheUnavailableError(f"cache read of {entity}/{key} failed: {e}") from e
        if not got:
            return None
        return CachedState(int(got[0]), json.loads(got[1]))

    def get(self, entity: str, key: str) -> CachedState | None:
        """Peek at an entry without counting a read (tools, reconciler, tests)."""
        try:
            version, state = self.client.hmget(self.key_for(entity, key), ["v", "s"])
        except redis.RedisError as e:
            raise CacheUnavailableError(f"cache read of {entity}/{key} failed: {e}") from e
        if version is None or state is None:
            return None
        return CachedState(int(version), json.loads(state))

    def versions(self, pairs: Sequence[tuple[str, str]]) -> list[int | None]:
        """The cached version of each (entity, key), None where there is no live entry."""
        pipe = self.client.pipeline(transaction=False)
        for entity, key in pairs:
            k = self.key_for(entity, key)
            pipe.hget(k, "v")
            pipe.hexists(k, "s")
        raw = pipe.execute()
        return [
            int(raw[2 * i]) if raw[2 * i] is not None and raw[2 * i + 1] else None
            for i in range(len(pairs))
        ]

    # --- writes ----------------------------------------------------------------------------

    def put_many(
        self,
        entries: Sequence[tuple[str, str, int, JSON]],
        pipe: redis.client.Pipeline | None = None,
    ) -> int:
        """Compare-and-set many (entity, key, version, state); older versions are ignored.

        Returns how many were written (0 when queued on a pipeline: see its results).
        """
        if not entries:
            return 0
        keys = [self.recency_key]
        args: list[object] = [self._ttl_ms]
        for entity, key, version, state in entries:
            m = member(entity, key)
            keys.append(self.prefix + m)
            args.extend((version, fast_json.dumps_checked(state), m))
        written = self._set(keys=keys, args=args, client=pipe or self.client)
        return 0 if pipe is not None else int(written)

    def put(self, entity: str, key: str, version: int, state: JSON) -> bool:
        """One compare-and-set (the read-through fill); True if this version was written."""
        try:
            return self.put_many([(entity, key, version, state)]) == 1
        except redis.RedisError as e:
            raise CacheUnavailableError(f"cache write of {entity}/{key} failed: {e}") from e

    def drop(self, entity: str, key: str, version: int | None = None) -> bool:
        """Drop an entry (only if it still holds `version`, when given)."""
        m = member(entity, key)
        return bool(
            self._drop(
                keys=[self.prefix + m, self.recency_key],
                args=["" if version is None else str(version), m],
            )
        )

    # --- figures ---------------------------------------------------------------------------

    def size(self) -> int:
        """Entries in the recency index (the sweep's measure of the cache size)."""
        return int(self.client.zcard(self.recency_key))

    def stats(self) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.stats_key)
        pipe.zcard(self.recency_key)
        raw, size = pipe.execute()
        return {
            "hits": int(raw.get(b"hits", 0)),
            "misses": int(raw.get(b"misses", 0)),
            "keys": int(size),
        }

    def most_read(self, n: int) -> list[tuple[str, str, int]]:
        """The n most-read (entity, key, reads), most read first."""
        rows: Any = self.client.zrevrange(self.reads_key, 0, n - 1, withscores=True)
        return [(*parse_member(raw), int(score)) for raw, score in rows]

    def scan_index(self, cursor: int, count: int) -> tuple[int, list[tuple[str, str]]]:
        """One ZSCAN step over the recency index: (next cursor, (entity, key) pairs)."""
        next_cursor, rows = self.client.zscan(self.recency_key, cursor, count=count)
        return int(next_cursor), [parse_member(raw) for raw, _ in rows]

    def forget_index(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Remove index members whose entry is gone (expired) without dropping anything."""
        members = [member(e, k) for e, k in pairs]
        if members:
            self.client.zrem(self.recency_key, *members)


def member(entity: str, key: str) -> str:
    """The index member of a key; entity names never contain ':' (see keyq.entity)."""
    return f"{entity}:{key}"


def parse_member(raw: object) -> tuple[str, str]:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    entity, _, key = text.partition(":")
    return entity, key
