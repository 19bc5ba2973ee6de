"""The hot-read cache on real Redis: versions only move forward, reads fill it, reads count."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import redis

from keyq import metrics
from keyq.cache import StateCache
from keyq.client import Client
from keyq.repo import Repo, StateWrite
from keyq.settings import Settings
from keyq.sweeper import CacheSweeper

ZIPF_S = 1.1


def seed(repo: Repo, entity: str, rows: dict[str, tuple[int, object]]) -> None:
    """Durable state written straight to the Repo (as a worker's commit would)."""
    writes = [StateWrite(entity, key, state, version, []) for key, (version, state) in rows.items()]
    repo.commit(0, 0, writes)


def zipf_sampler(n: int, s: float, rng: random.Random) -> Callable[[], int]:
    weights = [1.0 / (rank**s) for rank in range(1, n + 1)]
    population = list(range(n))
    return lambda: rng.choices(population, weights)[0]


def test_older_version_never_overwrites_newer(
    redis_client: redis.Redis, settings: Settings
) -> None:
    cache = StateCache(redis_client, settings)
    assert cache.put("counter", "k", 5, {"value": 5})
    assert not cache.put("counter", "k", 4, {"value": 4})
    assert not cache.put("counter", "k", 5, {"value": "other"})
    got = cache.get("counter", "k")
    assert got is not None and (got.version, got.state) == (5, {"value": 5})
    assert cache.put("counter", "k", 6, {"value": 6})
    got = cache.get("counter", "k")
    assert got is not None and got.version == 6


def test_concurrent_writers_never_move_an_entry_back(
    redis_url: str, redis_client: redis.Redis, settings: Settings
) -> None:
    """Threads, each with its own connection, race put_many with random versions."""
    keys = ["a", "b", "c"]
    writers, rounds = 6, 150
    highest: dict[str, int] = {k: 0 for k in keys}
    highest_lock = threading.Lock()
    backwards: list[str] = []
    stop = threading.Event()

    def write(seed_: int) -> None:
        rng = random.Random(seed_)
        client = redis.Redis.from_url(redis_url)
        cache = StateCache(client, settings)
        for _ in range(rounds):
            batch = [(k, rng.randint(1, 10_000)) for k in rng.sample(keys, 2)]
            cache.put_many([("counter", k, v, {"value": v}) for k, v in batch])
            with highest_lock:
                for k, v in batch:
                    highest[k] = max(highest[k], v)
        client.close()

    def watch() -> None:
        client = redis.Redis.from_url(redis_url)
        cache = StateCache(client, settings)
        seen = {k: 0 for k in keys}
        while not stop.is_set():
            for k in keys:
                got = cache.get("counter", k)
                if got is None:
                    continue
                if got.version < seen[k] or got.state != {"value": got.version}:
                    backwards.append(f"{k}: {seen[k]} -> {got.version} {got.state}")
                seen[k] = got.version
        client.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()

    assert backwards == []
    cache = StateCache(redis_client, settings)
    for k in keys:
        got = cache.get("counter", k)
        assert got is not None and got.version == highest[k] and got.state == {"value": highest[k]}


def test_read_fills_the_cache_on_a_miss(client: Client, repo: Repo) -> None:
    seed(repo, "counter", {"k1": (2, {"value": 7})})
    assert client.cache.get("counter", "k1") is None
    assert client.read("counter", "k1") == {"value": 7}  # miss: from the Repo, then filled
    got = client.cache.get("counter", "k1")
    assert got is not None and got.version == 2
    assert client.read("counter", "k1") == {"value": 7}  # hit
    assert client.read("counter", "unknown") is None  # a miss that fills nothing
    assert client.cache.get("counter", "unknown") is None
    assert client.cache.stats() == {"hits": 1, "misses": 2, "keys": 1}


def test_read_through_fill_never_overwrites_a_newer_version(client: Client, repo: Repo) -> None:
    """A reader that loaded v3 from the Repo fills after a worker cached v5: v5 stays."""
    client.cache.put("counter", "k", 5, {"value": 5})
    assert not client.cache.put("counter", "k", 3, {"value": 3})  # the late fill
    assert client.read("counter", "k") == {"value": 5}


def test_fills_racing_writers_and_sweeps_leave_the_repo_version_cached(
    redis_url: str, settings: Settings, repo: Repo
) -> None:
    """Writers commit then cache (like workers); readers read through; a sweep keeps evicting.
    Whatever interleaving happened, a cached entry ends at its key's Repo version."""
    s = settings.with_(cache_max_keys=2)
    keys = [f"k{i}" for i in range(4)]
    seed(repo, "counter", {k: (1, {"value": 1}) for k in keys})
    stop = threading.Event()
    errors: list[BaseException] = []

    def guarded(fn: Callable[..., None], *args: object) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as e:  # surfaced by the assertion below
                errors.append(e)

        return threading.Thread(target=run)

    def writer(own: list[str]) -> None:
        client = redis.Redis.from_url(redis_url)
        cache, wrepo = StateCache(client, s), Repo(s.database_url)
        for version in range(2, 40):
            for k in own:
                wrepo.commit(0, 0, [StateWrite("counter", k, {"value": version}, version, [])])
                cache.put("counter", k, version, {"value": version})
        wrepo.dispose()
        client.close()

    def reader() -> None:
        with Client(s) as c:
            rng = random.Random(7)
            while not stop.is_set():
                c.read("counter", rng.choice(keys))

    def sweeper() -> None:
        client = redis.Redis.from_url(redis_url)
        while not stop.is_set():
            CacheSweeper(client, s).sweep()
        client.close()

    def watch() -> None:  # even across sweeps, no entry ever shows an older version
        cache = StateCache(redis.Redis.from_url(redis_url), s)
        seen = dict.fromkeys(keys, 0)
        while not stop.is_set():
            for k in keys:
                got = cache.get("counter", k)
                if got is not None:
                    assert got.version >= seen[k], f"{k} went back {seen[k]} -> {got.version}"
                    seen[k] = got.version
        cache.client.close()

    background = [guarded(f) for f in (reader, reader, sweeper, watch)]
    writers = [guarded(writer, own) for own in (keys[:2], keys[2:])]
    for t in background + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in background:
        t.join()
    assert errors == []
    check = StateCache(redis.Redis.from_url(redis_url), s)
    for k in keys:
        got = check.get("counter", k)
        stored = repo.load_one("counter", k)
        assert stored is not None and stored.version == 39
        assert got is None or (got.version, got.state) == (39, {"value": 39}), (k, got)
    check.client.close()


def test_zipf_read_workload_counts_add_up(client: Client, repo: Repo, settings: Settings) -> None:
    """Zipf(1.1) reads over 1,000 keys with the cache bounded to 100 and swept every 250 reads.
    Prints the hit ratio (the benchmark quotes it); asserts only that the counters add up."""
    n_keys, n_reads, max_keys = 1000, 4000, 100
    seed(repo, "counter", {f"z{i}": (1, {"value": i}) for i in range(n_keys)})
    bounded = settings.with_(cache_max_keys=max_keys)
    sweeper = CacheSweeper(client.redis, bounded)
    sample = zipf_sampler(n_keys, ZIPF_S, random.Random(11))
    hits_before = metrics.cache_reads.labels("hit")._value.get()
    misses_before = metrics.cache_reads.labels("miss")._value.get()
    for i in range(n_reads):
        k = sample()
        assert client.read("counter", f"z{k}") == {"value": k}
        if i % 250 == 249:
            sweeper.sweep()
    final = sweeper.sweep()
    stats = client.cache.stats()
    hits = metrics.cache_reads.labels("hit")._value.get() - hits_before
    misses = metrics.cache_reads.labels("miss")._value.get() - misses_before
    ratio = stats["hits"] / n_reads
    print(
        f"\nzipf s={ZIPF_S} keys={n_keys} reads={n_reads} cache_max_keys={max_keys}: "
        f"hits={stats['hits']} misses={stats['misses']} hit_ratio={ratio:.3f}"
    )
    assert stats["hits"] + stats["misses"] == n_reads
    assert (hits, misses) == (stats["hits"], stats["misses"])
    assert final.size <= max_keys and client.cache.size() <= max_keys
    assert 0 < stats["hits"] < n_reads


class CountingConnection(redis.Connection):
    """A real connection that counts the requests it sends (one per round trip)."""

    sent = 0

    def send_packed_command(self, command: object, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)  # type: ignore[arg-type]


def test_read_hit_is_one_round_trip(client: Client, redis_url: str, settings: Settings) -> None:
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    counted = redis.Redis(connection_pool=pool)
    client.cache = StateCache(counted, settings)
    client.cache.put("counter", "k", 1, {"value": 1})
    assert client.read("counter", "k") == {"value": 1}  # loads the script once if needed
    CountingConnection.sent = 0
    assert client.read("counter", "k") == {"value": 1}
    assert CountingConnection.sent == 1
    assert client.cache.stats()["hits"] == 2
    counted.close()
