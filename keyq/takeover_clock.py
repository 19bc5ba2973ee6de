"""Restart-ready time: how long a partition went unserved before a node served it again.

The brief's SLO is the time from a crash (or a handoff) until the keys of the crashed node are
served again. Nobody sees both ends: the dead node cannot report its death, and the new owner
does not know when it happened. So every owner stamps, with each heartbeat, the Redis server's
time beside each partition it serves (one hash, ``served``); a node that starts serving a
partition reads the previous stamp first, and the gap between the two is the partition's
downtime, observed into ``keyq_restart_ready_seconds``. Its resolution is one heartbeat
interval (the lease TTL / 8). Stamps older than ``MAX_GAP_S`` are a cold start of the whole
deployment, not a restart, and are not observed.
"""

from __future__ import annotations

import redis

from keyq import metrics
from keyq.settings import Settings

MAX_GAP_S = 300.0  # a longer gap is a cold start of the deployment, not a restart


class TakeoverClock:
    """Stamps the partitions this node serves; measures the gap on each newly served one."""

    def __init__(self, client: redis.Redis, settings: Settings, node: str) -> None:
        self.client = client
        self.node = node
        self.key = settings.redis_key("served")
        self._seen: dict[int, int] = {}  # partition -> lease token already measured

    def observe(self, held: dict[int, int]) -> list[tuple[int, float, str]]:
        """One heartbeat's stamps; returns (partition, gap seconds, kind) of new partitions."""
        if not held:
            self._seen = {}
            return []
        new = sorted(p for p, token in held.items() if self._seen.get(p) != token)
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        if new:
            pipe.hmget(self.key, [str(p) for p in new])
        got = pipe.execute()
        seconds, micros = got[0]
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        gaps: list[tuple[int, float, str]] = []
        for p, stamp in zip(new, got[1] if new else [], strict=True):
            if not stamp:
                continue
            when, _, node = stamp.decode().partition("|")
            gap = max(0.0, (now_ms - int(when)) / 1000.0)
            if gap <= MAX_GAP_S:
                kind = "reclaim" if node == self.node else "takeover"
                gaps.append((p, gap, kind))
                metrics.restart_ready_seconds.labels(kind).observe(gap)
        self.client.hset(self.key, mapping={str(p): f"{now_ms}|{self.node}" for p in held})
        self._seen = dict(held)
        return gaps
