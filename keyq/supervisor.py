"""Restart intensity, OTP style: at most N restarts of an entity type within a time window.

When a handler raises, the worker drops the key's activation, reloads it from the Repo and
tries the message again after a backoff; this module decides whether another restart is
allowed or the message goes to the dead-letter table.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from keyq.entity import RestartPolicy

BACKOFF_BASE_S = 0.01  # first retry after 10 ms, doubling
BACKOFF_MAX_S = 0.5  # a retry never waits longer than this


def backoff_delay(attempt: int) -> float:
    """Exponential backoff for the n-th restart (attempt >= 1)."""
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2 ** max(0, attempt - 1))))


class RestartIntensity:
    """Sliding-window restart counter per entity type."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._restarts: dict[str, deque[float]] = {}
        self.total: dict[str, int] = {}

    def allow(self, entity: str, policy: RestartPolicy) -> bool:
        """Record a restart if the policy allows one more now; False means give up."""
        now = self._clock()
        window = self._restarts.setdefault(entity, deque())
        while window and window[0] <= now - policy.within_seconds:
            window.popleft()
        if len(window) >= policy.max_restarts:
            return False
        window.append(now)
        self.total[entity] = self.total.get(entity, 0) + 1
        return True

    def recent(self, entity: str) -> int:
        return len(self._restarts.get(entity, ()))
