"""Partition-wide figures, exported once for the whole deployment by one elected process.

A partition's depth, the age of its oldest waiting message and its owner are the same number
whoever reads them: if every worker exported them, a ``sum()`` in Prometheus would count each
partition once per worker, and a partition nobody owns would be exported by nobody. So exactly
one process exports them, for every partition: the holder of partition 0's lease. The election
is the lease itself (at most one holder at a time, taken over within the lease TTL when that
node dies), so no extra lock or leader key is needed. Between two holders, for a moment, either
none or (at worst, for one scrape) two processes export: Prometheus' ``max by (partition)``
in the alert rules is indifferent to that.

The elected process also exports the cache's hit and miss counters (kept in Redis by every
reader, keyq.cache) with their hit ratio, the producers' registry lookups (counted in Redis by
every producer's resolve, keyq.lookup_stats), and times a registry lookup of a probe name of
its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from keyq import metrics
from keyq.cache import StateCache
from keyq.celery_app import DISPATCH_TASK
from keyq.cluster import Leases, Membership
from keyq.lookup_stats import LookupFigures, parse, stats_key
from keyq.mailbox import PARTITION_TASKS, decode, poison_key
from keyq.registry import NameRegistry
from keyq.settings import Settings

log = logging.getLogger(__name__)

ELECTED_PARTITION = 0  # the holder of this partition's lease exports the partition-wide figures
REFRESH_S = 1.0  # partition-wide figures are read from Redis at most this often
PROBE_ENTITY = "keyq.probe"  # the registry probe's name (never an entity: entity names have no '.')


@dataclass
class Snapshot:
    """What the elected process last read from Redis, as of ``taken`` (time.time())."""

    taken: float = 0.0
    depth: dict[int, int] = field(default_factory=dict)
    inflight: dict[int, int] = field(default_factory=dict)
    poison: dict[int, int] = field(default_factory=dict)
    oldest_age_s: dict[int, float] = field(default_factory=dict)
    owner: dict[int, str] = field(default_factory=dict)
    members: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    lookups: LookupFigures = field(default_factory=LookupFigures)


def oldest_sent_at(raws: Sequence[bytes | None]) -> float | None:
    """The earliest producer send time among these raw broker messages (None: none known)."""
    best: float | None = None
    for raw in raws:
        if not raw:
            continue
        for env in decode(raw, PARTITION_TASKS, DISPATCH_TASK).envelopes:
            sent = env.get("sent_at") if isinstance(env, dict) else None
            if isinstance(sent, int | float) and sent > 0 and (best is None or sent < best):
                best = float(sent)
    return best


def read_snapshot(
    client: redis.Redis, broker: redis.Redis, settings: Settings, now: float | None = None
) -> Snapshot:
    """Every partition's figures in two pipelines (Redis, then the broker).

    The oldest waiting message of a partition is the tail of its queue (producers LPUSH,
    consumers BRPOP, restores RPUSH) or an end of its in-flight list (taken by a batch that has
    not committed, or left by a dead owner for the next one to restore).
    """
    now = time.time() if now is None else now
    n = settings.partitions
    holders = Leases(client, settings).holders()
    members = len(Membership(client, settings).live())
    cache = StateCache(client, settings).stats()
    lookups = parse(client.hgetall(stats_key(settings)))
    pipe = broker.pipeline(transaction=False)
    for p in range(n):
        queue = settings.queue_name(p)
        inflight = settings.redis_key("inflight", str(p))
        pipe.llen(queue)
        pipe.llen(inflight)
        pipe.llen(poison_key(queue))
        pipe.lindex(queue, -1)
        pipe.lindex(inflight, 0)
        pipe.lindex(inflight, -1)
    raw = pipe.execute()
    snap = Snapshot(
        taken=now,
        members=members,
        cache_hits=cache["hits"],
        cache_misses=cache["misses"],
        lookups=lookups,
        owner={p: h.owner for p, h in holders.items()},
    )
    for p in range(n):
        depth, inflight_n, poison_n, tail, first, last = raw[6 * p : 6 * p + 6]
        snap.depth[p] = int(depth)
        snap.inflight[p] = int(inflight_n)
        snap.poison[p] = int(poison_n)
        sent = oldest_sent_at([tail, first, last])
        snap.oldest_age_s[p] = max(0.0, now - sent) if sent is not None else 0.0
    return snap


class PartitionFigures(Collector):
    """The collector the elected process registers: yields the last snapshot's figures while
    this process holds partition 0, nothing otherwise."""

    def __init__(self, client: redis.Redis, broker: redis.Redis, settings: Settings, node: str):
        self.client = client
        self.broker = broker
        self.settings = settings
        self.node = node
        self.names = NameRegistry(client, settings)
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._elected = False

    # --- the heartbeat thread --------------------------------------------------------------

    def observe(self, held: dict[int, int], now: float | None = None) -> None:
        """Called after each heartbeat: refresh the figures if elected and they are due."""
        now = time.time() if now is None else now
        elected = ELECTED_PARTITION in held
        with self._lock:
            self._elected = elected
            due = self._snapshot is None or now - self._snapshot.taken >= REFRESH_S
        if not elected:
            with self._lock:
                self._snapshot = None
            return
        if not due:
            return
        self.probe_registry()
        try:
            snap = read_snapshot(self.client, self.broker, self.settings, now)
        except redis.RedisError as e:
            log.warning("keyq could not read partition figures node=%s error=%s", self.node, e)
            return
        with self._lock:
            self._snapshot = snap

    def probe_registry(self) -> None:
        """One timed lookup through Client.resolve's path, of a name nobody holds (so the probe
        never shows up as an active key): latency and failures as the registry's SLO metrics."""
        started = time.perf_counter()
        try:
            self.names.resolve(PROBE_ENTITY, self.node)
        except redis.RedisError:
            metrics.registry_lookup_failures.inc()
            return
        finally:
            metrics.registry_lookup_seconds.observe(time.perf_counter() - started)

    # --- the scrape ------------------------------------------------------------------------

    def collect(
        self,
    ) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        with self._lock:
            snap = self._snapshot if self._elected else None
        if snap is None:
            return
        yield _per_partition(
            "keyq_mailbox_depth", "Messages waiting on each partition's queue", snap.depth
        )
        yield _per_partition(
            "keyq_inflight_messages",
            "Messages taken by a batch not yet committed, or awaiting a restore, per partition",
            snap.inflight,
        )
        yield _per_partition(
            "keyq_poison_messages",
            "Messages refused at fetch, awaiting their dead letter, per partition",
            snap.poison,
        )
        yield _per_partition(
            "keyq_oldest_message_age_seconds",
            "Age (since send) of the oldest message waiting on each partition (0: none waits)",
            snap.oldest_age_s,
        )
        owned = GaugeMetricFamily(
            "keyq_partition_owned", "1 if a node holds the partition's lease", labels=["partition"]
        )
        owner = GaugeMetricFamily(
            "keyq_partition_owner", "The node holding each partition's lease (value 1)",
            labels=["partition", "node"],
        )
        for p in range(self.settings.partitions):
            node = snap.owner.get(p)
            owned.add_metric([str(p)], 1.0 if node else 0.0)
            if node:
                owner.add_metric([str(p), node], 1.0)
        yield owned
        yield owner
        members = GaugeMetricFamily("keyq_members_live", "Live worker nodes (by heartbeat)")
        members.add_metric([], snap.members)
        yield members
        reads = CounterMetricFamily(
            "keyq_cache_lookups",
            "Cache reads by every producer, counted in Redis (hit or miss)",
            labels=["outcome"],
        )
        reads.add_metric(["hit"], snap.cache_hits)
        reads.add_metric(["miss"], snap.cache_misses)
        yield reads
        if snap.cache_hits + snap.cache_misses:
            hit_ratio = GaugeMetricFamily(
                "keyq_cache_hit_ratio",
                "Share of every producer's cache reads that hit, since the counters began",
            )
            hit_ratio.add_metric([], snap.cache_hits / (snap.cache_hits + snap.cache_misses))
            yield hit_ratio
        yield from _lookup_families(snap.lookups)
        exporter = GaugeMetricFamily(
            "keyq_cluster_exporter",
            "1 on the one process that exports the partition-wide figures",
            labels=["node"],
        )
        exporter.add_metric([self.node], 1.0)
        yield exporter


def _lookup_families(
    f: LookupFigures,
) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
    """The producers' registry lookups, as counted in Redis (keyq.lookup_stats)."""
    lookups = CounterMetricFamily(
        "keyq_producer_lookups", "Registry lookups (resolve) by every producer, counted in Redis"
    )
    lookups.add_metric([], f.lookups)
    yield lookups
    errors = CounterMetricFamily(
        "keyq_producer_lookup_errors", "Producers' registry lookups that failed"
    )
    errors.add_metric([], f.errors)
    yield errors
    latency = HistogramMetricFamily(
        "keyq_producer_lookup_seconds",
        "Producers' registry lookup latency (each arrives with the producer's next lookup)",
    )
    latency.add_metric(
        [],
        [(f"{bound:g}", float(n)) for bound, n in f.buckets] + [("+Inf", float(f.timed))],
        sum_value=f.seconds,
    )
    yield latency


def _per_partition(
    name: str, doc: str, values: dict[int, int] | dict[int, float]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["partition"])
    for p, v in sorted(values.items()):
        family.add_metric([str(p)], float(v))
    return family
