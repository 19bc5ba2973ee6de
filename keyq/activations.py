"""In-memory activations of one worker process: bounded, least recently used out first.

An activation holds a key's committed state between messages so that a hot key costs no Repo
read. Idle activations are passivated after the idle timeout, and the table never holds more
than ``max_activations``, so a million distinct keys pass through without memory growing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from keyq.dedupe import DedupeWindow
from keyq.entity import JSON, EntityType

KeyId = tuple[str, str]  # (entity, key)


@dataclass(slots=True)
class Activation:
    """A live key: its committed state, version and which messages it applied lately."""

    entity_type: EntityType
    key: str
    partition: int
    state: JSON
    version: int
    window: DedupeWindow = field(default_factory=DedupeWindow)
    last_used: float = field(default_factory=time.monotonic)
    name_renewed_at: float = float("-inf")  # never registered yet

    @property
    def id(self) -> KeyId:
        return (self.entity_type.name, self.key)


class ActivationTable:
    """LRU table of activations with an idle timeout and a hard cap."""

    def __init__(
        self,
        max_activations: int,
        idle_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_activations = max_activations
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._table: OrderedDict[KeyId, Activation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._table

    def __iter__(self) -> Iterator[Activation]:
        return iter(list(self._table.values()))

    def get(self, key_id: KeyId) -> Activation | None:
        """The activation, marked as just used (moves to the most recent end)."""
        act = self._table.get(key_id)
        if act is not None:
            act.last_used = self._clock()
            self._table.move_to_end(key_id)
        return act

    def put(self, act: Activation) -> list[Activation]:
        """Insert an activation; returns those evicted to keep within the cap (LRU first)."""
        act.last_used = self._clock()
        self._table[act.id] = act
        self._table.move_to_end(act.id)
        evicted: list[Activation] = []
        while len(self._table) > self.max_activations:
            _, old = self._table.popitem(last=False)
            evicted.append(old)
        return evicted

    def drop(self, key_id: KeyId) -> Activation | None:
        return self._table.pop(key_id, None)

    def drop_partition(self, partition: int) -> list[Activation]:
        gone = [a for a in self._table.values() if a.partition == partition]
        for act in gone:
            del self._table[act.id]
        return gone

    def idle(self, now: float | None = None) -> list[Activation]:
        """Remove and return activations idle for longer than the idle timeout."""
        now = self._clock() if now is None else now
        limit = now - self.idle_timeout_s
        gone: list[Activation] = []
        while self._table:
            key_id, act = next(iter(self._table.items()))
            if act.last_used > limit:
                break
            del self._table[key_id]
            gone.append(act)
        return gone

    def count_by_partition(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for act in self._table.values():
            counts[act.partition] = counts.get(act.partition, 0) + 1
        return counts
