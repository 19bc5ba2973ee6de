"""The Grafana dashboard and the alert rules against a real Prometheus (Debian's binary)
scraping real workers under load: every dashboard query and every recording rule returns data,
and every alert expression evaluates (its signal, compared with `bool`, returns data)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from keyq.celery_app import CACHE_SWEEP_TASK, RECONCILE_TASK, default_queue, make_app
from keyq.client import Client
from keyq.errors import HandlerCrashedError
from keyq.settings import Settings
from tests.conftest import ROOT, WorkerFactory, poll
from tests.ops_helpers import free_port
from tests.ownership_helpers import database_url  # noqa: F401  (PostgreSQL only)

DEPLOY = ROOT / "deploy"
SIMPLE_ALERT = re.compile(r"^(?P<signal>.+?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<value>[0-9.e+-]+)\s*$",
                          re.S)


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "keyq.json").read_text())
    return [
        (f"{p['title']} [{t['refId']}]", t["expr"]) for p in dash["panels"] for t in p["targets"]
    ]


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    binary = shutil.which("prometheus")
    assert binary, (
        "prometheus is not installed: Debian's `prometheus` package provides it "
        "(apt-get install -y prometheus; .ci/run installs it when missing)"
    )
    port = free_port()
    config = tmp_path / "prometheus.yml"
    shutil.copy(DEPLOY / "alerts.yml", tmp_path / "alerts.yml")
    write_config(config, [])  # the test adds its workers, then reloads
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}", config
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def write_config(config: Path, targets: list[str]) -> None:
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {"job_name": "keyq-workers", "static_configs": [{"targets": targets}]}
        ],
    }))


def query(base: str, expr: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return dict(json.loads(r.read()))


def test_every_dashboard_query_and_alert_expression_returns_data(
    prometheus: tuple[str, Path],
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    redis_client: redis.Redis,
) -> None:
    base, config = prometheus
    ports = [free_port(), free_port()]
    write_config(config, [f"127.0.0.1:{p}" for p in ports])
    env = {"KEYQ_IDLE_TIMEOUT_S": "1"}  # passivations happen within the test
    poll(lambda: _ready(base), 20.0, what="Prometheus to answer")
    start_worker(env={**env, "KEYQ_METRICS_PORT": str(ports[0])})
    urllib.request.urlopen(urllib.request.Request(f"{base}/-/reload", method="POST"), timeout=10)
    poll(lambda: query(base, "keyq_cluster_exporter")["data"]["result"], 20.0,
         what="a first scrape of the first worker")
    second = start_worker(env={**env, "KEYQ_METRICS_PORT": str(ports[1])})
    poll(lambda: len(query(base, 'keyq_node_info == 1')["data"]["result"]) == 2, 20.0,
         what="a scrape of both workers")
    second.kill()  # kill -9: the first worker takes over, the gap is its restart-ready time
    with pytest.raises(HandlerCrashedError):
        client.call("flaky", "dl", "boom", {"n": 1})  # a dead letter and restarts
    tasks = make_app(settings, name="keyq-test")
    rounds = [0]

    def load() -> None:
        """A little load per poll: sends on 50 keys, reads (cache hits), a cache sweep."""
        for i in range(50):
            client.send("counter", f"k{i}", "add", {"by": 1})
        for i in range(10):
            client.read("counter", f"k{i}")
        tasks.send_task(CACHE_SWEEP_TASK, queue=default_queue(settings))  # what beat does
        rounds[0] += 1

    tasks.send_task(RECONCILE_TASK, queue=default_queue(settings))
    pending = dict(dashboard_queries())
    signals = {}
    for r in rules():
        if "record" in r:
            signals[f"record {r['record']}"] = r["expr"]
        else:
            m = SIMPLE_ALERT.match(r["expr"].strip())
            if m and not r["expr"].lstrip().startswith("absent("):
                signals[f"alert {r['alert']}"] = (
                    f"{m['signal']} {m['op']} bool {m['value']}"
                )
    pending.update(signals)
    results: dict[str, Any] = {}

    def all_have_data() -> bool:
        load()
        for name, expr in list(pending.items()):
            got = query(base, expr)
            assert got["status"] == "success", (name, got)
            finite = [x for x in got["data"]["result"] if not math.isnan(float(x["value"][1]))]
            if finite:  # NaN (a quantile of nothing, 0/0) is no data
                results[name] = finite
                del pending[name]
        return not pending

    try:
        poll(all_have_data, 45.0, interval=1.0, what="every query to return data")
    except AssertionError:
        raise AssertionError(f"queries without data: {sorted(pending)}") from None
    finally:
        tasks.close()
    # the alert expressions that are not `signal OP number` evaluate without error
    for r in rules():
        if "alert" in r:
            got = query(base, r["expr"])
            assert got["status"] == "success", (r["alert"], got)
    # a few figures that must be right, not only present
    p95 = float(results["SLO: dispatch latency p95 [A]"][0]["value"][1])
    assert 0 < p95 < 5
    # after the takeover settles (a loaded machine may still be in it), nothing is unowned
    unowned_expr = dict(dashboard_queries())["Stall: partitions without an owner [A]"]

    def none_unowned() -> bool:
        rows = query(base, unowned_expr)["data"]["result"]
        return bool(rows) and float(rows[0]["value"][1]) == 0

    poll(none_unowned, timeout=30, what="every partition owned again")
    assert {s["metric"]["entity"] for s in results["Applied per second, by entity [A]"]} >= {
        "counter"
    }


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
