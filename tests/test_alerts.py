"""deploy/alerts.yml: valid Prometheus rules (`promtool check rules`) whose unit tests pass
(`promtool test rules deploy/alerts_test.yml`): each SLO alert fires past its threshold and
stays quiet under it, and each stall alert fires on its stall."""

from __future__ import annotations

import shutil
import subprocess

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, (
        "promtool is not installed: it ships with Debian's `prometheus` package "
        "(apt-get install -y prometheus; .ci/run installs it when missing)"
    )
    return path


def test_alert_rules_are_valid() -> None:
    out = subprocess.run(
        [promtool(), "check", "rules", str(DEPLOY / "alerts.yml")],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_alert_rules_unit_tests_pass() -> None:
    out = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"],
        cwd=DEPLOY, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_is_unit_tested_and_has_a_runbook_entry() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    tests = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())
    tested = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(alerts) - tested == set(), "alerts without a test that makes them fire"
    runbook = (ROOT / "docs" / "operations.md").read_text().lower()
    missing = [a for a in alerts if f"### {a.lower()}" not in runbook]
    assert missing == [], "alerts without a runbook section in docs/operations.md"
