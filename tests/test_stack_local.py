"""`scripts/stack --check`: docker-compose.yml's topology from local binaries (Redis with AOF,
PostgreSQL, migrate, two workers, beat, Flower, Prometheus with the alert rules) starts, and
every service's health check and every scrape target answers."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import ROOT


def test_the_local_stack_starts_and_every_health_check_passes() -> None:
    out = subprocess.run(
        [str(ROOT / "scripts" / "stack"), "--check", "--timeout", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout)
    statuses = {name: s["status"] for name, s in report["services"].items()}
    assert statuses == {
        name: "ok"
        for name in ("redis", "postgres", "migrate", "worker stack-w1", "worker stack-w2",
                     "beat", "flower", "prometheus")
    }
    assert report["flower_basic_auth"].startswith("ops:") and len(report["flower_basic_auth"]) > 12
