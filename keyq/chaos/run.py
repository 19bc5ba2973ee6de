"""scripts/chaos: a journal load on real workers under a seeded schedule of faults, then a
check of every key against what the producers saw accepted.

It starts its own Redis (AOF, fsync always) and PostgreSQL on free loopback ports, two worker
processes, and producer threads; applies the faults (worker kill -9, SIGSTOP past the lease,
PostgreSQL immediate restart, Redis kill -9 and restart, poison on the broker); waits for the
broker to drain; verifies. Exit status: 0 when nothing was lost, doubled or reordered and the
broker drained; 1 otherwise; 2 when the run could not be set up; 130 on Ctrl-C. Everything it
started is stopped and its temporary directory removed, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import redis

from keyq.chaos import report, schedule
from keyq.chaos.broker import backlog, poison_left
from keyq.chaos.cluster import Workers
from keyq.chaos.load import ENTITY, Load, journal_key
from keyq.chaos.poison import push_poison
from keyq.chaos.servers import PrivatePostgres, PrivateRedis
from keyq.chaos.verify import verify
from keyq.client import Client
from keyq.repo import Repo
from keyq.routing import partition_for
from keyq.settings import DEFAULT_PARTITIONS, Settings

NAMESPACE = "chaos"
TICK_S = 0.1  # how often the run supervises workers while it waits
READ_CHUNK = 500  # keys per Repo read when verifying
EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass(frozen=True)
class Mode:
    name: str
    messages: int
    keys: int
    faults: int
    rate: float  # messages per second, over all producers
    drain_timeout_s: float  # the broker must drain within this after the load
    stall_s: float  # ... and never go this long without progress


MODES = {
    "quick": Mode("quick", 10_000, 1_000, 6, 400.0, 60.0, 30.0),
    "full": Mode("full", 100_000, 1_000, 20, 500.0, 300.0, 60.0),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/chaos",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="examples:\n  scripts/chaos --quick --seed 7 --json chaos.json\n"
        "  scripts/chaos --quick --no-poison\n  scripts/chaos --faults kill9,redis_restart",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="the CI run (under 2 minutes)")
    parser.add_argument("--seed", type=int, default=None, help="schedule seed (default: random)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the report here")
    parser.add_argument("--no-poison", action="store_true", help="leave poison out")
    parser.add_argument(
        "--faults",
        default=",".join(schedule.FAULT_KINDS),
        help=f"fault kinds, comma-separated (default: {','.join(schedule.FAULT_KINDS)})",
    )
    parser.add_argument("--fault-count", type=int, default=None, help="faults to apply")
    parser.add_argument("--messages", type=int, default=None, help="journal appends to send")
    parser.add_argument("--keys", type=int, default=None, help="distinct keys (at least 1)")
    parser.add_argument("--rate", type=float, default=None, help="target sends per second")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--producers", type=int, default=4, help="producer threads")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS)
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (server and worker logs)"
    )
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    args.mode = mode
    args.seed = random.randrange(1_000_000) if args.seed is None else args.seed
    args.messages = mode.messages if args.messages is None else args.messages
    args.keys = mode.keys if args.keys is None else args.keys
    args.rate = mode.rate if args.rate is None else args.rate
    args.fault_count = mode.faults if args.fault_count is None else args.fault_count
    try:
        kinds = schedule.check_kinds([k.strip() for k in args.faults.split(",") if k.strip()])
        if args.no_poison:
            kinds = [k for k in kinds if k != schedule.POISON]
        args.kinds = schedule.check_kinds(kinds)
    except ValueError as e:
        parser.error(str(e))
    if min(args.messages, args.keys, args.workers, args.producers) < 1 or args.rate <= 0:
        parser.error("--messages, --keys, --workers, --producers and --rate must be positive")
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="keyq-chaos-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept: {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


class Run:
    """One chaos run; every resource it starts is registered on ``stack``."""

    def __init__(self, args: argparse.Namespace, stack: ExitStack, workdir: Path) -> None:
        self.args = args
        self.stack = stack
        self.workdir = workdir
        self.faults: list[dict[str, Any]] = []
        self.poison_sent = 0
        self.poison_partitions: list[int] = []
        self.load_t0 = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.load_t0 if self.load_t0 else 0.0

    def setup(self) -> None:
        self.redis = PrivateRedis(self.workdir / "redis")
        self.stack.callback(self.redis.stop)
        self.redis.start()
        self.pg = PrivatePostgres(self.workdir / "pg")
        self.stack.callback(self.pg.stop)
        self.pg.init()
        self.pg.start()
        self.settings = Settings(
            broker_url=self.redis.url,
            redis_url=self.redis.url,
            database_url=self.pg.url,
            namespace=NAMESPACE,
            partitions=self.args.partitions,
            entity_modules=("keyq.examples",),
        )
        self.repo = Repo(self.pg.url)
        self.stack.callback(self.repo.dispose)
        self.repo.migrate()
        self.admin = redis.Redis.from_url(self.redis.url, socket_timeout=5)
        self.stack.callback(self.admin.close)
        (self.workdir / "logs").mkdir()
        self.workers = Workers(self.settings, self.args.workers, self.workdir / "logs")
        self.stack.callback(self.workers.stop)
        self.workers.start()
        self.workers.wait_ready(self.admin)
        self.client = Client(self.settings)
        self.stack.callback(self.client.close)

    def tick(self, seconds: float) -> None:
        """Wait, supervising the workers meanwhile."""
        end = time.monotonic() + seconds
        while True:
            self.workers.check(self.elapsed())
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(TICK_S, left))

    def apply(self, fault: schedule.Fault) -> None:
        started = self.elapsed()
        record: dict[str, Any] = {
            "planned_at_s": round(fault.at_s, 3),
            "at_s": round(started, 3),
            "wall": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "kind": fault.kind,
        }
        if fault.kind == schedule.KILL9:
            record["worker"] = fault.worker
            record["pid"] = self.workers.kill9(fault.worker)
        elif fault.kind == schedule.SIGSTOP:
            record["worker"] = fault.worker
            record["pid"] = self.workers.signal(fault.worker, signal.SIGSTOP)
            self.tick(fault.duration_s)
            self.workers.signal(fault.worker, signal.SIGCONT)
        elif fault.kind == schedule.PG_RESTART:
            self.pg.stop_immediate()
            self.tick(fault.duration_s)
            self.pg.start()
        elif fault.kind == schedule.REDIS_RESTART:
            self.redis.kill9()
            self.tick(fault.duration_s)
            self.redis.start()
        elif fault.kind == schedule.POISON:
            for variant, partition in fault.poison:
                push_poison(self.admin, self.settings, variant, partition)
                self.poison_sent += 1
                self.poison_partitions.append(partition)
            record["poison"] = [f"{v}@p{p}" for v, p in fault.poison]
        if fault.duration_s:
            record["duration_s"] = round(fault.duration_s, 3)
        record["ended_s"] = round(self.elapsed(), 3)
        self.faults.append(record)
        print(f"  {record['at_s']:7.2f}s  {fault.kind}", flush=True)

    def load_and_faults(self, load: Load, plan: list[schedule.Fault]) -> None:
        load.start()
        self.load_t0 = time.monotonic()
        for fault in plan:
            self.tick(max(0.0, fault.at_s - self.elapsed()))
            self.apply(fault)
        while load.running():
            self.tick(0.5)
        load.join()

    def drain(self) -> dict[str, Any]:
        """Wait for the broker to hold nothing of ours; a stall is a lack of progress."""
        mode: Mode = self.args.mode
        started = time.monotonic()
        best, best_at, left = -1, started, {"total": -1}
        while True:
            try:
                left = backlog(self.admin, self.settings)
            except redis.RedisError:
                left = {"total": -1}
            if left["total"] == 0:
                seconds = round(time.monotonic() - started, 1)
                return {"seconds": seconds, "stall": False, "left": left}
            now = time.monotonic()
            if best < 0 or 0 <= left["total"] < best:
                best, best_at = left["total"], now
            if now - best_at > mode.stall_s or now - started > mode.drain_timeout_s:
                return {"seconds": round(now - started, 1), "stall": True, "left": left}
            self.tick(0.25)

    def journals(self) -> dict[str, list[object] | None]:
        keys = [journal_key(i) for i in range(self.args.keys)]
        out: dict[str, list[object] | None] = {}
        for start in range(0, len(keys), READ_CHUNK):
            chunk = [(ENTITY, k) for k in keys[start : start + READ_CHUNK]]
            for (_, key), stored in self.repo.load(chunk).items():
                state = stored.state
                items = state.get("items") if isinstance(state, dict) else None
                out[key] = list(items) if isinstance(items, list) else None
        return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    with ExitStack() as stack:
        workdir = stack.enter_context(_workdir(args.keep))
        chaos = Run(args, stack, workdir)
        print(f"keyq chaos: seed {args.seed}; servers and workers in {workdir}", flush=True)
        chaos.setup()
        window = args.messages / args.rate
        plan = schedule.make_schedule(
            args.seed,
            args.fault_count,
            args.kinds,
            window,
            args.workers,
            args.partitions,
            chaos.settings.lease_ttl_s,
        )
        load = Load(chaos.client, args.messages, args.keys, args.producers, args.rate)
        stack.callback(load.join, 5.0)
        stack.callback(load.stop.set)
        print(f"load: {args.messages} messages over {args.keys} keys, about {window:.0f} s")
        chaos.load_and_faults(load, plan)
        load_s = chaos.elapsed()
        print("load done; draining", flush=True)
        drain = chaos.drain()
        verdict = verify(load.sent(), chaos.journals())
        letters = chaos.repo.dead_letters(limit=10_000_000)
        journal_letters = sum(d.entity == ENTITY and d.key.startswith("j") for d in letters)
        left_poison = poison_left(chaos.admin, chaos.settings)
        hit = {partition_for(k, args.partitions) for k in verdict.affected}
        poison_hit = sum(p in hit for p in chaos.poison_partitions)
        accounted = 0 if drain["stall"] else chaos.poison_sent - max(left_poison, poison_hit)
        unplanned = len(chaos.workers.deaths)
        doc: dict[str, Any] = {
            "seed": args.seed,
            "mode": args.mode.name,
            "config": {
                "messages": args.messages,
                "keys": args.keys,
                "rate": args.rate,
                "workers": args.workers,
                "producers": args.producers,
                "partitions": args.partitions,
                "lease_ttl_ms": chaos.settings.lease_ttl_ms,
                "fault_kinds": args.kinds,
                "fault_count": args.fault_count,
                "poison": schedule.POISON in args.kinds,
            },
            "summary": {
                "accepted": verdict.accepted,
                "applied": verdict.applied,
                "lost": verdict.lost,
                "doubled": verdict.doubled,
                "out_of_order": verdict.out_of_order,
                "unknown": verdict.unknown,
                "uncertain": verdict.uncertain,
                "applied_uncertain": verdict.applied_uncertain,
                "dead_lettered": len(letters),
                "poison_sent": chaos.poison_sent,
                "poison_accounted": accounted,
                "worker_deaths_unplanned": unplanned,
                "stall": drain["stall"],
            },
            "journal": verdict.to_json(),
            "dead_letters": {
                "journal": journal_letters,
                "other": len(letters) - journal_letters,
                "reasons": dict(Counter(d.reason for d in letters)),
            },
            "poison": {
                "sent": chaos.poison_sent,
                "left_on_broker": left_poison,
                "on_partitions_with_problems": poison_hit,
            },
            "partitions_with_problems": sorted(hit),
            "producers": {"send_errors": load.errors(), "unsent": load.unsent()},
            "workers": {"started": chaos.workers.started, "deaths": chaos.workers.deaths},
            "faults": chaos.faults,
            "faults_planned": [f.to_json() for f in plan],
            "drain": drain,
            "timing": {"load_s": round(load_s, 1)},
        }
    failures = [k for k in ("lost", "doubled", "out_of_order", "unknown") if doc["summary"][k]]
    if drain["stall"]:
        failures.append("stall")
    if doc["producers"]["unsent"]:
        failures.append("unsent")
    doc["failures"] = failures
    doc["ok"] = not failures
    doc["timing"]["total_s"] = round(time.monotonic() - started, 1)
    return doc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        doc = run(args)
    except KeyboardInterrupt:
        print("keyq chaos: interrupted; everything it started is stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RuntimeError, OSError, redis.RedisError) as e:
        print(f"keyq chaos: could not run: {e}", file=sys.stderr)
        return EXIT_SETUP
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()
    print(report.summary(doc))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        print(f"report: {args.json_path}")
    return EXIT_OK if doc["ok"] else EXIT_FAILED
