"""Producers' registry lookups, counted in Redis so that one process can export them.

A producer (Client, AsyncClient) serves no metrics: its ``resolve`` calls are counted in one
Redis hash, ``<ns>:stats:registry``, by the pipeline that does the lookup itself (no extra round
trip): ``lookups`` goes up by one with each lookup. How long a lookup took, and whether it
failed, is known only after it: those figures wait in the producer and travel with its next
lookup, or with its ``close()`` (a lookup whose pipeline failed is counted then too). The
holder of partition 0 reads the hash with the other partition-wide figures and exports it
(keyq.cluster_metrics): ``keyq_producer_lookups_total``, ``keyq_producer_lookup_errors_total``
and the histogram ``keyq_producer_lookup_seconds``.

Fields: ``lookups``, ``errors``, ``timed`` (lookups whose latency arrived), ``seconds`` (their
sum), and ``le:<bound>`` (lookups that took at most this bound and more than the one before;
the exporter makes them cumulative).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from keyq.settings import Settings

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LOOKUPS, ERRORS, TIMED, SECONDS = "lookups", "errors", "timed", "seconds"


def stats_key(settings: Settings) -> str:
    return settings.redis_key("stats", "registry")


def bucket_field(bound: float) -> str:
    return f"le:{bound:g}"


@dataclass
class Pending:
    """Figures not yet in Redis."""

    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def merge(self, other: Pending) -> None:
        for name, n in other.counts.items():
            self.add(name, n)
        self.seconds += other.seconds


@dataclass(frozen=True)
class LookupFigures:
    """The hash as read back: what the exporter turns into metrics."""

    lookups: int = 0
    errors: int = 0
    timed: int = 0
    seconds: float = 0.0
    buckets: tuple[tuple[float, int], ...] = ()  # (upper bound, cumulative count)


def parse(raw: dict[Any, Any]) -> LookupFigures:
    """LookupFigures from HGETALL of the stats hash (bytes or str keys and values)."""
    fields = {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in raw.items()
    }
    cumulative = 0
    buckets = []
    for bound in BUCKETS:
        cumulative += int(fields.get(bucket_field(bound), 0))
        buckets.append((float(bound), cumulative))
    return LookupFigures(
        lookups=int(fields.get(LOOKUPS, 0)),
        errors=int(fields.get(ERRORS, 0)),
        timed=int(fields.get(TIMED, 0)),
        seconds=float(fields.get(SECONDS, 0.0)),
        buckets=tuple(buckets),
    )


class LookupStats:
    """One producer's side: thread-safe, cheap (a few commands added to a pipeline)."""

    def __init__(self, settings: Settings) -> None:
        self.key = stats_key(settings)
        self._lock = threading.Lock()
        self._pending = Pending()

    def add_to(self, pipe: Any, lookup: bool = True) -> Pending:
        """Queue this lookup's count (unless ``lookup`` is False) and every pending figure on
        ``pipe`` (a sync or asyncio pipeline: queuing does no I/O). Returns what was taken: hand
        it to ``give_back`` if the pipeline fails."""
        with self._lock:
            taken, self._pending = self._pending, Pending()
        if lookup:
            taken.add(LOOKUPS)
        for name, n in taken.counts.items():
            if n:
                pipe.hincrby(self.key, name, n)
        if taken.seconds:
            pipe.hincrbyfloat(self.key, SECONDS, taken.seconds)
        return taken

    def give_back(self, taken: Pending) -> None:
        """The pipeline that carried ``taken`` failed: keep its figures for the next one."""
        with self._lock:
            self._pending.merge(taken)

    def done(self, seconds: float, failed: bool) -> None:
        """A lookup ended after ``seconds``: its latency (and failure) wait for the next."""
        with self._lock:
            self._pending.add(TIMED)
            self._pending.seconds += seconds
            if failed:
                self._pending.add(ERRORS)
            for bound in BUCKETS:
                if seconds <= bound:
                    self._pending.add(bucket_field(bound))
                    break

    @property
    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending.counts)
