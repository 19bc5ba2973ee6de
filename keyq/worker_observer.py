"""What a worker's heartbeat thread measures after each beat (WorkerRuntime.observe).

Kept out of keyq.worker, whose subject is applying messages: the partition-wide figures this
process exports when elected (keyq.cluster_metrics) and the restart-ready clock
(keyq.takeover_clock). Runs on the heartbeat thread, so the figures stay fresh while a long
batch holds the consumer loop, exactly when they matter; a failure here is logged, never raised
into the heartbeat.
"""

from __future__ import annotations

import logging

import redis

from keyq import metrics
from keyq.cluster_metrics import PartitionFigures
from keyq.settings import Settings
from keyq.takeover_clock import TakeoverClock

log = logging.getLogger(__name__)


class WorkerObserver:
    """The heartbeat's measurements of one worker process."""

    def __init__(
        self, client: redis.Redis, broker: redis.Redis, settings: Settings, node: str
    ) -> None:
        self.node = node
        self.figures = PartitionFigures(client, broker, settings, node)
        self.clock = TakeoverClock(client, settings, node)
        metrics.REGISTRY.register(self.figures)
        metrics.node_info.labels(node).set(1)

    def observe(self, held: dict[int, int]) -> None:
        try:
            for p, gap, kind in self.clock.observe(held):
                log.info(
                    "keyq partition served again partition=%s after=%.3fs kind=%s node=%s",
                    p, gap, kind, self.node,
                )
        except redis.RedisError as e:
            log.warning("keyq could not stamp served partitions node=%s error=%s", self.node, e)
        try:
            self.figures.observe(held)
        except Exception:  # never into the heartbeat thread: it keeps the leases alive
            log.exception("keyq partition figures failed node=%s", self.node)

    def close(self) -> None:
        metrics.REGISTRY.unregister(self.figures)
