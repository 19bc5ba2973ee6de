"""`keyq health [--node NAME]`, the containers' health check, run as Docker runs it: 0 when the
servers answer (and the worker's heartbeat is fresh), 3 when a server is down, 1 when the
worker is not a live member (killed)."""

from __future__ import annotations

import json
import subprocess
import sys

import redis

from keyq.settings import Settings
from tests.conftest import ROOT, WorkerFactory, poll, settings_env
from tests.ops_helpers import free_port
from tests.ownership_helpers import database_url  # noqa: F401  (PostgreSQL only)


def health(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyq", "health", *args],
        env=settings_env(settings), cwd=str(ROOT), capture_output=True, text=True, timeout=30,
    )


def test_health_is_ok_when_the_servers_answer_and_3_when_redis_is_down(
    settings: Settings,
) -> None:
    ok = health(settings)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"broker": "ok", "database": "ok", "redis": "ok"}
    down = f"redis://127.0.0.1:{free_port()}/0"
    bad = health(settings.with_(redis_url=down, broker_url=down))
    assert bad.returncode == 3
    assert "Redis" in bad.stderr and "not answering" in bad.stderr


def test_worker_health_follows_its_heartbeat(
    start_worker: WorkerFactory, settings: Settings, redis_client: redis.Redis
) -> None:
    worker = start_worker()
    node = worker.node_id(redis_client, settings)
    live = health(settings, "--node", node)
    assert live.returncode == 0, live.stderr
    assert json.loads(live.stdout)["live"] is True
    assert health(settings, "--node", "nobody-here").returncode == 1
    worker.kill()
    poll(lambda: health(settings, "--node", node).returncode == 1, 10.0,
         what="the killed worker to be reported unhealthy")
