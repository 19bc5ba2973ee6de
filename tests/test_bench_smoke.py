"""scripts/bench runs end to end on real servers and reports every figure it promises.

The smoke mode is tiny (seconds); no figure is asserted, only that the run completes, that
every add it sent was applied exactly once, that the JSON carries every key with a real number
where the smoke run measures it (issue 14's producer, call, dispatch-sweep and worker-CPU
figures among them, and issue 12's throughput with Flower's task events off and on) and that
the run leaves neither its PostgreSQL database nor its Redis keys behind.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from keyq.repo import normalize_url
from tests.conftest import PG_ADMIN_URL, ROOT

pytestmark = pytest.mark.integration

REQUIRED_KEYS = (
    "keyq_msgs_per_s",
    "celery_msgs_per_s",
    "ratio",
    "send_many_msgs_per_s",
    "send_many_ratio",
    "dispatch_p50_ms",
    "dispatch_p95_ms",
    "dispatch_p99_ms",
    "call_p95_ms",
    "celery_call_p95_ms",
    "cache_hit_ratio",
    "takeover_ms",
    "rss_mb_10k",
    "rss_mb_100k",
    "rss_mb_1m",
    "versions",
    "machine",
    # issue 14
    "send_produce_ratio",
    "send_msgs_per_s_one_thread",
    "apply_async_msgs_per_s_one_thread",
    "send_many_msgs_per_s_one_thread",
    "send_cpu_us",
    "apply_async_cpu_us",
    "send_many_cpu_us",
    "call_p50_ms",
    "call_p99_ms",
    "celery_call_p50_ms",
    "celery_call_p99_ms",
    "call_ratio_p95",
    "dispatch_sweep",
    "worker_us_per_msg",
    # issue 12: the task events' throughput cost
    "events_cost",
    # issue 11 item 6: takeover idle and under load; issue 13 item 4: plain-Celery publishes
    "takeover_idle_ms",
    "takeover_load_ms",
    "takeover_idle",
    "takeover_load",
    "plain_celery_dispatch",
)
VERSION_KEYS = (
    "python",
    "celery",
    "kombu",
    "redis_py",
    "sqlalchemy",
    "redis_server",
    "postgres_server",
)
MEASURED_IN_SMOKE = (
    "keyq_msgs_per_s",
    "celery_msgs_per_s",
    "ratio",
    "send_many_msgs_per_s",
    "dispatch_p95_ms",
    "call_p95_ms",
    "celery_call_p95_ms",
    "cache_hit_ratio",
    "takeover_ms",
    "send_produce_ratio",
    "send_msgs_per_s_one_thread",
    "apply_async_msgs_per_s_one_thread",
    "send_many_msgs_per_s_one_thread",
    "send_cpu_us",
    "apply_async_cpu_us",
    "send_many_cpu_us",
    "call_p50_ms",
    "call_p99_ms",
    "celery_call_p50_ms",
    "celery_call_p99_ms",
    "call_ratio_p95",
    "takeover_idle_ms",
    "takeover_load_ms",
)
SWEEP_POINT_FIGURES = ("asked", "achieved", "p50", "p95")  # each dispatch_sweep point's numbers
# send drains with Flower's task events off, on (default rate) and on for every message
EVENTS_COST_FIGURES = (
    "off_msgs_per_s",
    "on_msgs_per_s",
    "ratio",
    "all_msgs_per_s",
    "all_ratio",
    "on_rate_setting",
)
# send to applied on idle workers, keyq's Client.send against plain Celery's send_task
PLAIN_CELERY_FIGURES = ("client_p50_ms", "client_p95_ms", "celery_p50_ms", "celery_p95_ms")


def measured(value: object) -> bool:
    """A real number: not missing, not a bool, not NaN or infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_bench_smoke_run_reports_every_figure_and_cleans_up(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench"),
            "--smoke",
            "--json",
            str(out),
            "--plot",
            str(png),
            "--redis-url",
            redis_url,
            "--pg-admin-url",
            PG_ADMIN_URL,
        ],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    missing = [k for k in REQUIRED_KEYS if k not in doc]
    assert not missing, f"keys missing from the JSON: {missing}"
    assert all(doc["versions"].get(k) for k in VERSION_KEYS), doc["versions"]
    assert doc["machine"]["cores"] and doc["machine"]["cpu_model"]
    unmeasured = [k for k in MEASURED_IN_SMOKE if not measured(doc[k])]
    assert not unmeasured, f"figures the smoke run should have measured: {unmeasured}"
    sweep = doc["dispatch_sweep"]
    assert sweep, "the dispatch sweep measured no rate"
    for point in sweep:
        assert all(measured(point.get(k)) for k in SWEEP_POINT_FIGURES), point
        assert isinstance(point.get("flagged"), bool), point
    assert {1000.0, 2000.0} <= {p["asked"] for p in sweep}
    assert measured(doc["worker_us_per_msg"].get("keyq")), doc["worker_us_per_msg"]
    assert measured(doc["worker_us_per_msg"].get("celery")), doc["worker_us_per_msg"]
    events = doc["events_cost"]
    assert all(measured(events.get(k)) and events[k] > 0 for k in EVENTS_COST_FIGURES), events
    assert events["ratio"] == pytest.approx(events["on_msgs_per_s"] / events["off_msgs_per_s"])
    assert "task events off" in proc.stdout
    assert doc["rss_mb_1m"] is None  # only the full run measures memory
    assert doc["exactly_once_verified"] is True
    assert doc["takeover"]["all_applied"] is True
    for name in ("takeover_idle", "takeover_load"):
        assert doc[name]["all_applied"] is True, doc[name]
        assert doc[f"{name}_ms"] > 0 and doc[name]["victim_partitions"] > 0, doc[name]
    assert doc["takeover_idle"]["load_rate_achieved"] == 0
    assert measured(doc["takeover_load"]["load_rate_achieved"])
    assert doc["takeover_load"]["load_rate_achieved"] > 0
    plain = doc["plain_celery_dispatch"]
    assert all(measured(plain.get(k)) and plain[k] > 0 for k in PLAIN_CELERY_FIGURES), plain
    assert "plain Celery send_task" in proc.stdout
    assert png.stat().st_size > 1000
    assert "plain Celery no-op tasks" in proc.stdout

    leftover = list(redis_client.scan_iter(match=f"*{doc['namespace']}*"))
    assert leftover == []
    engine = sa.create_engine(normalize_url(PG_ADMIN_URL))
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                {"name": doc["database"]},
            ).first()
    finally:
        engine.dispose()
    assert exists is None
