"""Pure helpers of the benchmark: percentiles, a bounded Zipf sampler, medians of runs, the
workers' latency samples."""

from __future__ import annotations

import bisect
import itertools
import math
import random
import statistics
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_summary_ms(samples_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max in milliseconds of latencies given in seconds."""
    ms = [s * 1000.0 for s in samples_s]
    return {
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else None,
        "count": float(len(ms)),
    }


class ZipfSampler:
    """Draws ranks 0..n-1 with P(rank k) proportional to 1/(k+1)**s (a bounded Zipf law)."""

    def __init__(self, n: int, s: float, rng: random.Random | None = None) -> None:
        if n < 1:
            raise ValueError("a Zipf sampler needs at least one rank")
        if s <= 0:
            raise ValueError("the Zipf exponent must be positive")
        self.n = n
        self.s = s
        self._rng = rng or random.Random(0)
        weights = [1.0 / (k + 1) ** s for k in range(n)]
        self._cumulative = list(itertools.accumulate(weights))

    def draw(self) -> int:
        x = self._rng.random() * self._cumulative[-1]
        return min(bisect.bisect_right(self._cumulative, x), self.n - 1)

    def draws(self, count: int) -> list[int]:
        return [self.draw() for _ in range(count)]


def median_or_none(values: Sequence[float | None]) -> float | None:
    """The median of the values that were measured (None if none were)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


class Sample:
    """One applied message as a worker reported it: partition, applied at, send-to-applied."""

    __slots__ = ("applied_at", "latency_s", "partition")

    def __init__(self, partition: int, applied_at: float, latency_s: float) -> None:
        self.partition = partition
        self.applied_at = applied_at
        self.latency_s = latency_s

    @property
    def sent_at(self) -> float:
        return self.applied_at - self.latency_s


def parse_samples(raw: Iterable[bytes | str]) -> list[Sample]:
    """Lines "<partition> <applied_at> <latency_s>" pushed by keyq.bench.latency_hook."""
    out = []
    for item in raw:
        text = item.decode() if isinstance(item, bytes) else item
        p, applied, latency = text.split()
        out.append(Sample(int(p), float(applied), float(latency)))
    return out


def paced_window(
    samples: Sequence[Sample], paced_from: float, warmup_s: float
) -> tuple[float | None, list[float]]:
    """The achieved rate of the messages sent from `paced_from` on (wall clock, the earliest
    paced start of the producers) and the latencies of those sent after the warm-up.

    A producer's connecting message goes out before the producers are released together, so
    it is left out: counted, it stretched the span over the producers' start-up and read as a
    producer falling behind (5,000 msg/s asked read 4,566 achieved, every sender on time)."""
    paced = [s for s in samples if s.sent_at >= paced_from]
    span = max((s.sent_at for s in paced), default=paced_from) - paced_from
    achieved = len(paced) / span if span > 0 else None
    kept = [s.latency_s for s in paced if s.sent_at >= paced_from + warmup_s]
    return achieved, kept
