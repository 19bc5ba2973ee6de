"""The measurements: each function sets up what it needs on real workers and returns figures.

Throughput is measured as a drain: the queues are filled first and moved aside, the workers
start and get ready (idle, keyq's holding every partition lease), then the whole backlog is put
back in front of them at once (one MULTI of RENAMEs, with wake tokens); the rate is messages over
the time from that release to the last apply. So the producer does not compete with the workers
for the two cores, and neither does a worker's boot: with the workers started onto a full queue,
the second one began 40-190 ms after the first, a third of a 0.4 s drain. keyq workers report
each applied message ("<partition> <applied_at> <latency>") to a Redis list when
KEYQ_BENCH_LATENCY_KEY is set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis
import sqlalchemy as sa
from celery import Celery
from tqdm import tqdm

from keyq.bench.celery_noop import ECHO_TASK, NOOP_TASK, make_noop_app
from keyq.bench.cpu import CpuWindow, cpu_seconds
from keyq.bench.dispatch import dispatch_latency
from keyq.bench.infra import BenchServers
from keyq.bench.load import BackgroundLoad
from keyq.bench.plain_celery import idle_dispatch
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
from keyq.bench.producer import measure_producers
from keyq.bench.stats import ZipfSampler, parse_samples, percentile
from keyq.bench.workload import ENTITY, OP, bench_key
from keyq.client import Client
from keyq.cluster import Leases, assignment
from keyq.flower_events import DEFAULT_RATE as DEFAULT_EVENT_RATE
from keyq.flower_events import RATE_VARIABLE
from keyq.mailbox import Mailbox, unacked_records
from keyq.publisher import wake_key
from keyq.repo import Repo, state_table
from keyq.routing import partition_for
from keyq.settings import Settings

DRAIN_TIMEOUT_S = 300.0
CALL_BLOCKS = 10  # keyq and Celery round trips take turns in this many blocks each
CALL_WARMUP = 10  # untimed round trips per side first
SEND_MANY_CHUNK = 1000  # messages per send_many call while filling the queues
STAGED_SUFFIX = ":staged"  # a filled queue waits under this name while its workers start
READY_SETTLE_S = 0.3  # after the workers are ready: their consumers are in their idle wait
UNSAMPLED_EVENT_RATE = 1e9  # KEYQ_FLOWER_EVENT_RATE high enough that no success is sampled out
TAKEOVER_WARMUP_S = 1.5  # seconds of load before the kill
TAKEOVER_QUIET_S = 0.5  # idle takeover: seconds of nothing before the kill


@dataclass
class DrainResult:
    messages: int
    seconds: float
    produce_seconds: float
    latencies_s: list[float] = field(default_factory=list)
    worker_us_per_msg: float | None = None  # the workers' CPU per applied message

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def produce_rate(self) -> float:
        return self.messages / self.produce_seconds if self.produce_seconds > 0 else 0.0


def _check_alive(procs: list[Proc]) -> None:
    for p in procs:
        if not p.alive():
            raise RuntimeError(f"a {p.kind} worker exited early:\n{p.log_tail()}")


class Bench:
    """One benchmark run on its own database and Redis namespace."""

    def __init__(
        self,
        servers: BenchServers,
        workers: int,
        loglevel: str = "warning",
        changes: dict[str, Any] | None = None,
    ) -> None:
        self.servers = servers
        # `changes` (scripts/bench --setting) reach every keyq worker through Settings.to_env
        self.settings: Settings = servers.settings(**(changes or {}))
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
        return sum(self._lengths(queues))

    def _stage(self, queues: list[str]) -> list[str]:
        """Move the filled queues aside (one MULTI), while their workers start."""
        filled = [q for q, n in zip(queues, self._lengths(queues), strict=True) if n]
        pipe = self.redis.pipeline(transaction=True)
        for q in filled:
            pipe.rename(q, q + STAGED_SUFFIX)
        pipe.execute()
        return filled

    def _release(self, staged: list[str], wake: bool) -> float:
        """Put every staged queue back at once (one MULTI; with keyq's wake tokens); the time
        of the release, the drain's start."""
        pipe = self.redis.pipeline(transaction=True)
        for q in staged:
            pipe.rename(q + STAGED_SUFFIX, q)
            if wake:
                pipe.lpush(wake_key(q), 1)
                pipe.ltrim(wake_key(q), 0, 0)
        released = time.time()
        pipe.execute()
        return released

    def _lengths(self, queues: list[str]) -> list[int]:
        pipe = self.redis.pipeline(transaction=False)
        for q in queues:
            pipe.llen(q)
        return [int(n) for n in pipe.execute()]

    def _wait_celery_ready(self, procs: list[Proc]) -> None:
        """Every Celery worker answers a ping: it has booted and consumes its queue."""
        deadline = time.monotonic() + 60
        while len(self.celery_app.control.ping(timeout=0.5) or []) < len(procs):
            _check_alive(procs)
            if time.monotonic() > deadline:
                raise TimeoutError("plain Celery workers did not answer a ping within 60 s")
        time.sleep(READY_SETTLE_S)

    def stop_workers(self) -> None:
        stop_all(self.procs)
        self.procs = []

    def _start_keyq_static(self, extra_env: dict[str, str] | None = None) -> list[Proc]:
        procs = [
            start_keyq_worker(self.settings, spec, self.loglevel, extra_env)
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

    # --- producers ---------------------------------------------------------------------------

    def producers(self, messages: int, keys: int) -> dict[str, Any]:
        """Client.send, send_many and Celery's apply_async in this thread (no worker running)."""
        return measure_producers(self.settings, self.celery_app, ENTITY, OP, messages, keys)

    # --- plain Celery ------------------------------------------------------------------------

    def start_celery_workers(self) -> list[Proc]:
        procs = [
            start_celery_worker(
                self.settings.broker_url, self.settings.redis_url, self.celery_queue, self.loglevel
            )
            for _ in range(self.workers)
        ]
        self.procs.extend(procs)
        return procs

    def stop_these(self, procs: list[Proc]) -> None:
        stop_all(procs)
        self.procs = [p for p in self.procs if p not in procs]

    def celery_drain(self, n: int) -> DrainResult:
        """Fill the no-op queue with n tasks and move it aside, start the Celery workers and
        wait until they answer a ping, release the queue and time the drain; the workers' CPU
        is read at the release and at the end."""
        started = time.perf_counter()
        for _ in tqdm(range(n), desc="fill celery queue", leave=False, unit="msg"):
            self.celery_app.send_task(NOOP_TASK, queue=self.celery_queue)
        produce_s = time.perf_counter() - started
        staged = self._stage([self.celery_queue])
        procs = self.start_celery_workers()
        self._wait_celery_ready(procs)
        base = sum(cpu_seconds(p.pid) for p in procs)
        t_start = self._release(staged, wake=False)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S

        def left() -> int:
            queued = int(self.redis.llen(self.celery_queue))
            return queued + len(unacked_records(self.redis, self.celery_queue))

        while left() > 0:
            _check_alive(procs)
            if time.monotonic() > deadline:
                raise TimeoutError("plain Celery did not drain its queue")
            time.sleep(0.002)
        t_end = time.time()
        cpu = CpuWindow()
        cpu.add(sum(cpu_seconds(p.pid) for p in procs) - base, n)
        self.stop_these(procs)
        return DrainResult(n, t_end - t_start, produce_s, worker_us_per_msg=cpu.us_per_msg)

    def call_comparison(self, count: int) -> tuple[list[float], list[float]]:
        """Sequential round trips, keyq's Client.call and Celery's apply_async().get() (Redis
        result backend) taking turns in blocks, both sides' workers running: (keyq, Celery)."""
        procs = self.start_celery_workers()
        keyq: list[float] = []
        celery: list[float] = []
        try:
            self._celery_calls(CALL_WARMUP, [])  # waits for the workers and warms connections
            self._keyq_calls(CALL_WARMUP, [])
            per_block = max(1, count // CALL_BLOCKS)
            with tqdm(total=2 * per_block * CALL_BLOCKS, desc="calls", leave=False) as bar:
                for _ in range(CALL_BLOCKS):
                    self._keyq_calls(per_block, keyq)
                    self._celery_calls(per_block, celery)
                    bar.update(2 * per_block)
        finally:
            self.stop_these(procs)
        return keyq, celery

    def _celery_calls(self, count: int, out: list[float]) -> None:
        echo = self.celery_app.tasks[ECHO_TASK]
        for i in range(count):
            t = time.perf_counter()
            result = echo.apply_async(args=[i], queue=self.celery_queue)
            value = result.get(timeout=60)
            elapsed = time.perf_counter() - t
            result.forget()
            if value != i:
                raise RuntimeError(f"plain Celery echo returned {value!r}, not {i}")
            out.append(elapsed)

    def _keyq_calls(self, count: int, out: list[float]) -> None:
        for i in range(count):
            t = time.perf_counter()
            self.client.call(ENTITY, f"call{i % 100}", OP, {"by": 1}, timeout=30)
            out.append(time.perf_counter() - t)
            self.adds += 1

    # --- keyq throughput ---------------------------------------------------------------------

    def keyq_drain(
        self,
        n: int,
        keys: int,
        bulk: bool,
        keep_running: bool = False,
        worker_env: dict[str, str] | None = None,
    ) -> DrainResult:
        """Fill the partition queues with n adds over `keys` keys (one broker message per add,
        or send_many's one per partition) and move them aside, start the keyq workers (with
        `worker_env` added to their environment) and wait until they hold every partition
        lease, release the queues and time the drain; the workers' CPU is read at the release
        and at the end."""
        lkey = latency_key(self.settings)
        self.redis.delete(lkey)
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
        queues = [self.settings.queue_name(p) for p in range(self.settings.partitions)]
        staged = self._stage(queues)
        procs = self._start_keyq_static(worker_env)
        self._wait_leases()
        time.sleep(READY_SETTLE_S)
        _check_alive(procs)
        base = sum(cpu_seconds(p.pid) for p in procs)
        t_start = self._release(staged, wake=True)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while int(self.redis.llen(lkey)) < n:
            _check_alive(procs)
            if time.monotonic() > deadline:
                raise TimeoutError(f"keyq applied {self.redis.llen(lkey)} of {n} messages")
            time.sleep(0.005)
        after = sum(cpu_seconds(p.pid) for p in procs)
        samples = parse_samples(self.redis.lrange(lkey, 0, -1))
        t_end = max(s.applied_at for s in samples)
        cpu = CpuWindow()
        cpu.add(after - base, n)
        if not keep_running:
            self.stop_workers()
        return DrainResult(
            n,
            t_end - t_start,
            produce_s,
            [s.latency_s for s in samples],
            worker_us_per_msg=cpu.us_per_msg,
        )

    def events_cost(self, n: int, keys: int) -> dict[str, Any]:
        """The throughput cost of the task events Flower reads (keyq.flower_events): the same
        send drain with the events off (KEYQ_FLOWER_EVENT_RATE=0), on as deployed (the default
        rate, successes sampled above it) and on for every message (no sampling), in this order
        (one drain each; `ratio` and `all_ratio` are on/off and every/off)."""
        drains: dict[str, DrainResult] = {}
        for name, rate in (
            ("off", "0"),
            ("on", f"{DEFAULT_EVENT_RATE:g}"),
            ("all", f"{UNSAMPLED_EVENT_RATE:g}"),
        ):
            drains[name] = self.keyq_drain(n, keys, bulk=False, worker_env={RATE_VARIABLE: rate})
        off, on, every = drains["off"], drains["on"], drains["all"]
        return {
            "messages": n,
            "on_rate_setting": DEFAULT_EVENT_RATE,
            "off_msgs_per_s": off.rate,
            "on_msgs_per_s": on.rate,
            "ratio": on.rate / off.rate if off.rate else None,
            "all_msgs_per_s": every.rate,
            "all_ratio": every.rate / off.rate if off.rate else None,
            "off_worker_us_per_msg": off.worker_us_per_msg,
            "on_worker_us_per_msg": on.worker_us_per_msg,
            "all_worker_us_per_msg": every.worker_us_per_msg,
        }

    # --- latency -----------------------------------------------------------------------------

    def dispatch_latency(self, rate: float, seconds: float, keys: int) -> dict[str, Any]:
        """Send at a fixed rate (open loop, enough producer processes) with the workers
        running; send-to-applied latency, asked and achieved rates."""
        workers = [p for p in self.procs if p.kind == "keyq"]
        before = sum(cpu_seconds(p.pid) for p in workers)
        out = dispatch_latency(self.settings, self.redis, rate, seconds, keys)
        self.adds += out["sent"] - out["senders"]  # each sender's first message adds 0
        # the workers' CPU per message at this rate (their idle polling included)
        cpu = CpuWindow()
        cpu.add(sum(cpu_seconds(p.pid) for p in workers) - before, out["sent"])
        out["worker_us_per_msg"] = cpu.us_per_msg
        return out

    def plain_celery_dispatch(self, count: int, keys: int) -> dict[str, Any]:
        """Send to applied on idle keyq workers (those running): messages published by plain
        Celery's send_task (docs/wire.md, no wake token) against keyq's Client.send, taking
        turns one at a time (keyq.bench.plain_celery)."""
        if not any(p.kind == "keyq" and p.alive() for p in self.procs):
            raise RuntimeError("plain_celery_dispatch needs keyq workers running")
        app = Celery("keyq_bench_plain", broker=self.settings.broker_url, set_as_current=False)
        try:
            out = idle_dispatch(self.settings, self.redis, self.client, app, count, keys)
        finally:
            app.close()
        self.adds += out["adds"]
        return out

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
        """Two rendezvous workers, idle (load_rate 0) or under a paced load of load_rate msg/s
        offered by a sender process; kill -9 one; one probe message to each of its partitions
        right after the kill; time until the survivor applies a message of every partition the
        victim held (`takeover_ms`), and until it holds all their leases (`lease_takeover_ms`).

        Consecutive calls share workers: the survivor of one is kept and one worker is started
        beside it, so the next measure starts once the two have split the partitions again."""
        procs, nodes = self._rendezvous_pair()
        lkey = latency_key(self.settings)
        self.redis.delete(lkey)
        leases = Leases(self.redis, self.settings)
        victim, survivor_node = procs[0], nodes[1]
        victim_parts = sorted(p for p, info in leases.holders().items() if info.owner == nodes[0])
        probe_keys = _keys_per_partition(self.settings.partitions, victim_parts)
        all_queues = [self.settings.queue_name(p) for p in range(self.settings.partitions)]
        load = BackgroundLoad(self.settings, load_rate, keys) if load_rate > 0 else None
        if load is not None:
            load.start()
            time.sleep(TAKEOVER_WARMUP_S)
        else:
            time.sleep(TAKEOVER_QUIET_S)  # idle: nothing in flight, the workers wait for work
        queued_before = self._queue_total(all_queues)
        t_kill = time.time()
        victim.kill9()
        # what the victim had claimed and not settled: the survivor restores it at the queue
        # heads, and a redelivered message is applied alone (one commit each)
        pipe = self.redis.pipeline(transaction=False)
        for p in victim_parts:
            pipe.llen(self.mailbox.inflight_key(p))
        inflight = sum(int(n) for n in pipe.execute())
        for p in victim_parts:
            self.client.send(ENTITY, probe_keys[p], OP, {"by": 1})
        lease_ms: float | None = None
        seen: dict[int, float] = {}
        read = 0
        deadline = time.monotonic() + 30
        try:
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
            queued_after = self._queue_total(all_queues)
        finally:
            loaded = load.stop() if load is not None else None
        total_sent = (loaded.sent if loaded else 0) + len(victim_parts)
        self.adds += total_sent
        all_applied = True
        try:
            wait_for(lambda: self.counter_total() == self.adds, 30.0, "the load to be applied")
        except TimeoutError:
            all_applied = False
        first = sorted((t - t_kill) * 1000 for t in seen.values())
        out: dict[str, Any] = {
            "victim_partitions": len(victim_parts),
            "takeover_ms": first[-1] if len(first) == len(victim_parts) else None,
            "first_partition_ms": first[0] if first else None,
            "median_partition_ms": percentile(first, 50),
            "partition_ms": [round(ms, 1) for ms in first],  # each victim partition, sorted
            "lease_takeover_ms": lease_ms,
            "lease_ttl_ms": self.settings.lease_ttl_ms,
            "inflight_at_kill": inflight,
            # messages waiting in the partition queues just before the kill, and when the last
            # victim partition was served (or at the 30 s deadline): did the workers keep up?
            "queued_before_kill": queued_before,
            "queued_when_served": queued_after,
            "load_rate_asked": load_rate,
            "load_rate_achieved": loaded.achieved if loaded else 0.0,
            "load_behind_s": loaded.behind_s if loaded else 0.0,
            "load_flagged": loaded.flagged if loaded else False,
            "sent": total_sent,
            "all_applied": all_applied,
        }
        if not all_applied or len(first) < len(victim_parts):
            out["diagnostics"] = self._diagnostics(victim_parts, seen)
        return out

    def _rendezvous_pair(self) -> tuple[list[Proc], list[str]]:
        """Two rendezvous (unpinned) keyq workers that have split the partitions between them,
        oldest first, with their node ids: live ones already running are kept, every other
        worker (static slices, plain Celery, dead ones) is stopped, the rest are started."""
        keep = [p for p in self.procs if p.kind == "keyq" and p.partitions is None and p.alive()]
        keep = keep[:2]
        self.stop_these([p for p in self.procs if p not in keep])
        procs = keep + [
            start_keyq_worker(self.settings, None, self.loglevel) for _ in range(2 - len(keep))
        ]
        self.procs.extend(procs[len(keep) :])
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
        return procs, nodes

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
