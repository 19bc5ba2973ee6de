"""Metrics from the processes that do the work: per-entity counters, process_* metrics, and
partition-wide figures exported once (by the holder of partition 0) for every partition,
owned or not; restart-ready time after a kill -9."""

from __future__ import annotations

import time

import pytest
import redis

from keyq.cache import StateCache
from keyq.client import Client
from keyq.cluster_metrics import read_snapshot
from keyq.errors import HandlerCrashedError
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll
from tests.ops_helpers import free_port, label_values, scrape, total
from tests.ownership_helpers import (  # noqa: F401  (database_url: PostgreSQL only)
    database_url,
    lease_owners,
)


def test_partition_figures_cover_unowned_partitions_with_oldest_age(
    client: Client, settings: Settings, redis_client: redis.Redis
) -> None:
    sent = time.time()
    for i in range(3):
        client.send("counter", "waiting", "add", {"by": i})
    p = partition_for("waiting", settings.partitions)
    snap = read_snapshot(redis_client, redis_client, settings, now=sent + 5.0)
    assert set(snap.depth) == set(range(settings.partitions))
    assert snap.depth[p] == 3
    assert snap.owner == {}
    assert 4.0 < snap.oldest_age_s[p] < 6.0  # the oldest of the three, sent at about `sent`
    assert all(snap.oldest_age_s[q] == 0.0 for q in range(settings.partitions) if q != p)


def test_workers_export_per_entity_counters_and_one_process_the_partition_figures(
    start_worker: WorkerFactory, client: Client, settings: Settings, redis_client: redis.Redis
) -> None:
    ports = [free_port(), free_port()]
    workers = [start_worker(env={"KEYQ_METRICS_PORT": str(port)}) for port in ports]
    with pytest.raises(HandlerCrashedError):
        client.call("flaky", "f1", "boom", {"n": 1})
    n = 60
    for i in range(n):
        client.send("counter", f"k{i}", "add", {"by": 1})
    last = f"k{n - 1}"
    poll(lambda: client.read("counter", last) == {"value": 1}, what="the last counter applied")
    # the two workers apply their own partitions: the last key applied says nothing of the
    # other worker's keys (a read before its commit is a miss, not a hit)
    cache = StateCache(redis_client, settings)
    poll(
        lambda: all(cache.get("counter", f"k{i}") is not None for i in range(10)),
        what="the first ten counters applied and cached",
    )
    for i in range(10):
        client.read("counter", f"k{i}")  # cache hits, counted in Redis by this producer
    hits = int(redis_client.hget(settings.redis_key("stats", "cache"), "hits") or 0)
    assert hits >= 10

    def scraped() -> list[dict] | None:
        pages = [scrape(p) for p in ports]
        applied = sum(total(s, "keyq_messages_applied_total", entity="counter") for s in pages)
        exporters = [s for s in pages if total(s, "keyq_cluster_exporter") == 1]
        if applied < n or len(exporters) != 1 or total(exporters[0], "keyq_cache_lookups_total",
                                                      outcome="hit") < hits:
            return None
        return pages

    pages = poll(scraped, 20.0, what="both workers' metrics")
    assert isinstance(pages, list)
    for s in pages:
        assert total(s, "process_cpu_seconds_total") > 0
        assert total(s, "process_resident_memory_bytes") > 0
    applied = sum(total(s, "keyq_messages_applied_total", entity="counter") for s in pages)
    assert applied == n
    assert sum(total(s, "keyq_messages_applied_total", entity="all") for s in pages) == 0
    assert sum(
        total(s, "keyq_dead_letters_by_entity_total", entity="flaky") for s in pages
    ) == 1
    assert sum(total(s, "keyq_restarts_total", entity="flaky") for s in pages) >= 1
    # the crashed key was restarted (backoff, reload): its restart-ready time was observed
    ready = [
        exported(s, "keyq_key_restart_ready_seconds_count", entity="flaky")
        for s in pages
        if any(n == "keyq_key_restart_ready_seconds_count" and ("entity", "flaky") in ls
               for n, ls in s)
    ]
    assert ready and sum(ready) >= 1

    exporter = next(s for s in pages if total(s, "keyq_cluster_exporter") == 1)
    other = next(s for s in pages if s is not exporter)
    every = {str(p) for p in range(settings.partitions)}
    for name in ("keyq_mailbox_depth", "keyq_oldest_message_age_seconds",
                 "keyq_partition_owned"):
        assert label_values(exporter, name, "partition") == every, name
        assert label_values(other, name, "partition") == set(), name  # exported once
    assert total(exporter, "keyq_partition_owned") == settings.partitions
    assert total(exporter, "keyq_members_live") == 2
    assert total(exporter, "keyq_registry_lookup_seconds_count") > 0
    owner0 = lease_owners(redis_client, settings)[0]
    assert label_values(exporter, "keyq_cluster_exporter", "node") == {owner0}

    # kill -9 the exporter: the survivor takes over partition 0, exports, and measured how long
    # the dead node's partitions went unserved
    victim = next(
        w for w, s in zip(workers, pages, strict=True) if s is exporter
    )
    survivor_port = next(p for p, s in zip(ports, pages, strict=True) if s is not exporter)
    victim.kill()

    def taken_over() -> dict | None:
        s = scrape(survivor_port)
        if total(s, "keyq_cluster_exporter") == 1 and total(
            s, "keyq_restart_ready_seconds_count", kind="takeover"
        ) > 0:
            return s
        return None

    after = poll(taken_over, 20.0, what="the survivor to take over and export")
    assert isinstance(after, dict)
    count = total(after, "keyq_restart_ready_seconds_count", kind="takeover")
    mean = total(after, "keyq_restart_ready_seconds_sum", kind="takeover") / count
    assert 0.0 < mean < 2.0  # the brief's restart-ready SLO, with an 800 ms lease


def exported(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
             **labels: str) -> float:
    """The sum of a metric's samples with these labels; fails when the worker exports none."""
    found = [
        v for (n, ls), v in samples.items()
        if n == name and all((k, val) in ls for k, val in labels.items())
    ]
    assert found, f"{name}{labels or ''} is not exported"
    return sum(found)


def test_worker_exports_repo_latency_and_the_producers_lookups_and_hit_ratio(
    start_worker: WorkerFactory, settings: Settings, redis_client: redis.Redis
) -> None:
    """Repo calls on the worker's paths are timed by operation; the registry lookups and cache
    reads of producers (which serve no metrics) are counted in Redis and exported by the
    holder of partition 0."""
    import asyncio

    from keyq.aio import AsyncClient

    port = free_port()
    start_worker(env={"KEYQ_METRICS_PORT": str(port)})
    keys = [f"r{i}" for i in range(4)]
    producer = Client(settings)
    try:
        for k in keys:  # activations: the worker loads each key from the Repo, then commits
            assert producer.call("counter", k, "add", {"by": 1}) == 1
        assert [producer.read("counter", k) for k in keys] == [{"value": 1}] * 4  # cache hits
        assert producer.read("counter", "never-sent") is None  # a miss
        active = [producer.resolve("counter", k).active for k in keys]
        assert active == [True] * 4
        assert not producer.resolve("counter", "never-sent").active
    finally:
        producer.close()  # sends the last lookup's latency

    async def async_lookups() -> list[bool]:
        async with AsyncClient(settings) as aio:
            return [(await aio.resolve("counter", k)).active for k in keys[:2]]

    assert asyncio.run(async_lookups()) == [True, True]
    lookups = 5 + 2
    stats = redis_client.hgetall(settings.redis_key("stats", "cache"))
    hits, misses = int(stats[b"hits"]), int(stats[b"misses"])
    assert hits >= 4 and misses >= 1

    def scraped() -> dict | None:
        s = scrape(port)
        if total(s, "keyq_producer_lookup_seconds_count") < lookups:
            return None
        return s

    s = poll(scraped, 20.0, what="the producers' lookups exported")
    assert isinstance(s, dict)
    assert exported(s, "keyq_producer_lookups_total") == lookups
    assert exported(s, "keyq_producer_lookup_seconds_count") == lookups
    assert exported(s, "keyq_producer_lookup_seconds_bucket", le="+Inf") == lookups
    assert 0 < exported(s, "keyq_producer_lookup_seconds_sum") < lookups * 5.0
    assert exported(s, "keyq_producer_lookup_errors_total") == 0
    assert exported(s, "keyq_cache_hit_ratio") == pytest.approx(hits / (hits + misses))
    assert exported(s, "keyq_cache_lookups_total", outcome="hit") == hits
    # the worker's Repo reads (key loads) and writes (batch commits), timed by operation
    assert exported(s, "keyq_repo_seconds_count", op="load") >= 1
    assert exported(s, "keyq_repo_seconds_count", op="commit") >= len(keys)
    assert exported(s, "keyq_repo_seconds_sum", op="load") > 0
