"""Dispatch latency (send to applied) at an asked rate, offered by enough producer processes.

Each producer process is an open-loop paced sender: message i leaves at t0 + i/rate whatever
happens to the earlier ones. One process offers at most PER_SENDER_RATE msg/s, so a higher rate
is split over several (spawned, started together behind a barrier). The achieved rate is read
from the workers' samples (messages over the span of their send times); a point whose producers
fell behind (achieved < FLAG_BELOW of asked) is flagged: its latency describes an overloaded
machine, not keyq.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from typing import Any

import redis

from keyq.bench.procs import latency_key, wait_for
from keyq.bench.stats import latency_summary_ms, parse_samples
from keyq.bench.workload import ENTITY, OP, bench_key
from keyq.client import Client
from keyq.settings import Settings

PER_SENDER_RATE = 1000.0  # msg/s one producer process is asked to offer at most
MAX_SENDERS = 8  # producer processes at most, whatever the rate
FLAG_BELOW = 0.95  # achieved under this share of the asked rate: the point is flagged
WARMUP_S = 0.5  # latency samples sent in the first half second are dropped


def senders_for(rate: float) -> int:
    """Producer processes that offer `rate` msg/s."""
    return max(1, min(MAX_SENDERS, math.ceil(rate / PER_SENDER_RATE)))


def dispatch_latency(
    settings: Settings, r: redis.Redis, rate: float, seconds: float, keys: int
) -> dict[str, Any]:
    """Send at `rate` for `seconds` (workers running); the send-to-applied latency summary."""
    lkey = latency_key(settings)
    r.delete(lkey)
    senders = senders_for(rate)
    total = int(rate * seconds)
    if senders == 1:
        sent, behind = paced_sender(settings, rate, total, keys, 0, 1, None)
    else:
        sent, behind = _in_processes(settings, rate, total, keys, senders, seconds)
    wait_for(lambda: int(r.llen(lkey)) >= sent, 60.0, "latency samples")
    samples = parse_samples(r.lrange(lkey, 0, -1))
    r.delete(lkey)
    first_sent = min(s.sent_at for s in samples)
    kept = [s.latency_s for s in samples if s.sent_at >= first_sent + WARMUP_S]
    summary = latency_summary_ms(kept)
    span = max(s.sent_at for s in samples) - first_sent
    achieved = len(samples) / span if span > 0 else None
    flagged = achieved is None or achieved < FLAG_BELOW * rate
    return {
        "asked": rate,
        "achieved": achieved,
        "flagged": flagged,
        "p50": summary["p50"],
        "p95": summary["p95"],
        "p99": summary["p99"],
        "rate_target": rate,
        "rate_achieved": achieved,
        "sent": sent,
        "senders": senders,
        "sender_behind_s": behind,
        "summary_ms": summary,
        "latencies_s": kept,
    }


def _in_processes(
    settings: Settings, rate: float, total: int, keys: int, senders: int, seconds: float
) -> tuple[int, float]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(senders + 1)
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_sender_process,
            args=(settings, rate / senders, total // senders, keys, i, senders),
            kwargs={"barrier": barrier, "results": queue},
            daemon=True,
        )
        for i in range(senders)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    results = [queue.get(timeout=seconds * 4 + 60) for _ in procs]
    for p in procs:
        p.join(10)
    return sum(r[0] for r in results), max(r[1] for r in results)


def paced_sender(
    settings: Settings,
    rate: float,
    total: int,
    keys: int,
    index: int,
    senders: int,
    barrier: Any,
) -> tuple[int, float]:
    """Open loop: message i goes at t0 + i/rate whatever the replies; returns (sent, how far
    behind schedule the sender fell at worst, in seconds)."""
    behind = 0.0
    with Client(settings) as client:
        client.send(ENTITY, bench_key(index), OP, {"by": 0})  # connect before the clock starts
        if barrier is not None:
            barrier.wait(timeout=120)
        t0 = time.monotonic()
        sent = 1
        for i in range(total):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                behind = max(behind, -delay)
            client.send(ENTITY, bench_key((i * senders + index) % keys), OP, {"by": 1})
            sent += 1
    return sent, behind


def _sender_process(
    settings: Settings,
    rate: float,
    total: int,
    keys: int,
    index: int,
    senders: int,
    *,
    barrier: Any,
    results: Any,
) -> None:
    results.put(paced_sender(settings, rate, total, keys, index, senders, barrier))
