"""The benchmark's pure helpers: percentiles interpolate, the Zipf sampler favours low ranks."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from keyq.bench.stats import ZipfSampler, latency_summary_ms, percentile, ratio


def test_percentile_interpolates_between_samples() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile([], 95) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_latency_summary_is_in_milliseconds() -> None:
    summary = latency_summary_ms([0.001, 0.002, 0.003])
    assert summary["p50"] == pytest.approx(2.0)
    assert summary["max"] == pytest.approx(3.0)


def test_zipf_sampler_draws_low_ranks_most_and_stays_in_range() -> None:
    sampler = ZipfSampler(1000, 1.1, random.Random(7))
    counts = Counter(sampler.draws(20_000))
    assert min(counts) >= 0 and max(counts) < 1000
    assert counts[0] > counts[1] > counts[10] > counts.get(500, 0)
    assert counts[0] / 20_000 == pytest.approx(1 / sum(1 / k**1.1 for k in range(1, 1001)), rel=0.1)


def test_ratio_is_none_without_a_denominator() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(1.0, 0.0) is None
