"""`scripts/stack`: docker-compose.yml's topology from local binaries, with every health check.

No Docker daemon runs on the machines keyq is built on, so the compose file can be validated
but not run. This module starts the same services as processes on free loopback ports, each
checked the way its container is: Redis with AOF (ping), PostgreSQL (a fresh cluster), the
one-shot migration (exit 0), two workers (`keyq health --node NAME`), beat (`keyq health`, and
it runs), Flower with basic auth (`/healthcheck`), Prometheus with keyq's alert rules (`/-/ready`,
and every worker target up). `--check` starts everything, waits for every check to pass,
prints the results and stops; without it the stack runs until Ctrl-C.

Like the compose file it has no default password: Flower's is generated per run and printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from keyq.chaos.servers import PrivatePostgres, PrivateRedis
from keyq.embedded import free_port
from keyq.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CHECK_TIMEOUT_S = 60.0  # --check: every health check must pass within this
WORKERS = 2
STACK_PARTITIONS = 16


@dataclass
class _Service:
    name: str
    check: Callable[[], bool]
    proc: subprocess.Popen[bytes] | None = None
    endpoint: str = ""
    status: str = "starting"


@dataclass
class LocalStack:
    workdir: Path
    services: list[_Service] = field(default_factory=list)
    flower_auth: str = field(default_factory=lambda: f"ops:{secrets.token_urlsafe(12)}")

    def __post_init__(self) -> None:
        self.redis = PrivateRedis(self.workdir / "redis")
        self.postgres = PrivatePostgres(self.workdir / "postgres")
        self.settings: Settings | None = None

    # --- start -----------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        assert self.settings is not None
        env = dict(os.environ)
        env.update(self.settings.to_env())
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Any:
        log = (self.workdir / f"{name}.log").open("wb")
        return subprocess.Popen(
            args, env=env or self._env(), cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> None:
        self.redis.start()
        self.services.append(_Service("redis", lambda: _redis_ping(self.redis.url),
                                      endpoint=self.redis.url))
        self.postgres.init()
        self.postgres.start()
        self.settings = Settings(
            broker_url=self.redis.url, redis_url=self.redis.url,
            database_url=self.postgres.url, namespace="stack", partitions=STACK_PARTITIONS,
            entity_modules=("keyq.examples",),
        )
        self.services.append(_Service("postgres", self._keyq_health, endpoint=self.postgres.url))
        keyq = [sys.executable, "-m", "keyq"]
        migrate = subprocess.run([*keyq, "migrate"], env=self._env(), cwd=str(ROOT),
                                 capture_output=True, timeout=120)
        self.services.append(_Service("migrate", lambda: migrate.returncode == 0))
        ports = []
        for i in range(1, WORKERS + 1):
            port = free_port()
            ports.append(port)
            node = f"stack-w{i}"
            proc = self._spawn(node, [*keyq, "worker", "--hostname", node, "--metrics-port",
                                      str(port), "--no-migrate"])
            self.services.append(_Service(
                f"worker {node}", partial(self._keyq_health, "--node", node), proc,
                f"http://127.0.0.1:{port}/metrics",
            ))
        beat = self._spawn("beat", [*keyq, "beat", "--schedule",
                                    str(self.workdir / "beat-schedule")])
        self.services.append(_Service("beat", lambda: beat.poll() is None and self._keyq_health(),
                                      beat))
        if _has_flower():
            fport = free_port()
            flower = self._spawn("flower", [
                str(Path(sys.executable).parent / "celery"), "--config", "celeryconfig", "flower",
                f"--port={fport}", "--address=127.0.0.1", f"--basic-auth={self.flower_auth}",
                "--persistent=False",
            ])
            flower_url = f"http://127.0.0.1:{fport}"
            self.services.append(_Service(
                "flower", partial(_http_ok, f"{flower_url}/healthcheck"), flower, flower_url
            ))
        else:
            self.services.append(_Service("flower", lambda: False, status="not installed "
                                          "(pip install '.[ops]')"))
        prometheus = shutil.which("prometheus")
        if prometheus:
            pport = free_port()
            pdir = self.workdir / "prometheus"
            pdir.mkdir()
            shutil.copy(ROOT / "deploy" / "alerts.yml", pdir / "alerts.yml")
            (pdir / "prometheus.yml").write_text(json.dumps({
                "global": {"scrape_interval": "1s", "evaluation_interval": "5s"},
                "rule_files": ["alerts.yml"],
                "scrape_configs": [{
                    "job_name": "keyq-workers",
                    "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}],
                }],
            }))
            proc = self._spawn("prometheus", [
                prometheus, f"--config.file={pdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={pdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{pport}",
            ])
            prometheus_url = f"http://127.0.0.1:{pport}"
            self.services.append(_Service(
                "prometheus", partial(_prometheus_ok, prometheus_url, len(ports)), proc,
                prometheus_url,
            ))
        else:
            self.services.append(_Service("prometheus", lambda: False, status="not installed "
                                          "(apt-get install prometheus)"))

    # --- checks ----------------------------------------------------------------------------

    def _keyq_health(self, *args: str) -> bool:
        done = subprocess.run([sys.executable, "-m", "keyq", "health", *args], env=self._env(),
                              cwd=str(ROOT), capture_output=True, timeout=30)
        return done.returncode == 0

    def check_all(self) -> bool:
        for s in self.services:
            if s.status.startswith("not installed"):
                continue
            if s.proc is not None and s.proc.poll() is not None:
                s.status = f"exited {s.proc.returncode} (see {self.workdir}/*.log)"
                continue
            s.status = "ok" if s.check() else "failing"
        return all(s.status == "ok" for s in self.services)

    def report(self) -> dict[str, Any]:
        return {
            "services": {s.name: {"status": s.status, "endpoint": s.endpoint}
                         for s in self.services},
            "flower_basic_auth": self.flower_auth,
            "logs": str(self.workdir),
        }

    # --- stop ------------------------------------------------------------------------------

    def stop(self) -> None:
        for s in reversed(self.services):
            if s.proc is not None and s.proc.poll() is None:
                os.killpg(s.proc.pid, signal.SIGTERM)
        for s in self.services:
            if s.proc is not None:
                try:
                    s.proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(s.proc.pid, signal.SIGKILL)
                    s.proc.wait(5)
        self.postgres.stop()
        self.redis.kill9()


def _redis_ping(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _http_ok(url: str, auth: str | None = None) -> bool:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=3) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _prometheus_ok(url: str, targets: int) -> bool:
    if not _http_ok(f"{url}/-/ready"):
        return False
    try:
        with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=3) as r:
            active = json.loads(r.read())["data"]["activeTargets"]
    except (OSError, ValueError, KeyError):
        return False
    return len(active) == targets and all(t["health"] == "up" for t in active)


def _has_flower() -> bool:
    return importlib.util.find_spec("flower") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/stack", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="start, wait for every health check, print the results, stop")
    parser.add_argument("--timeout", type=float, default=CHECK_TIMEOUT_S)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="keyq-stack-"))
    stack = LocalStack(workdir)
    healthy = False
    try:
        stack.start()
        deadline = time.monotonic() + args.timeout
        healthy = stack.check_all()
        while not healthy and time.monotonic() < deadline:
            time.sleep(0.5)
            healthy = stack.check_all()
        print(json.dumps(stack.report(), indent=2, sort_keys=True))
        if args.check:
            return 0 if healthy else 1
        print("stack running; Ctrl-C stops it", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
        if args.check and healthy:  # a failed check keeps its logs
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
