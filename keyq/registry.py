"""The unique-name registry: (entity, key) -> the node whose process holds the activation.

A name is set when a key is activated, renewed while it is used, deleted on passivation (only
by its holder: compare-and-delete) and otherwise expires. A name whose node stopped
heartbeating resolves as not active; the reconciler deletes such leftovers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import redis

from keyq.scripts import register
from keyq.settings import Settings


@dataclass(frozen=True)
class Resolution:
    """Where a key lives now: its node, or nobody."""

    entity: str
    key: str
    node: str | None  # None: the key is not active anywhere
    heartbeat_age_ms: int | None = None

    @property
    def active(self) -> bool:
        return self.node is not None

    def to_json(self) -> dict[str, object]:
        return {
            "entity": self.entity,
            "key": self.key,
            "active": self.active,
            "node": self.node,
            "heartbeat_age_ms": self.heartbeat_age_ms,
        }


class NameRegistry:
    """Registry of active keys, kept in Redis beside the membership table."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._compare_delete = register(client, "compare_delete")
        self._register = register(client, "names_register")
        self._live = register(client, "live_members")
        # a name outlives its last use by the idle timeout plus slack, then expires by itself
        self.ttl_ms = int(settings.idle_timeout_s * 1000 * 1.5) + 4 * settings.lease_ttl_ms

    def name_key(self, entity: str, key: str) -> str:
        return self.settings.redis_key("n", entity, key)

    def register_many(
        self,
        pipe: redis.client.Pipeline,
        lease: tuple[str, str],
        names: Iterable[tuple[str, str]],
        node_id: str,
    ) -> None:
        """Queue the names' registration, fenced: the script sets them only while `lease`
        (key, value) still holds this writer's token (its reply is -1 when refused)."""
        keys = [self.name_key(entity, key) for entity, key in names]
        if keys:
            self._register(
                keys=[lease[0], *keys], args=[lease[1], node_id, self.ttl_ms], client=pipe
            )

    def release_many(
        self, pipe: redis.client.Pipeline, names: Iterable[tuple[str, str]], node_id: str
    ) -> None:
        for entity, key in names:
            self._compare_delete(keys=[self.name_key(entity, key)], args=[node_id], client=pipe)

    def resolve(self, entity: str, key: str) -> Resolution:
        node_raw = self.client.get(self.name_key(entity, key))
        if node_raw is None:
            return Resolution(entity, key, None)
        node = node_raw.decode() if isinstance(node_raw, bytes) else str(node_raw)
        rows = self._live(
            keys=[self.settings.redis_key("members")], args=[self.settings.lease_ttl_ms]
        )
        ages = {rows[i].decode(): int(rows[i + 1]) for i in range(0, len(rows), 2)}
        if node not in ages:
            return Resolution(entity, key, None)  # its node is gone: a leftover name
        return Resolution(entity, key, node, ages[node])

    def scan_names(self, count: int = 1000) -> Iterable[tuple[str, str]]:
        """Iterate (redis key, node) over all names (for the reconciler)."""
        pattern = self.settings.redis_key("n", "*")
        for raw_key in self.client.scan_iter(match=pattern, count=count):
            node = self.client.get(raw_key)
            if node is not None:
                yield (
                    raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key),
                    node.decode() if isinstance(node, bytes) else str(node),
                )

    def count_by_node(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, node in self.scan_names():
            counts[node] = counts.get(node, 0) + 1
        return counts
