"""docker-compose.yml and the Dockerfile, validated without a Docker daemon (none runs here):
`docker-compose config` accepts the file; every service has a health check, every long-running
one a restart policy; keyq services build the image (no `pip install` at start); published ports
listen on 127.0.0.1; no password has a default."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import yaml

from tests.conftest import ROOT

SECRETS = {
    "REDIS_PASSWORD": "redis-secret",
    "POSTGRES_PASSWORD": "pg-secret",
    "FLOWER_USER": "ops",
    "FLOWER_PASSWORD": "flower-secret",
    "GRAFANA_ADMIN_PASSWORD": "grafana-secret",
}


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary, (
        "docker-compose is not installed: Debian's `docker-compose` package provides it "
        "(apt-get install -y docker-compose; .ci/run installs it when missing)"
    )
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("KEYQ")}
    return subprocess.run(
        [binary, "config"], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
        timeout=60,
    )


def services() -> dict[str, Any]:
    out = compose_config(SECRETS)
    assert out.returncode == 0, out.stderr
    return dict(yaml.safe_load(out.stdout)["services"])


def test_compose_file_is_valid_and_every_service_is_checked_and_restarted() -> None:
    svc = services()
    assert set(svc) >= {
        "redis", "postgres", "migrate", "worker", "beat", "flower", "prometheus", "grafana"
    }
    for name, s in svc.items():
        assert s.get("healthcheck", {}).get("test"), f"{name} has no health check"
        if name != "migrate":
            assert s.get("restart") == "unless-stopped", f"{name} has no restart policy"
    assert svc["migrate"]["restart"] == "no"
    for name in ("migrate", "worker", "beat", "flower"):
        assert svc[name]["build"]["context"] == str(ROOT), name
        command = " ".join(svc[name].get("command") or []) + " ".join(
            svc[name].get("entrypoint") or []
        )
        assert "pip install" not in command, name
    assert svc["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert svc["worker"]["healthcheck"]["test"] == ["CMD", "keyq", "health", "--node", "%h"]
    assert "--appendonly" in " ".join(svc["redis"]["command"])
    prometheus_mounts = " ".join(map(str, svc["prometheus"]["volumes"]))
    assert "deploy/alerts.yml:/etc/prometheus/alerts.yml" in prometheus_mounts
    grafana_mounts = " ".join(map(str, svc["grafana"]["volumes"]))
    assert "deploy/grafana/provisioning" in grafana_mounts
    assert "deploy/grafana/dashboards" in grafana_mounts


def test_published_ports_listen_on_localhost_only() -> None:
    published = [(name, p) for name, s in services().items() for p in s.get("ports", [])]
    assert {name for name, _ in published} == {"flower", "prometheus", "grafana"}
    for name, p in published:  # docker-compose 1.29 prints "IP:HOST:CONTAINER/tcp"
        host_ip = p.get("host_ip") if isinstance(p, dict) else str(p).split(":")[0]
        assert host_ip == "127.0.0.1", (name, p)


def test_no_password_has_a_default() -> None:
    for missing in SECRETS:
        env = {k: v for k, v in SECRETS.items() if k != missing}
        out = compose_config(env)
        assert out.returncode != 0, f"the stack starts without {missing}"
        assert missing in out.stderr
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in SECRETS.values():
        assert secret not in text


def test_dockerfile_is_multi_stage_wheel_install_non_root_with_health_check() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2
    assert "pip wheel" in text and "--no-index --find-links=/wheels" in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert 'HEALTHCHECK' in text and '"keyq", "health"' in text
