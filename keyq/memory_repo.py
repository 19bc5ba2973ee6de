"""An in-memory stand-in for keyq.repo.Repo: the part the apply step uses, same commit rules.

keyq.testing runs the worker's real Applier without a database; what the Applier asks of its
Repo (load, load_one, load_timers, commit with fencing tokens, dead letters) is here in memory,
with the rules of the SQL version kept: a commit is all or nothing, refused (StaleWriteError) if
a partition's token is older than the newest recorded or a key's stored token is newer or its
version not older, and states cross it as JSON (a round trip, as through the database).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence

from keyq.activations import KeyId
from keyq.entity import JSON
from keyq.errors import StaleWriteError
from keyq.records import DeadLetter, StateWrite, StoredState, TimerChange, TimerRow


def json_copy(value: JSON) -> JSON:
    """What a round trip through the database or the broker leaves of a JSON value."""
    return json.loads(json.dumps(value, allow_nan=False))


class MemoryRepo:
    """The part of keyq.repo.Repo that the apply step uses, in memory, with the same rules:
    a commit is all or nothing; it is refused (StaleWriteError) if a partition's token is older
    than the newest recorded, or a key's stored token is newer or its version not older."""

    def __init__(self) -> None:
        self.rows: dict[KeyId, StoredState] = {}
        self.fences: dict[int, int] = {}
        self.timers: dict[KeyId, dict[str, TimerRow]] = {}
        self.dead: list[DeadLetter] = []
        self.commits = 0
        self.before_commit: Callable[[], None] | None = None  # fault hooks (one-shot)
        self.after_commit: Callable[[], None] | None = None

    # --- reads -----------------------------------------------------------------------------

    def load(self, keys: Iterable[KeyId]) -> dict[KeyId, StoredState]:
        found: dict[KeyId, StoredState] = {}
        for key_id in keys:
            row = self.rows.get(key_id)
            if row is not None:
                found[key_id] = StoredState(
                    json_copy(row.state),
                    row.version,
                    row.fence,
                    json_copy(row.recent_ids),
                    row.active,
                )
        return found

    def load_one(self, entity: str, key: str) -> StoredState | None:
        return self.load([(entity, key)]).get((entity, key))

    def load_timers(self, keys: Iterable[KeyId]) -> dict[KeyId, dict[str, TimerRow]]:
        return {k: dict(self.timers[k]) for k in keys if self.timers.get(k)}

    def due_timers(self, partitions: Iterable[int], now_ms: int, limit: int) -> list[TimerRow]:
        parts = set(partitions)
        due = [
            row
            for rows in self.timers.values()
            for row in rows.values()
            if row.partition in parts and row.due_ms <= now_ms
        ]
        return sorted(due, key=lambda r: r.due_ms)[:limit]

    def next_due_ms(self) -> int | None:
        dues = [row.due_ms for rows in self.timers.values() for row in rows.values()]
        return min(dues) if dues else None

    def partition_fence(self, partition: int) -> int:
        return self.fences.get(partition, 0)

    def dead_letters(self, **_: object) -> list[DeadLetter]:
        return list(self.dead)

    # --- writes ----------------------------------------------------------------------------

    def record_fence(self, partition: int, fence: int) -> None:
        if fence <= self.fences.get(partition, 0):
            raise StaleWriteError(f"partition {partition}: token {fence} was already granted")
        self.fences[partition] = fence

    def record_dead_letters(self, dead_letters: Sequence[DeadLetter]) -> None:
        self.dead.extend(dead_letters)

    def commit(
        self,
        partition: int,
        fence: int,
        writes: Sequence[StateWrite],
        dead_letters: Sequence[DeadLetter] = (),
        timers: Sequence[TimerChange] = (),
        others: Sequence[tuple[int, int, Sequence[StateWrite]]] = (),
    ) -> None:
        fenced = [(partition, fence, writes), *others]
        if not any(ws for _, _, ws in fenced) and not dead_letters and not timers:
            return
        hook, self.before_commit = self.before_commit, None
        if hook is not None:
            hook()
        for p, f, _ in fenced:
            if f < self.fences.get(p, 0):
                raise StaleWriteError(
                    f"partition {p}: fencing token {f} is older than the Repo's; "
                    "another node owns this partition now"
                )
        new_rows: dict[KeyId, StoredState] = {}
        for _, f, ws in fenced:
            for w in ws:
                old = self.rows.get((w.entity, w.key))
                if old is not None and (old.fence > f or old.version >= w.version):
                    raise StaleWriteError(f"write of {w.entity}/{w.key} refused (newer in Repo)")
                new_rows[(w.entity, w.key)] = StoredState(
                    json_copy(w.state), w.version, f, json_copy(w.recent_ids), w.active
                )
        # all checks passed: the transaction's effects, at once
        for p, f, _ in fenced:
            self.fences[p] = max(f, self.fences.get(p, 0))
        self.rows.update(new_rows)
        self.dead.extend(dead_letters)
        for change in timers:
            self._write_timer(change)
        self.commits += 1
        hook, self.after_commit = self.after_commit, None
        if hook is not None:
            hook()

    def _write_timer(self, change: TimerChange) -> None:
        rows = self.timers.setdefault((change.entity, change.key), {})
        if isinstance(change, TimerRow):
            rows[change.name] = change
            return
        current = rows.get(change.name)
        if current is not None and change.timer_id in (None, current.timer_id):
            del rows[change.name]
