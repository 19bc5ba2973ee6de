"""Worker subprocesses of a benchmark: `keyq worker` nodes and plain Celery no-op workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from keyq.bench.latency_hook import BENCH_LATENCY_KEY, HOOK_MODULE
from keyq.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 15.0


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """Poll until predicate() is truthy; raise TimeoutError naming what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


def latency_key(settings: Settings) -> str:
    return settings.redis_key("bench", "latency")


def keyq_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that gives a worker subprocess exactly these settings."""
    env = dict(os.environ)
    env.update(settings.to_env())
    env[BENCH_LATENCY_KEY] = latency_key(settings)
    # the latency hook is injected into the workers as one more module to import
    env["KEYQ_ENTITY_MODULES"] = ",".join((*settings.entity_modules, HOOK_MODULE))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


@dataclass
class Proc:
    """One worker subprocess and its log file."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    kind: str
    partitions: str | None = None
    node_id: str | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = STOP_TIMEOUT_S) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()


def stop_all(procs: list[Proc]) -> None:
    """Graceful stop of many workers at once (their handoff waits run in parallel)."""
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait_stopped()
    for p in procs:
        p.log_path.unlink(missing_ok=True)


def _spawn(args: list[str], env: dict[str, str], kind: str, partitions: str | None) -> Proc:
    fd, name = tempfile.mkstemp(prefix=f"keyq-bench-{kind}-", suffix=".log")
    with os.fdopen(fd, "wb") as log_file:
        proc = subprocess.Popen(
            args, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(ROOT)
        )
    return Proc(proc, Path(name), kind, partitions)


def start_keyq_worker(
    settings: Settings,
    partitions: str | None = None,
    loglevel: str = "warning",
    extra_env: dict[str, str] | None = None,
) -> Proc:
    args = [sys.executable, "-m", "keyq", "worker", "--loglevel", loglevel, "--no-migrate"]
    if partitions:
        args += ["--partitions", partitions]
    return _spawn(args, keyq_env(settings, extra_env), "keyq", partitions)


def start_celery_worker(
    broker_url: str, backend_url: str, queue: str, loglevel: str = "warning"
) -> Proc:
    args = [
        sys.executable,
        "-m",
        "keyq.bench.celery_noop",
        broker_url,
        backend_url,
        queue,
        loglevel,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return _spawn(args, env, "celery", None)


def static_slices(partitions: int, workers: int) -> list[str]:
    """Contiguous partition ranges, one per worker: '0-31', '32-63'."""
    out = []
    for i in range(workers):
        lo = partitions * i // workers
        hi = partitions * (i + 1) // workers - 1
        out.append(f"{lo}-{hi}")
    return out


def node_of_pid(client: redis.Redis, settings: Settings, pid: int) -> str | None:
    """The node id a worker process registered under (member info carries its pid)."""
    for raw in client.zrange(settings.redis_key("members"), 0, -1):
        node = raw.decode() if isinstance(raw, bytes) else str(raw)
        info = client.get(settings.redis_key("member", node))
        if info and json.loads(info).get("pid") == pid:
            return node
    return None
