"""The hot-read cache: {version, state} per key in Redis, written only forward in version.

Workers write after their commit (compare-and-set in Lua, so a slow writer never moves an entry
back); ``Client.read`` serves from here and fills on a miss. Hits and misses are counted in Redis
so every producer's reads add up to one ratio.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from keyq.entity import JSON
from keyq.errors import CacheUnavailableError
from keyq.scripts import register
from keyq.settings import Settings


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
        self._stats_key = settings.redis_key("stats", "cache")

    def key_for(self, entity: str, key: str) -> str:
        return self.settings.redis_key("c", entity, key)

    def get(self, entity: str, key: str) -> CachedState | None:
        try:
            version, state = self.client.hmget(self.key_for(entity, key), ["v", "s"])
        except redis.RedisError as e:
            raise CacheUnavailableError(f"cache read of {entity}/{key} failed: {e}") from e
        if version is None or state is None:
            return None
        return CachedState(int(version), json.loads(state))

    def put_many(
        self,
        entries: Sequence[tuple[str, str, int, JSON]],
        pipe: redis.client.Pipeline | None = None,
    ) -> None:
        """Compare-and-set many (entity, key, version, state); older versions are ignored."""
        if not entries:
            return
        keys = [self.key_for(e, k) for e, k, _, _ in entries]
        args: list[object] = [self._ttl_ms]
        for _, _, version, state in entries:
            args.append(version)
            args.append(json.dumps(state, separators=(",", ":")))
        self._set(keys=keys, args=args, client=pipe or self.client)

    def put(self, entity: str, key: str, version: int, state: JSON) -> None:
        try:
            self.put_many([(entity, key, version, state)])
        except redis.RedisError as e:
            raise CacheUnavailableError(f"cache write of {entity}/{key} failed: {e}") from e

    def drop(self, entity: str, key: str) -> None:
        self.client.delete(self.key_for(entity, key))

    def count(self, hit: bool) -> None:
        self.client.hincrby(self._stats_key, "hits" if hit else "misses", 1)

    def stats(self) -> dict[str, int]:
        raw = self.client.hgetall(self._stats_key)
        hits = int(raw.get(b"hits", 0))
        misses = int(raw.get(b"misses", 0))
        return {"hits": hits, "misses": misses}
