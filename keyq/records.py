"""The records that the Repo stores and the handler API sees: timers, states, dead letters.

Plain frozen dataclasses with no database in sight, so handler code (keyq.context) and the
apply step can use them without importing SQLAlchemy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from keyq.entity import JSON


@dataclass(frozen=True, slots=True)
class TimerRow:
    """A pending timer of one key: fire `op` with `payload` at due_ms (then every every_ms)."""

    entity: str
    key: str
    name: str
    timer_id: str  # new for every schedule: with due_ms it makes the fire's message id
    partition: int
    due_ms: int
    op: str
    payload: JSON = None
    every_ms: int | None = None
    catch_up: str = "coalesce"  # "coalesce" | "skip" | "each"


@dataclass(frozen=True, slots=True)
class TimerDelete:
    """A timer of one key to delete in the batch's commit (fired or cancelled)."""

    entity: str
    key: str
    name: str
    timer_id: str | None = None  # set: delete only if the row is still this timer


TimerChange = TimerRow | TimerDelete


@dataclass(frozen=True, slots=True)
class StoredState:
    """A key's durable state as loaded from the Repo."""

    state: JSON
    version: int
    fence: int
    recent_ids: JSON  # the dedupe window as stored (keyq.dedupe)
    active: bool


@dataclass(frozen=True, slots=True)
class StateWrite:
    """The new durable state of one key after a batch."""

    entity: str
    key: str
    state: JSON
    version: int
    recent_ids: JSON  # the dedupe window as stored (keyq.dedupe)
    active: bool = True


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be applied, kept with why."""

    message_id: str
    entity: str
    key: str
    op: str
    partition: int
    envelope: JSON
    reason: str  # "malformed" | "unknown" | "crashed" | "undecodable" | "max-deliveries" ...
    error_type: str
    error_message: str
    traceback: str = ""
    attempts: int = 0
    raw: str | None = None  # the broker message as it arrived, base64 (when it was unreadable)
    deliveries: int = 0  # earlier deliveries of its broker message that ended unapplied
    id: int | None = None
    created_at: datetime | None = field(default=None, compare=False)
