"""The cache sweep: keeps the hot-read cache within KEYQ_CACHE_MAX_KEYS, least recently read out.

It runs out of band (its own beat task, and at the end of each reconciler run), never inside a
worker's batch: each Lua step touches at most `batch` entries, and a call stops at its time
budget, so Redis is never held for long and a sweep never delays a partition's messages.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

from keyq import metrics
from keyq.cache import TOMBSTONE_TTL_MS, StateCache
from keyq.scripts import register
from keyq.settings import Settings

log = logging.getLogger(__name__)

SWEEP_STEP = 500  # entries one Lua step may touch (bounds the time Redis is busy)


@dataclass
class SweepReport:
    """What one sweep did."""

    dropped: int = 0  # entries evicted to get back within the size limit
    expired: int = 0  # index members whose entry had expired already
    reads_trimmed: int = 0  # least-read members trimmed from the read counts
    size: int = 0  # entries in the cache after the sweep
    steps: int = 0
    duration_s: float = 0.0
    budget_exhausted: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class CacheSweeper:
    """Bounded, idempotent sweep steps; safe to run from several processes at once."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.cache = StateCache(client, settings)
        self._sweep = register(client, "cache_sweep")

    def sweep(
        self, budget_s: float | None = None, max_entries: int | None = None, step: int = SWEEP_STEP
    ) -> SweepReport:
        """Drop least recently read entries until within the limit, the budget or max_entries."""
        budget_s = self.settings.reconcile_budget_s if budget_s is None else budget_s
        max_entries = self.settings.reconcile_batch if max_entries is None else max_entries
        started = time.monotonic()
        report = SweepReport()
        while True:
            room = max_entries - report.dropped - report.expired
            if room <= 0:
                report.budget_exhausted = True
                break
            expired, dropped, size, trimmed = self._sweep(
                keys=[self.cache.recency_key, self.cache.reads_key],
                args=[
                    self.cache.prefix,
                    self.settings.cache_max_keys,
                    min(step, room),
                    int(self.settings.cache_ttl_s * 1000),
                    TOMBSTONE_TTL_MS,
                    self.settings.cache_max_keys,
                ],
            )
            report.steps += 1
            report.expired += int(expired)
            report.dropped += int(dropped)
            report.reads_trimmed += int(trimmed)
            report.size = int(size)
            if size <= self.settings.cache_max_keys and not (expired or trimmed):
                break
            if time.monotonic() - started > budget_s:
                report.budget_exhausted = size > self.settings.cache_max_keys
                break
        report.duration_s = time.monotonic() - started
        metrics.cache_sweep_seconds.observe(report.duration_s)
        if report.dropped:
            metrics.cache_swept.labels("evicted").inc(report.dropped)
        if report.expired:
            metrics.cache_swept.labels("expired").inc(report.expired)
        metrics.cache_keys.set(report.size)
        if report.dropped or report.expired:
            log.info(
                "keyq cache sweep dropped=%d expired=%d size=%d duration_ms=%.1f budget_hit=%s",
                report.dropped,
                report.expired,
                report.size,
                report.duration_s * 1000,
                report.budget_exhausted,
            )
        return report
