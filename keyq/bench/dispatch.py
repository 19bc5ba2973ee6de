"""Dispatch latency (send to applied) at an asked rate, offered by enough producer processes.

Each producer process is an open-loop paced sender: message i leaves at t0 + i/rate whatever
happens to the earlier ones. One process offers at most PER_SENDER_RATE msg/s, so a higher rate
is split over several (spawned, started together behind a barrier). The achieved rate is read
from the workers' samples (the messages sent from the earliest paced start on, over the span of
their send times; each producer's connecting message is sent before it and left out); a point
whose producers fell behind (achieved < FLAG_BELOW of asked) is flagged: its latency describes
an overloaded machine, not keyq.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from typing import Any

import redis

from keyq.bench.procs import latency_key, wait_for
from keyq.bench.stats import latency_summary_ms, paced_window, parse_samples
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
        sent, behind, paced_from = paced_sender(settings, rate, total, keys, 0, 1, None)
    else:
        sent, behind, paced_from = _in_processes(settings, rate, total, keys, senders, seconds)
    wait_for(lambda: int(r.llen(lkey)) >= sent, 60.0, "latency samples")
    samples = parse_samples(r.lrange(lkey, 0, -1))
    r.delete(lkey)
    achieved, kept = paced_window(samples, paced_from, WARMUP_S)
    summary = latency_summary_ms(kept)
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
) -> tuple[int, float, float]:
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
    return sum(r[0] for r in results), max(r[1] for r in results), min(r[2] for r in results)


def paced_sender(
    settings: Settings,
    rate: float,
    total: int,
    keys: int,
    index: int,
    senders: int,
    barrier: Any,
) -> tuple[int, float, float]:
    """Open loop: message i goes at t0 + i/rate whatever the replies; returns (sent, how far
    behind schedule the sender fell at worst in seconds, the wall-clock time of t0)."""
    behind = 0.0
    with Client(settings) as client:
        client.send(ENTITY, bench_key(index), OP, {"by": 0})  # connect before the clock starts
        if barrier is not None:
            barrier.wait(timeout=120)
        t0 = time.monotonic()
        paced_from = time.time()
        sent = 1
        for i in range(total):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                behind = max(behind, -delay)
            client.send(ENTITY, bench_key((i * senders + index) % keys), OP, {"by": 1})
            sent += 1
    return sent, behind, paced_from


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
