"""scripts/bench: keyq side by side with plain Celery on real Redis and PostgreSQL.

One run measures, on the same broker and with the same number of worker processes: producer
cost in one thread (Client.send and send_many against Celery's apply_async), drain throughput
of durable keyed messages (send and send_many) against plain Celery no-op tasks with the
workers' CPU per message, send-to-applied latency at half of keyq's peak and at fixed rates
offered by enough producer processes (a point whose producers fell behind is flagged), call
round trips against Celery's apply_async().get() taking turns, the cache hit ratio of Zipf
reads, the throughput cost of the task events Flower reads (send drains with them off, on as
deployed, and on for every message), the send-to-applied latency on idle workers of messages
published by plain Celery's send_task against keyq's Client, takeover after kill -9 (idle, at
200 msg/s, and under a load of 1,000-1,500 msg/s) and (full mode) one worker's memory over 10k,
100k and 1M keys.
It creates its own PostgreSQL database and Redis namespace and removes both at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from keyq.bench import report
from keyq.bench.infra import BenchServers, machine, setting_changes, versions
from keyq.bench.scenarios import Bench
from keyq.bench.stats import latency_summary_ms, median_or_none, ratio
from keyq.errors import ConfigurationError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/6"
DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
MEMORY_CHECKPOINTS = (10_000, 100_000, 1_000_000)
ROOT = Path(__file__).resolve().parents[2]
SWEEP_QUICK = (200.0, 1000.0, 5000.0)  # paced rates (msg/s) of a --quick run
TAKEOVER_RATE = 200.0  # msg/s of load during the takeover reported as `takeover_ms`


@dataclass(frozen=True)
class Mode:
    """How much of each measure a run does."""

    name: str
    messages: int  # adds per single-send drain
    bulk_messages: int  # adds per send_many drain
    keys: int  # distinct keys of the throughput runs (and of the Zipf reads)
    latency_s: float  # seconds of paced sending
    calls: int
    reads: int
    repeats: int  # throughput runs; the medians are reported
    takeover: bool
    memory: bool
    sweep: tuple[float, ...]  # further paced rates (msg/s): the latency curve below half peak
    producer_messages: int  # sends per loop of the same-thread producer comparison
    events_messages: int  # adds per send drain of the task events' cost (three drains)
    takeover_load_rate: float  # msg/s offered by a sender process during the loaded takeover
    plain_celery_messages: int  # per producer: idle-worker dispatch, plain Celery vs Client


MODES = {
    "smoke": Mode(
        "smoke",
        300,
        2_000,
        100,
        1.0,
        20,
        300,
        1,
        True,
        False,
        (1000.0, 2000.0),
        300,
        300,
        takeover_load_rate=1000.0,
        plain_celery_messages=10,
    ),
    "quick": Mode(
        "quick",
        10_000,
        50_000,
        1_000,
        3.0,
        300,
        5_000,
        1,
        True,
        False,
        SWEEP_QUICK,
        5_000,
        10_000,
        takeover_load_rate=1500.0,
        plain_celery_messages=80,
    ),
    "full": Mode(
        "full",
        30_000,
        200_000,
        10_000,
        10.0,
        1_000,
        50_000,
        3,
        True,
        True,
        (50.0, 100.0, 200.0, 400.0, 1000.0, 2000.0, 5000.0),
        20_000,
        30_000,
        takeover_load_rate=1500.0,
        plain_celery_messages=200,
    ),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: scripts/bench --quick --json bench.json --plot bench.png",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a run under two minutes")
    mode.add_argument("--smoke", action="store_true", help="seconds; proves the script works")
    parser.add_argument("--json", dest="json_path", help="write the results here")
    parser.add_argument("--plot", default="bench.png", help="PNG plot path ('' for none)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per side")
    parser.add_argument("--repeats", type=int, default=None, help="throughput runs (median)")
    parser.add_argument(
        "--max-rate",
        type=float,
        default=None,
        help="cap of the paced sender's rate for the latency measure (msg/s)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("KEYQ_BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis for broker, cache and results (use a DB of your own)",
    )
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get("KEYQ_BENCH_PG_ADMIN_URL", DEFAULT_PG_ADMIN_URL),
        help="PostgreSQL maintenance database; the run creates and drops its own database",
    )
    parser.add_argument("--loglevel", default="warning", help="log level of all workers")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEYQ_NAME=VALUE",
        help="run keyq's side with this setting (repeatable), e.g. KEYQ_FOLLOW_ON=0 to measure "
        "without the follow-on batch; the run's servers, namespace and entities stay the bench's",
    )
    parser.add_argument(
        "--memory-script",
        action="store_true",
        help="full mode: measure memory with scripts/bench_memory (flushes --redis-url's DB)",
    )
    return parser.parse_args(argv)


def check_plot(path: str) -> None:
    """A plot needs matplotlib, which a plain install lacks (the `bench` extra has it): refuse
    before the run starts, not after it with its figures unwritten."""
    if path and importlib.util.find_spec("matplotlib") is None:
        raise ConfigurationError(
            f"--plot {path} needs matplotlib, which this Python lacks: pip install 'keyq[bench]' "
            "(scripts/install test has it), or pass --plot '' to run without a plot"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    repeats = args.repeats or mode.repeats
    changes = setting_changes(args.setting)  # refused before anything starts
    check_plot(args.plot)
    servers = BenchServers.new(args.redis_url, args.pg_admin_url)
    doc: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "scripts/bench " + " ".join(sys.argv[1:]),
        "config": {
            **asdict(mode),
            "repeats": repeats,
            "workers": args.workers,
            "settings": list(args.setting),
        },
        "namespace": servers.namespace,
        "database": servers.database,
        "machine": machine(),
        "versions": versions(args.redis_url, args.pg_admin_url),
    }
    stages = 2 * repeats + 7
    bar = tqdm(total=stages, desc="bench", unit="stage")
    servers.create()
    bench = Bench(servers, args.workers, args.loglevel, changes)
    timings: dict[str, float] = {}
    doc["stage_s"] = timings
    current: list[Any] = ["setup", time.monotonic()]

    def mark(name: str) -> None:
        """Progress: name the stage now running and time the one that ended."""
        now = time.monotonic()
        timings[current[0]] = round(timings.get(current[0], 0.0) + now - current[1], 2)
        current[:] = [name, now]
        bar.set_postfix_str(name)

    runs: list[dict[str, Any]] = []
    celery_call_s: list[float] = []
    keyq_call_s: list[float] = []
    dispatch_s: list[float] = []
    try:
        mark("producers, one thread: send, apply_async, send_many")
        producer = bench.producers(mode.producer_messages, mode.keys)
        doc["producer"] = producer
        doc.update(producer_figures(producer))
        mark("task events for Flower: send drains with events off, on, every message")
        doc["events_cost"] = bench.events_cost(mode.events_messages, mode.keys)
        bar.update()
        for r in range(repeats):
            last = r == repeats - 1
            mark(f"plain Celery drain {r + 1}/{repeats}")
            celery = bench.celery_drain(mode.messages)
            bar.update()
            mark(f"keyq drain {r + 1}/{repeats}")
            single = bench.keyq_drain(mode.messages, mode.keys, bulk=False)
            bulk = bench.keyq_drain(mode.bulk_messages, mode.keys, bulk=True, keep_running=last)
            bar.update()
            runs.append(
                {
                    "celery_msgs_per_s": celery.rate,
                    "keyq_msgs_per_s": single.rate,
                    "send_many_msgs_per_s": bulk.rate,
                    "send_many_produce_msgs_per_s": bulk.produce_rate,
                    "send_produce_msgs_per_s": single.produce_rate,
                    "celery_worker_us_per_msg": celery.worker_us_per_msg,
                    "keyq_worker_us_per_msg": single.worker_us_per_msg,
                    "send_many_worker_us_per_msg": bulk.worker_us_per_msg,
                }
            )
        med = {k: median_or_none([run[k] for run in runs]) for k in runs[0]}
        doc.update({k: v for k, v in med.items() if not k.endswith("worker_us_per_msg")})
        doc["runs"] = runs
        doc["ratio"] = ratio(med["keyq_msgs_per_s"], med["celery_msgs_per_s"])
        doc["send_many_ratio"] = ratio(med["send_many_msgs_per_s"], med["celery_msgs_per_s"])
        doc["worker_us_per_msg"] = {
            "keyq": med["keyq_worker_us_per_msg"],
            "celery": med["celery_worker_us_per_msg"],
            "keyq_send_many": med["send_many_worker_us_per_msg"],
        }

        rate = (med["keyq_msgs_per_s"] or 0.0) / 2
        if args.max_rate:
            rate = min(rate, args.max_rate)
        mark(f"dispatch latency at {rate:,.0f} msg/s")
        latency = bench.dispatch_latency(rate, mode.latency_s, mode.keys)
        dispatch_s = latency.pop("latencies_s")
        doc["dispatch"] = latency
        doc["dispatch_rate_target_msgs_per_s"] = rate  # half of the send drain peak
        doc["dispatch_rate_msgs_per_s"] = latency["rate_achieved"]
        doc["dispatch_flagged"] = latency["flagged"]
        doc["dispatch_p50_ms"] = latency["summary_ms"]["p50"]
        doc["dispatch_p95_ms"] = latency["summary_ms"]["p95"]
        doc["dispatch_p99_ms"] = latency["summary_ms"]["p99"]
        doc["dispatch_sweep"] = []
        for point in mode.sweep:
            mark(f"dispatch latency at {point:,.0f} msg/s")
            swept = bench.dispatch_latency(point, mode.latency_s, mode.keys)
            swept.pop("latencies_s")
            doc["dispatch_sweep"].append(swept)
        mark("idle-worker dispatch: plain Celery send_task vs Client.send")
        plain = bench.plain_celery_dispatch(mode.plain_celery_messages, mode.keys)
        doc["plain_celery_dispatch"] = plain
        probe = latency_summary_ms(bench.pg_commit_probe(mode.calls))
        doc["pg_commit_p50_ms"], doc["pg_commit_p95_ms"] = probe["p50"], probe["p95"]
        bar.update()

        mark("calls: keyq call and Celery apply_async().get(), taking turns")
        keyq_call_s, celery_call_s = bench.call_comparison(mode.calls)
        call = latency_summary_ms(keyq_call_s)
        celery_call = latency_summary_ms(celery_call_s)
        doc["call_p50_ms"], doc["call_p95_ms"], doc["call_p99_ms"] = (
            call["p50"],
            call["p95"],
            call["p99"],
        )
        doc["celery_call_p50_ms"] = celery_call["p50"]
        doc["celery_call_p95_ms"] = celery_call["p95"]
        doc["celery_call_p99_ms"] = celery_call["p99"]
        doc["call_ratio_p50"] = ratio(call["p50"], celery_call["p50"])
        doc["call_ratio_p95"] = ratio(call["p95"], celery_call["p95"])
        bar.update()

        mark("Zipf reads")
        cache = bench.cache_hit_ratio(mode.reads, mode.keys, 1.1)
        doc["cache"] = cache
        doc["cache_hit_ratio"] = cache["ratio"]
        bar.update()

        doc["takeover_ms"] = doc["takeover_idle_ms"] = doc["takeover_load_ms"] = None
        if mode.takeover:
            # one pair of workers throughout: each measure keeps the survivor of the last
            mark("takeover after kill -9, idle")
            idle = bench.takeover(load_rate=0.0, keys=mode.keys)
            doc["takeover_idle"] = idle
            doc["takeover_idle_ms"] = idle["takeover_ms"]
            mark(f"takeover after kill -9 at {TAKEOVER_RATE:,.0f} msg/s")
            takeover = bench.takeover(load_rate=TAKEOVER_RATE, keys=mode.keys)
            doc["takeover"] = takeover
            doc["takeover_ms"] = takeover["takeover_ms"]
            mark(f"takeover after kill -9 under load, {mode.takeover_load_rate:,.0f} msg/s")
            loaded = bench.takeover(load_rate=mode.takeover_load_rate, keys=mode.keys)
            doc["takeover_load"] = loaded
            doc["takeover_load_ms"] = loaded["takeover_ms"]
            doc["takeover_load_rate_msgs_per_s"] = loaded["load_rate_achieved"]
        bar.update()

        doc["rss_mb_10k"] = doc["rss_mb_100k"] = doc["rss_mb_1m"] = None
        if mode.memory:
            mark("worker memory 10k/100k/1M keys")
            memory = memory_figures(bench, args)
            doc["memory"] = memory
            doc["rss_mb_10k"] = memory.get("10000")
            doc["rss_mb_100k"] = memory.get("100000")
            doc["rss_mb_1m"] = memory.get("1000000")
        bar.update()

        bench.stop_workers()
        doc["exactly_once_verified"] = bench.verify_counters(bench.adds)
        doc["adds_sent"] = bench.adds
        bar.update()
        mark("cleanup")
    finally:
        bar.close()
        bench.close()
        servers.drop()
    doc["targets"] = report.targets(doc)
    doc["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    if args.plot:
        report.plot(args.plot, doc, dispatch_s, keyq_call_s, celery_call_s)
        doc["plot"] = args.plot
    return doc


def producer_figures(producer: dict[str, Any]) -> dict[str, float | None]:
    """The flat JSON keys of the same-thread producer comparison."""
    send, apply_async, many = producer["send"], producer["apply_async"], producer["send_many"]
    return {
        "send_msgs_per_s_one_thread": send["msgs_per_s"],
        "apply_async_msgs_per_s_one_thread": apply_async["msgs_per_s"],
        "send_many_msgs_per_s_one_thread": many["msgs_per_s"],
        "send_cpu_us": send["cpu_us_per_msg"],
        "apply_async_cpu_us": apply_async["cpu_us_per_msg"],
        "send_many_cpu_us": many["cpu_us_per_msg"],
        "send_produce_ratio": ratio(send["msgs_per_s"], apply_async["msgs_per_s"]),
        "send_many_produce_ratio": ratio(many["msgs_per_s"], apply_async["msgs_per_s"]),
    }


def memory_figures(bench: Bench, args: argparse.Namespace) -> dict[str, float]:
    """RSS of one worker at 10k/100k/1M keys, measured here on this run's own database and
    namespace; with --memory-script, by scripts/bench_memory instead (it flushes the Redis DB
    given here and uses a fixed PostgreSQL database name, so never run two at once)."""
    script = ROOT / "scripts" / "bench_memory"
    if not (args.memory_script and script.exists()):
        return bench.worker_memory(MEMORY_CHECKPOINTS)
    bench.stop_workers()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        env = {**os.environ, "KEYQ_BENCH_REDIS": args.redis_url, "KEYQ_BENCH_PG": args.pg_admin_url}
        subprocess.run(
            [
                sys.executable,
                str(script),
                "--keys",
                str(max(MEMORY_CHECKPOINTS)),
                "--json",
                str(out),
            ],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        result = json.loads(out.read_text())
    return {k: float(v["rss_mb"]) for k, v in result["checkpoints"].items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    try:
        doc = run(args)
    except ConfigurationError as e:  # a --setting or --plot refused: say why, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    print(report.table(doc))
    print(f"elapsed: {doc['elapsed_s']} s")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
        print(f"results: {args.json_path}")
    return 0 if doc.get("exactly_once_verified") else 1
