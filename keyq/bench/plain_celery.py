"""Dispatch latency on an idle worker: plain-Celery publishes against keyq's Client.

A producer without keyq publishes a `keyq.dispatch` task with Celery's own `send_task`
(docs/wire.md) and leaves no wake token, so an idle worker, blocked on its wake lists, finds
the message only when that wait times out (keyq.celery_app.BRPOP_TIMEOUT_S, 50 ms asked; Redis
ends a blocking wait at its next timer event, every 1000/hz ms, so with the default hz 10 the
wait lasts about 100 ms), rather than at once as it does for a `Client.send`.

Messages go one at a time, the two producers taking turns, each once the previous one was
applied. Before a plain-Celery message the workers are left idle for one wait period plus a
random part of two more (50-150 ms): past the wait that began with the last apply, the message
lands at a random point of the waits that follow, as it would on a worker idle for long (a
fixed pause would lock onto one phase of the cycle; two periods of 50 ms, or one of Redis's
100 ms timer, are covered evenly); a Client message wakes the worker with its token whatever
the phase, so a short pause is enough before it. Latency is send to applied, as the workers'
latency hook reports it (the envelope's `sent_at` to the worker's clock after the commit). The
Redis wait itself is measured too: a BRPOP with the workers' timeout on an empty list.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

import redis
from celery import Celery

from keyq.bench.procs import latency_key
from keyq.bench.stats import latency_summary_ms, parse_samples, percentile
from keyq.bench.workload import ENTITY, OP, bench_key
from keyq.celery_app import BRPOP_TIMEOUT_S, DISPATCH_TASK
from keyq.client import Client
from keyq.routing import partition_for
from keyq.settings import Settings

WARMUP = 3  # untimed messages per producer first
APPLY_TIMEOUT_S = 30.0
CLIENT_PAUSE_S = 0.02  # before a Client message: its wake token makes the phase irrelevant
WAIT_PROBES = 5  # timed BRPOPs on an empty list


def brpop_wait_ms(r: redis.Redis, timeout_s: float) -> float | None:
    """The median time a BRPOP with this timeout takes to give up on an empty list."""
    key = f"keyq-bench-empty-{uuid.uuid4().hex}"
    waits = []
    for _ in range(WAIT_PROBES):
        started = time.perf_counter()
        r.brpop([key], timeout=timeout_s)
        waits.append((time.perf_counter() - started) * 1000)
    return percentile(waits, 50)


def redis_hz(r: redis.Redis) -> int | None:
    """The server's hz (its timer frequency), if CONFIG GET is allowed."""
    try:
        value = r.config_get("hz").get("hz")
    except redis.RedisError:
        return None
    return int(value) if value is not None else None


def plain_envelope(settings: Settings, key: str) -> dict[str, Any]:
    """The envelope of docs/wire.md, built without keyq's producer."""
    partition = partition_for(key, settings.partitions)
    return {
        "v": 1,
        "id": uuid.uuid4().hex,
        "entity": ENTITY,
        "key": key,
        "op": OP,
        "payload": {"by": 1},
        "partition": partition,
        "reply": False,
        "sent_at": time.time(),
    }


def idle_dispatch(
    settings: Settings,
    r: redis.Redis,
    client: Client,
    app: Celery,
    count: int,
    keys: int,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """`count` messages from each producer, taking turns (which goes first alternates), on
    idle workers; returns the two latency summaries (ms) and the messages sent (adds)."""
    rng = rng or random.Random(0)
    lkey = latency_key(settings)
    r.delete(lkey)
    period = BRPOP_TIMEOUT_S
    pauses = {
        "celery": (period, 3 * period),  # past the first wait, then a random phase
        "client": (CLIENT_PAUSE_S, CLIENT_PAUSE_S),
    }
    out: dict[str, list[float]] = {"client": [], "celery": []}

    def one(side: str, i: int, keep: bool) -> None:
        time.sleep(rng.uniform(*pauses[side]))
        key = bench_key(i % keys)
        if side == "client":
            client.send(ENTITY, key, OP, {"by": 1})
        else:
            envelope = plain_envelope(settings, key)
            queue = settings.queue_name(envelope["partition"])
            app.send_task(DISPATCH_TASK, args=[[envelope]], queue=queue, task_id=envelope["id"])
        got = r.blpop([lkey], timeout=APPLY_TIMEOUT_S)
        if got is None:
            raise TimeoutError(f"a {side} message was not applied within {APPLY_TIMEOUT_S:g} s")
        if keep:
            out[side].append(parse_samples([got[1]])[0].latency_s)

    for i in range(WARMUP + count):
        order = ("client", "celery") if i % 2 == 0 else ("celery", "client")
        for side in order:
            one(side, i, keep=i >= WARMUP)
    r.delete(lkey)
    client_ms = latency_summary_ms(out["client"])
    celery_ms = latency_summary_ms(out["celery"])
    return {
        "messages_each": count,
        "celery_pause_ms": [pauses["celery"][0] * 1000, pauses["celery"][1] * 1000],
        "client_pause_ms": CLIENT_PAUSE_S * 1000,
        "wake_wait_asked_ms": period * 1000,
        "wake_wait_ms": brpop_wait_ms(r, period),
        "redis_hz": redis_hz(r),
        "client_p50_ms": client_ms["p50"],
        "client_p95_ms": client_ms["p95"],
        "celery_p50_ms": celery_ms["p50"],
        "celery_p95_ms": celery_ms["p95"],
        "client_ms": client_ms,
        "celery_ms": celery_ms,
        "adds": 2 * (WARMUP + count),
    }
