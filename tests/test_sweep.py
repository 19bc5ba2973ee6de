"""The cache sweep: bounded size, least recently read out first, bounded work per call."""

from __future__ import annotations

import pytest
import redis

from keyq import metrics
from keyq.cache import StateCache
from keyq.celery_app import CACHE_SWEEP_TASK, celery_settings, default_queue
from keyq.client import Client
from keyq.repo import Repo
from keyq.settings import Settings
from keyq.sweeper import CacheSweeper
from tests.conftest import WorkerFactory, poll
from tests.test_cache import seed


def server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def next_millisecond(client: redis.Redis) -> None:
    """Recency scores are Redis-clock milliseconds: wait until the clock has moved on."""
    start = server_ms(client)
    poll(lambda: server_ms(client) > start + 1, timeout=2, interval=0.001, what="Redis clock")


def fill(cache: StateCache, keys: list[str]) -> None:
    cache.put_many([("counter", k, 1, {"value": k}) for k in keys])


def test_sweep_drops_the_least_recently_read_first(client: Client, settings: Settings) -> None:
    bounded = settings.with_(cache_max_keys=5)
    keys = [f"k{i}" for i in range(10)]
    fill(client.cache, keys)
    next_millisecond(client.redis)
    for k in keys[5:]:  # written at the same time as the others, but read since
        assert client.read("counter", k) == {"value": k}
    dropped_before = metrics.cache_swept.labels("evicted")._value.get()

    report = CacheSweeper(client.redis, bounded).sweep()

    assert (report.dropped, report.size) == (5, 5)
    assert report.duration_s >= 0 and not report.budget_exhausted
    assert metrics.cache_swept.labels("evicted")._value.get() - dropped_before == 5
    assert metrics.cache_keys._value.get() == 5
    assert [k for k in keys if client.cache.get("counter", k) is not None] == keys[5:]
    assert client.cache.size() == 5


def test_sweep_of_a_cache_within_bounds_changes_nothing(client: Client, settings: Settings) -> None:
    fill(client.cache, ["a", "b", "c"])
    report = CacheSweeper(client.redis, settings.with_(cache_max_keys=3)).sweep()
    assert (report.dropped, report.expired, report.size) == (0, 0, 3)
    assert all(client.cache.get("counter", k) for k in ["a", "b", "c"])


def test_sweep_is_bounded_per_call(client: Client, settings: Settings) -> None:
    bounded = settings.with_(cache_max_keys=5)
    fill(client.cache, [f"k{i}" for i in range(30)])
    sweeper = CacheSweeper(client.redis, bounded)

    first = sweeper.sweep(max_entries=10, step=4)
    assert (first.dropped, first.size, first.budget_exhausted) == (10, 20, True)
    assert first.steps == 3  # 4 + 4 + 2: no Lua step touched more than `step` entries

    rest = sweeper.sweep()
    assert (rest.dropped, rest.size, rest.budget_exhausted) == (15, 5, False)


def test_swept_entry_refuses_an_older_fill_but_takes_its_own_version_back(
    client: Client, settings: Settings, repo: Repo
) -> None:
    """A sweep keeps the version of what it dropped (a tombstone), so a read-through fill that
    loaded an older state from the Repo before the last write cannot bring it back."""
    bounded = settings.with_(cache_max_keys=1)
    client.cache.put("counter", "old", 5, {"value": 5})
    next_millisecond(client.redis)
    client.cache.put("counter", "new", 1, {"value": 1})
    assert CacheSweeper(client.redis, bounded).sweep().dropped == 1
    assert client.cache.get("counter", "old") is None

    assert not client.cache.put("counter", "old", 4, {"value": 4})  # a late, stale fill
    assert client.cache.get("counter", "old") is None
    seed(repo, "counter", {"old": (5, {"value": 5})})
    assert client.read("counter", "old") == {"value": 5}  # miss, then filled at v5
    got = client.cache.get("counter", "old")
    assert got is not None and got.version == 5


def test_sweep_forgets_index_members_whose_entry_expired(
    client: Client, settings: Settings
) -> None:
    short = settings.with_(cache_ttl_s=1.0)
    StateCache(client.redis, short).put("counter", "brief", 1, {"value": 1})
    poll(
        lambda: client.redis.exists(client.cache.key_for("counter", "brief")) == 0,
        timeout=5,
        what="the entry to expire",
    )
    next_millisecond(client.redis)
    report = CacheSweeper(client.redis, short).sweep()
    assert (report.expired, report.dropped, report.size) == (1, 0, 0)


@pytest.mark.integration
def test_cache_sweep_task_runs_in_a_worker_and_keeps_the_bound(
    start_worker: WorkerFactory, client: Client, settings: Settings
) -> None:
    """The beat schedules keyq.cache_sweep on the shared queue; a worker runs it out of band."""
    schedule = celery_settings(settings)["beat_schedule"]
    assert schedule["keyq-cache-sweep"]["task"] == CACHE_SWEEP_TASK
    assert schedule["keyq-cache-sweep"]["schedule"] == settings.cache_sweep_interval_s
    start_worker(settings_override=settings.with_(cache_max_keys=5))
    fill(client.cache, [f"k{i}" for i in range(20)])
    client.app.send_task(CACHE_SWEEP_TASK, queue=default_queue(settings))
    poll(lambda: client.cache.size() == 5, what="the worker's sweep to bound the cache")
