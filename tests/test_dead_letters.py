"""`keyq dead-letters list|show|replay|purge`, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from keyq.client import Client
from keyq.errors import HandlerCrashedError
from keyq.repo import Repo
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import ROOT, WorkerFactory, poll, settings_env

pytestmark = pytest.mark.integration




def keyq(s: Settings, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyq", "dead-letters", *args],
        env=settings_env(s),
        cwd=str(ROOT),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_list_show_and_replay_a_crashed_message_after_the_fix(
    start_worker: WorkerFactory, sup_settings: Settings, sup_client: Client, repo: Repo
) -> None:
    start_worker(settings_override=sup_settings)
    # given a message that crashed past its restarts
    with pytest.raises(HandlerCrashedError):
        sup_client.call("guarded", "g1", "charge", {"amount": 7})

    listed = keyq(sup_settings, "list", "--entity", "guarded")
    assert listed.returncode == 0, listed.stderr
    [row] = lines(listed.stdout)
    assert row["key"] == "g1" and row["op"] == "charge" and row["reason"] == "crashed"
    assert row["error_type"] == "RuntimeError" and row["attempts"] == 2

    shown = keyq(sup_settings, "show", str(row["id"]))
    assert shown.returncode == 0, shown.stderr
    [full] = lines(shown.stdout)
    assert "charging is not enabled" in full["traceback"]
    assert full["envelope"]["payload"] == {"amount": 7}
    assert full["envelope"]["partition"] == partition_for("g1", sup_settings.partitions)

    # when the cause is fixed and the dead letter replayed, the original message is applied
    sup_client.call("guarded", "g1", "enable")
    replayed = keyq(sup_settings, "replay", str(row["id"]))
    assert replayed.returncode == 0, replayed.stderr
    [result] = lines(replayed.stdout)
    assert result["dead_letter"] == row["id"] and result["replayed_as"]
    poll(
        lambda: (sup_client.read("guarded", "g1") or {}).get("charges") == [{"amount": 7}],
        what="the replayed charge",
    )
    assert repo.dead_letters(entity="guarded") == []  # replay removed the row
    assert keyq(sup_settings, "show", "999999").returncode == 1


def test_purge_refuses_without_a_filter_and_deletes_only_matches(
    start_worker: WorkerFactory, sup_settings: Settings, sup_client: Client, repo: Repo
) -> None:
    start_worker(settings_override=sup_settings)
    for key in ("p1", "p2"):
        with pytest.raises(HandlerCrashedError):
            sup_client.call("flaky", key, "boom", key)
    with pytest.raises(HandlerCrashedError):
        sup_client.call("guarded", "p3", "charge", 1)

    refused = keyq(sup_settings, "purge")
    assert refused.returncode == 2 and "needs a filter" in refused.stderr
    assert len(repo.dead_letters()) == 3

    unconfirmed = keyq(sup_settings, "purge", "--entity", "flaky", stdin="n\n")
    assert unconfirmed.returncode == 1 and len(repo.dead_letters()) == 3

    purged = keyq(sup_settings, "purge", "--entity", "flaky", "--key", "p1", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert lines(purged.stdout) == [{"purged": 1}]
    assert sorted(d.key for d in repo.dead_letters()) == ["p2", "p3"]
    assert lines(keyq(sup_settings, "purge", "--all", "--yes").stdout) == [{"purged": 2}]
    assert repo.dead_letters() == []


def test_dead_letters_survive_a_worker_crash_and_the_key_goes_on(
    start_worker: WorkerFactory, sup_settings: Settings, sup_client: Client
) -> None:
    worker = start_worker(settings_override=sup_settings)
    with pytest.raises(HandlerCrashedError):
        sup_client.call("flaky", "s1", "boom", "before the crash")
    worker.kill()  # kill -9
    start_worker(settings_override=sup_settings)
    [row] = lines(keyq(sup_settings, "list", "--key", "s1").stdout)
    assert row["error_message"] == "boom before the crash"
    assert sup_client.call("flaky", "s1", "inc") == 1
