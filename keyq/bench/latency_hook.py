"""Benchmark instrumentation, injected into a worker from outside (never in production code).

The benchmark lists this module in the workers' KEYQ_ENTITY_MODULES; importing it adds a
writer to WorkerRuntime.post_commit_writers, so that each committed batch RPUSHes one line per
applied message, "<partition> <applied_at> <latency_s>", to the Redis list named by
KEYQ_BENCH_LATENCY_KEY, in the batch's own post-commit pipeline (no round trip of its own).
"""

from __future__ import annotations

import os
import time
from typing import Any

from keyq.applier import BatchOutcome
from keyq.worker import WorkerRuntime

BENCH_LATENCY_KEY = "KEYQ_BENCH_LATENCY_KEY"  # the environment variable naming the list
HOOK_MODULE = __name__


def push_latency(pipe: Any, outcome: BatchOutcome) -> None:
    key = os.environ.get(BENCH_LATENCY_KEY)
    if key and outcome.sent:
        committed_at = time.time()
        lines = [f"{p} {committed_at:.6f} {committed_at - s:.6f}" for p, s in outcome.sent]
        pipe.rpush(key, *lines)


if os.environ.get(BENCH_LATENCY_KEY) and push_latency not in WorkerRuntime.post_commit_writers:
    WorkerRuntime.post_commit_writers.append(push_latency)
