"""The benchmark's pure helpers: percentiles interpolate, the Zipf sampler favours low ranks."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from keyq.bench.stats import (
    Sample,
    ZipfSampler,
    latency_summary_ms,
    paced_window,
    percentile,
    ratio,
)


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


def test_the_paced_window_leaves_out_the_connecting_messages_sent_before_the_start() -> None:
    # five producers connect over 0.4 s, then send 1,000 messages each at 1,000 msg/s from 10.0
    connecting = [Sample(0, 9.6 + 0.1 * i + 0.002, 0.002) for i in range(5)]
    paced = [Sample(0, 10.0 + i / 5000 + 0.003, 0.003) for i in range(5000)]
    achieved, kept = paced_window(connecting + paced, 10.0, 0.5)
    assert achieved == pytest.approx(5000, rel=0.01)
    assert len(kept) == 2500  # the half second of warm-up is counted from the paced start
    assert kept == [0.003] * 2500
    assert paced_window(connecting, 10.0, 0.5) == (None, [])
