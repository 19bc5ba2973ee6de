"""What is left on the broker: queued, delivered-but-unacked, and drained-but-uncommitted
messages of this run's partitions, and whether any poison is among them."""

from __future__ import annotations

import dataclasses

import redis

from keyq import mailbox
from keyq.chaos.poison import MARKER
from keyq.settings import Settings


def backlog(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """Messages not yet committed-and-acked, by where they sit."""
    pending = mailbox.backlog(client, settings)
    return {**dataclasses.asdict(pending), "total": pending.total}


def poison_left(client: redis.Redis, settings: Settings) -> int:
    """Poison messages still on the broker (queued, in flight, unacked or awaiting a dead
    letter)."""
    marker = MARKER.encode()
    return sum(marker in m for m in mailbox.pending_messages(client, settings))
