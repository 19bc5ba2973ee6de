"""Benchmark instrumentation, injected into a worker from outside (never in production code).

The benchmark lists this module in the workers' KEYQ_ENTITY_MODULES; importing it wraps
WorkerRuntime._after_commit so that each committed batch RPUSHes one line per applied message,
"<partition> <applied_at> <latency_s>", to the Redis list named by KEYQ_BENCH_LATENCY_KEY.
"""

from __future__ import annotations

import os
import time
from typing import Any

from keyq.applier import BatchOutcome
from keyq.worker import WorkerRuntime

BENCH_LATENCY_KEY = "KEYQ_BENCH_LATENCY_KEY"  # the environment variable naming the list
HOOK_MODULE = __name__

_original = WorkerRuntime._after_commit


def _after_commit_with_latency(
    self: WorkerRuntime, outcome: BatchOutcome, *args: Any, **kw: Any
) -> None:
    key = os.environ.get(BENCH_LATENCY_KEY)
    committed_at = time.time()
    _original(self, outcome, *args, **kw)  # replies first: the hook is not on a call's path
    if key and outcome.sent:
        lines: list[Any] = [
            f"{p} {committed_at:.6f} {committed_at - s:.6f}" for p, s in outcome.sent
        ]
        self.redis.rpush(key, *lines)


if os.environ.get(BENCH_LATENCY_KEY):
    WorkerRuntime._after_commit = _after_commit_with_latency  # type: ignore[method-assign]
