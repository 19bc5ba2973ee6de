"""The measurements: each function sets up what it needs on real workers and returns figures.

Throughput is measured as a drain: the queues are filled first, then the workers start, and the
rate is messages over the time from the first consumption to the last apply, so the producer
does not compete with the workers for the two cores. keyq workers report each applied message
("<partition> <applied_at> <latency>") to a Redis list when KEYQ_BENCH_LATENCY_KEY is set.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
import sqlalchemy as sa
from tqdm import tqdm

from keyq.bench.celery_noop import ECHO_TASK, NOOP_TASK, make_noop_app
from keyq.bench.infra import BenchServers
from keyq.bench.procs import (
    Proc,
    latency_key,
    node_of_pid,
    start_celery_worker,
    start_keyq_worker,
    static_slices,
    stop_all,
    wait_for,
)
from keyq.bench.stats import ZipfSampler, latency_summary_ms
from keyq.client import Client
from keyq.cluster import Leases, assignment
from keyq.mailbox import Mailbox, unacked_records
from keyq.repo import Repo, state_table
from keyq.routing import partition_for
from keyq.settings import Settings

ENTITY = "counter"
OP = "add"
DRAIN_TIMEOUT_S = 300.0
SEND_MANY_CHUNK = 1000  # messages per send_many call while filling the queues
SINGLE_SENDER_MAX_RATE = 1500.0  # above this, the paced sender runs in several processes
WARMUP_S = 0.5  # latency samples sent in the first half second are dropped


@dataclass
class Sample:
    partition: int
    applied_at: float
    latency_s: float


def parse_samples(raw: Iterable[bytes | str]) -> list[Sample]:
    out = []
    for item in raw:
        text = item.decode() if isinstance(item, bytes) else item
        p, applied, latency = text.split()
        out.append(Sample(int(p), float(applied), float(latency)))
    return out


@dataclass
class DrainResult:
    messages: int
    seconds: float
    produce_seconds: float
    latencies_s: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def produce_rate(self) -> float:
        return self.messages / self.produce_seconds if self.produce_seconds > 0 else 0.0


def bench_key(i: int) -> str:
    return f"k{i}"


def _check_alive(procs: list[Proc]) -> None:
    for p in procs:
        if not p.alive():
            raise RuntimeError(f"a {p.kind} worker exited early:\n{p.log_tail()}")


class Bench:
    """One benchmark run on its own database and Redis namespace."""

    def __init__(self, servers: BenchServers, workers: int, loglevel: str = "warning") -> None:
        self.servers = servers
        self.settings: Settings = servers.settings()
        self.workers = workers
        self.loglevel = loglevel
        self.redis = redis.Redis.from_url(self.settings.redis_url)
        self.mailbox = Mailbox(self.redis, self.settings)
        self.client = Client(self.settings)
        self.celery_queue = f"{self.settings.namespace}.celery"
        self.celery_app = make_noop_app(self.settings.broker_url, self.settings.redis_url)
        self.procs: list[Proc] = []
        self.adds = 0  # every {"by": 1} sent, to check the counters at the end

    def close(self) -> None:
        stop_all(self.procs)
        self.procs = []
        self.client.close()
        self.celery_app.close()
        self.redis.close()

    # --- helpers ---------------------------------------------------------------------------

    def _queue_total(self, queues: list[str]) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for q in queues:
            pipe.llen(q)
        return sum(int(n) for n in pipe.execute())

    def _wait_first_consumption(self, queues: list[str], initial: int, procs: list[Proc]) -> float:
        deadline = time.monotonic() + 60
        while self._queue_total(queues) >= initial:
            _check_alive(procs)
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not start consuming within 60 s")
            time.sleep(0.002)
        return time.time()

    def stop_workers(self) -> None:
        stop_all(self.procs)
        self.procs = []

    def _start_keyq_static(self) -> list[Proc]:
        procs = [
            start_keyq_worker(self.settings, spec, self.loglevel)
            for spec in static_slices(self.settings.partitions, self.workers)
        ]
        self.procs.extend(procs)
        return procs

    def _wait_leases(self, timeout: float = 60.0) -> None:
        leases = Leases(self.redis, self.settings)
        wait_for(
            lambda: len(leases.holders()) == self.settings.partitions,
            timeout,
            "every partition lease to be held",
        )

    def verify_counters(self, expected_total: int) -> bool:
        """Every add was applied exactly once: the counters sum to the number of adds."""
        return self.counter_total() == expected_total

    # --- plain Celery ------------------------------------------------------------------------

    def celery_drain(self, n: int, keep_running: bool = False) -> DrainResult:
        """Fill the no-op queue with n tasks, start the Celery workers, time the drain."""
        started = time.perf_counter()
        for _ in tqdm(range(n), desc="fill celery queue", leave=False, unit="msg"):
            self.celery_app.send_task(NOOP_TASK, queue=self.celery_queue)
        produce_s = time.perf_counter() - started
        procs = [
            start_celery_worker(
                self.settings.broker_url, self.settings.redis_url, self.celery_queue, self.loglevel
            )
            for _ in range(self.workers)
        ]
        self.procs.extend(procs)
        t_start = self._wait_first_consumption([self.celery_queue], n, procs)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S

        def drained() -> bool:
            if self.redis.llen(self.celery_queue):
                return False
            return not unacked_records(self.redis, self.celery_queue)

        while not drained():
            _check_alive(procs)
            if time.monotonic() > deadline:
                raise TimeoutError("plain Celery did not drain its queue")
            time.sleep(0.002)
        t_end = time.time()
        if not keep_running:
            self.stop_workers()
        return DrainResult(n, t_end - t_start, produce_s)

    def celery_call(self, count: int) -> list[float]:
        """apply_async().get() round trips with a Redis result backend (workers running)."""
        out = []
        for i in tqdm(range(count + 10), desc="celery call", leave=False, unit="call"):
            t = time.perf_counter()
            result = self.celery_app.send_task(ECHO_TASK, args=[i], queue=self.celery_queue)
            value = result.get(timeout=30)
            elapsed = time.perf_counter() - t
            result.forget()
            if value != i:
                raise RuntimeError(f"plain Celery echo returned {value!r}, not {i}")
            if i >= 10:  # the first calls warm connections up
                out.append(elapsed)
        return out

    # --- keyq throughput ---------------------------------------------------------------------

    def keyq_drain(self, n: int, keys: int, bulk: bool, keep_running: bool = False) -> DrainResult:
        """Fill the partition queues with n adds over `keys` keys (one broker message per add,
        or send_many's one per partition), start the keyq workers, time the drain."""
        lkey = latency_key(self.settings)
        self.redis.delete(lkey)
        queues = [self.settings.queue_name(p) for p in range(self.settings.partitions)]
        started = time.perf_counter()
        if bulk:
            with tqdm(total=n, desc="fill (send_many)", leave=False, unit="msg") as bar:
                for start in range(0, n, SEND_MANY_CHUNK):
                    stop = min(n, start + SEND_MANY_CHUNK)
                    self.client.send_many(
                        ENTITY,
                        ((bench_key(i % keys), OP, {"by": 1}) for i in range(start, stop)),
                    )
                    bar.update(stop - start)
        else:
            for i in tqdm(range(n), desc="fill (send)", leave=False, unit="msg"):
                self.client.send(ENTITY, bench_key(i % keys), OP, {"by": 1})
        produce_s = time.perf_counter() - started
        self.adds += n
        initial = self._queue_total(queues)
        procs = self._start_keyq_static()
        t_start = self._wait_first_consumption(queues, initial, procs)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while int(self.redis.llen(lkey)) < n:
            _check_alive(procs)
            if time.monotonic() > deadline:
                raise TimeoutError(f"keyq applied {self.redis.llen(lkey)} of {n} messages")
            time.sleep(0.005)
        samples = parse_samples(self.redis.lrange(lkey, 0, -1))
        t_end = max(s.applied_at for s in samples)
        if not keep_running:
            self.stop_workers()
        return DrainResult(n, t_end - t_start, produce_s, [s.latency_s for s in samples])

    # --- latency -----------------------------------------------------------------------------

    def dispatch_latency(self, rate: float, seconds: float, keys: int) -> dict[str, Any]:
        """Send at a fixed rate (open loop) with the workers running; send-to-applied latency."""
        lkey = latency_key(self.settings)
        self.redis.delete(lkey)
        # one sender process per SINGLE_SENDER_MAX_RATE, but no more processes than cores
        needed = int(rate // SINGLE_SENDER_MAX_RATE) + (rate % SINGLE_SENDER_MAX_RATE > 0)
        senders = max(1, min(needed, os.cpu_count() or 1))
        total = int(rate * seconds)
        if senders == 1:
            sent, behind = _paced_sender(self.settings, rate, total, keys, 0, 1, None)
        else:
            ctx = multiprocessing.get_context("spawn")
            barrier = ctx.Barrier(senders + 1)
            queue = ctx.Queue()
            workers = [
                ctx.Process(
                    target=_sender_process,
                    args=(self.settings, rate / senders, total // senders, keys, i, senders),
                    kwargs={"barrier": barrier, "results": queue},
                    daemon=True,
                )
                for i in range(senders)
            ]
            for w in workers:
                w.start()
            barrier.wait(timeout=60)
            results = [queue.get(timeout=seconds * 4 + 60) for _ in workers]
            for w in workers:
                w.join(10)
            sent = sum(r[0] for r in results)
            behind = max(r[1] for r in results)
        self.adds += sent - senders  # each sender's first message adds 0
        wait_for(lambda: int(self.redis.llen(lkey)) >= sent, 60.0, "latency samples")
        samples = parse_samples(self.redis.lrange(lkey, 0, -1))
        first_sent = min(s.applied_at - s.latency_s for s in samples)
        kept = [s.latency_s for s in samples if s.applied_at - s.latency_s >= first_sent + WARMUP_S]
        summary = latency_summary_ms(kept)
        sent_times = [s.applied_at - s.latency_s for s in samples]
        span = max(sent_times) - min(sent_times)
        return {
            "rate_target": rate,
            "rate_achieved": len(samples) / span if span > 0 else None,
            "sent": sent,
            "senders": senders,
            "sender_behind_s": behind,
            "summary_ms": summary,
            "latencies_s": kept,
        }

    def pg_commit_probe(self, count: int) -> list[float]:
        """Durations of one-row upsert transactions: the fsync floor under every keyq commit."""
        repo = Repo(self.settings.database_url)
        out = []
        try:
            with repo.engine.connect() as conn:
                conn.execute(sa.text("CREATE TABLE bench_probe (k int PRIMARY KEY, v int)"))
                conn.commit()
                upsert = sa.text(
                    "INSERT INTO bench_probe VALUES (:k, :v) "
                    "ON CONFLICT (k) DO UPDATE SET v = excluded.v"
                )
                for i in range(count + 10):
                    t = time.perf_counter()
                    conn.execute(upsert, {"k": i % 10, "v": i})
                    conn.commit()
                    if i >= 10:
                        out.append(time.perf_counter() - t)
        finally:
            repo.dispose()
        return out

    def keyq_call(self, count: int) -> list[float]:
        out = []
        for i in tqdm(range(count + 10), desc="keyq call", leave=False, unit="call"):
            t = time.perf_counter()
            self.client.call(ENTITY, f"call{i % 100}", OP, {"by": 1}, timeout=30)
            self.adds += 1
            if i >= 10:
                out.append(time.perf_counter() - t)
        return out

    # --- cache -------------------------------------------------------------------------------

    def cache_hit_ratio(self, reads: int, keys: int, zipf_s: float) -> dict[str, Any]:
        """Client.read of keys drawn from Zipf(s) over the keys the workers wrote."""
        sampler = ZipfSampler(keys, zipf_s)
        before = self.client.cache.stats()
        started = time.perf_counter()
        for rank in tqdm(sampler.draws(reads), desc="zipf reads", leave=False, unit="read"):
            self.client.read(ENTITY, bench_key(rank))
        elapsed = time.perf_counter() - started
        after = self.client.cache.stats()
        hits = after["hits"] - before["hits"]
        misses = after["misses"] - before["misses"]
        return {
            "hits": hits,
            "misses": misses,
            "ratio": hits / (hits + misses) if hits + misses else None,
            "reads_per_s": reads / elapsed if elapsed > 0 else None,
        }

    # --- takeover ----------------------------------------------------------------------------

    def takeover(self, load_rate: float, keys: int) -> dict[str, Any]:
        """Two rendezvous workers under load; kill -9 one; time until the survivor applies
        messages of every partition the victim held."""
        self.stop_workers()
        lkey = latency_key(self.settings)
        self.redis.delete(lkey)
        procs = [start_keyq_worker(self.settings, None, self.loglevel) for _ in range(2)]
        self.procs.extend(procs)
        leases = Leases(self.redis, self.settings)
        nodes: list[str] = []

        def converged() -> bool:
            _check_alive(procs)
            found = [node_of_pid(self.redis, self.settings, p.pid) for p in procs]
            if None in found:
                return False
            nodes[:] = [n for n in found if n is not None]
            want = assignment(self.settings.partitions, nodes)
            holders = leases.holders()
            return all(
                holders.get(p) is not None and holders[p].owner == owner
                for owner, parts in want.items()
                for p in parts
            )

        wait_for(converged, 60.0, "two workers to split the partitions")
        victim, survivor_node = procs[0], nodes[1]
        victim_parts = sorted(p for p, info in leases.holders().items() if info.owner == nodes[0])
        probe_keys = _keys_per_partition(self.settings.partitions, victim_parts)
        stop = threading.Event()
        sent = [0]

        def load() -> None:
            with Client(self.settings) as c:
                i = 0
                t0 = time.monotonic()
                while not stop.is_set():
                    c.send(ENTITY, bench_key(i % keys), OP, {"by": 1})
                    i += 1
                    sent[0] += 1
                    delay = t0 + i / load_rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)

        loader = threading.Thread(target=load, name="bench-load", daemon=True)
        loader.start()
        time.sleep(1.5)
        t_kill = time.time()
        victim.kill9()
        for p in victim_parts:
            self.client.send(ENTITY, probe_keys[p], OP, {"by": 1})
        lease_ms: float | None = None
        seen: dict[int, float] = {}
        read = 0
        deadline = time.monotonic() + 30
        while len(seen) < len(victim_parts) and time.monotonic() < deadline:
            if lease_ms is None:
                holders = leases.holders()
                if all(
                    holders.get(p) is not None and holders[p].owner == survivor_node
                    for p in victim_parts
                ):
                    lease_ms = (time.time() - t_kill) * 1000
            new = self.redis.lrange(lkey, read, -1)
            read += len(new)
            for s in parse_samples(new):
                if s.partition in victim_parts and s.applied_at > t_kill:
                    seen.setdefault(s.partition, s.applied_at)
            time.sleep(0.005)
        stop.set()
        loader.join(10)
        total_sent = sent[0] + len(victim_parts)
        self.adds += total_sent
        all_applied = True
        try:
            wait_for(lambda: self.counter_total() == self.adds, 30.0, "the load to be applied")
        except TimeoutError:
            all_applied = False
        first = {p: (t - t_kill) * 1000 for p, t in seen.items()}
        out: dict[str, Any] = {
            "victim_partitions": len(victim_parts),
            "takeover_ms": max(first.values()) if len(first) == len(victim_parts) else None,
            "first_partition_ms": min(first.values()) if first else None,
            "lease_takeover_ms": lease_ms,
            "sent": total_sent,
            "all_applied": all_applied,
        }
        if not all_applied or len(first) < len(victim_parts):
            out["diagnostics"] = self._diagnostics(victim_parts, seen)
        return out

    def counter_total(self) -> int:
        """The sum of every counter in the Repo: the adds applied so far."""
        repo = Repo(self.settings.database_url)
        try:
            with repo.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(state_table.c.state).where(state_table.c.entity == ENTITY)
                ).all()
        finally:
            repo.dispose()
        return sum(int((r.state or {}).get("value", 0)) for r in rows)

    def _diagnostics(self, victim_parts: list[int], seen: dict[int, float]) -> dict[str, Any]:
        holders = Leases(self.redis, self.settings).holders()
        pipe = self.redis.pipeline(transaction=False)
        for p in victim_parts:
            pipe.llen(self.settings.queue_name(p))
            pipe.llen(self.mailbox.inflight_key(p))
        depths = pipe.execute()
        return {
            "applied_total": self.counter_total(),
            "expected_total": self.adds,
            "not_served": [p for p in victim_parts if p not in seen],
            "holders": {p: holders[p].owner for p in victim_parts if p in holders},
            "queue_depths": {p: depths[2 * i] for i, p in enumerate(victim_parts)},
            "inflight_depths": {p: depths[2 * i + 1] for i, p in enumerate(victim_parts)},
            "worker_logs": [p.log_tail(2000) for p in self.procs],
        }

    # --- memory ------------------------------------------------------------------------------

    def worker_memory(self, checkpoints: tuple[int, ...]) -> dict[str, float]:
        """RSS (MB) of one worker after it applied messages for n distinct keys, per n."""
        import psutil

        self.stop_workers()
        lkey = latency_key(self.settings)
        self.redis.delete(lkey)
        proc = start_keyq_worker(self.settings, f"0-{self.settings.partitions - 1}")
        self.procs.append(proc)
        self._wait_leases()
        ps = psutil.Process(proc.pid)
        out: dict[str, float] = {}
        done = 0
        with tqdm(total=max(checkpoints), desc="distinct keys", leave=False, unit="key") as bar:
            for target in sorted(checkpoints):
                while done < target:
                    stop = min(target, done + SEND_MANY_CHUNK * 10)
                    self.client.send_many(
                        ENTITY, ((f"m{i}", OP, {"by": 1}) for i in range(done, stop))
                    )
                    self.adds += stop - done
                    sent, done = stop - done, stop
                    wait_for(
                        lambda n=sent: int(self.redis.llen(lkey)) >= n,  # type: ignore[misc]
                        DRAIN_TIMEOUT_S,
                        "distinct-key messages to be applied",
                    )
                    _check_alive([proc])
                    self.redis.delete(lkey)
                    bar.update(sent)
                out[str(target)] = round(ps.memory_info().rss / 2**20, 1)
        self.stop_workers()
        return out


def _keys_per_partition(partitions: int, wanted: list[int]) -> dict[int, str]:
    out: dict[int, str] = {}
    i = 0
    while len(out) < len(wanted):
        key = f"probe{i}"
        p = partition_for(key, partitions)
        if p in wanted and p not in out:
            out[p] = key
        i += 1
    return out


def _paced_sender(
    settings: Settings,
    rate: float,
    total: int,
    keys: int,
    index: int,
    senders: int,
    barrier: Any,
) -> tuple[int, float]:
    """Open loop: message i goes at t0 + i/rate whatever the replies; returns (sent, how far
    behind schedule the sender fell at worst, in seconds)."""
    behind = 0.0
    with Client(settings) as client:
        client.send(ENTITY, bench_key(index), OP, {"by": 0})  # connect before the clock starts
        if barrier is not None:
            barrier.wait(timeout=60)
        t0 = time.monotonic()
        sent = 1
        for i in range(total):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                behind = max(behind, -delay)
            client.send(ENTITY, bench_key((i * senders + index) % keys), OP, {"by": 1})
            sent += 1
    return sent, behind


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
    results.put(_paced_sender(settings, rate, total, keys, index, senders, barrier))
