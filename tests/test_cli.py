"""The `keyq` command run as a subprocess, the way a user runs it: JSON on stdout, one clear
line on stderr and a named exit code when something is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from keyq.cli import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from keyq.settings import Settings
from tests.conftest import ROOT, TEST_PARTITIONS, WorkerFactory, settings_env

pytestmark = pytest.mark.integration


def keyq(
    settings: Settings, *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    full_env = settings_env(settings)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "keyq", *args],
        env=full_env,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stdout_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == EXIT_OK, (proc.returncode, proc.stderr)
    return json.loads(proc.stdout)


@pytest.fixture
def offline_settings(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> Settings:
    """Settings for commands that must fail before any worker or database is involved."""
    return Settings(
        broker_url=redis_url,
        redis_url=redis_url,
        database_url=f"sqlite:///{tmp_path / 'cli.sqlite3'}",
        namespace=f"t{uuid.uuid4().hex[:8]}",
        partitions=TEST_PARTITIONS,
        entity_modules=("keyq.examples", "tests.entities"),
    )


def test_send_call_and_read(start_worker: WorkerFactory, settings: Settings) -> None:
    start_worker()
    sent = stdout_json(keyq(settings, "send", "counter", "cli-1", "add", '{"by": 2}'))
    assert set(sent) == {"message_id"} and len(sent["message_id"]) == 32
    assert stdout_json(keyq(settings, "call", "counter", "cli-1", "add", '{"by": 3}')) == 5
    assert stdout_json(keyq(settings, "read", "counter", "cli-1")) == {"value": 5}
    assert stdout_json(keyq(settings, "read", "counter", "nobody")) is None
    reply = stdout_json(keyq(settings, "call", "cart", "cli-c", "add", '{"item": "é", "qty": 2}'))
    assert reply == {"é": 2}


def test_rejected_or_crashed_call_exits_1_naming_the_error(
    start_worker: WorkerFactory, settings: Settings
) -> None:
    start_worker()
    stdout_json(keyq(settings, "call", "cart", "cli-b", "add", '{"item": "pear"}'))
    assert stdout_json(keyq(settings, "call", "cart", "cli-b", "checkout"))["count"] == 1
    proc = keyq(settings, "call", "cart", "cli-b", "add", '{"item": "plum"}')
    assert proc.returncode == EXIT_FAILED, proc.stderr
    assert proc.stdout == ""
    assert "Rejected" in proc.stderr and "checked out" in proc.stderr
    assert stdout_json(keyq(settings, "read", "cart", "cli-b"))["items"] == {"pear": 1}
    crashed = keyq(settings, "call", "flaky", "cli-f", "boom", '"now"')
    assert crashed.returncode == EXIT_FAILED, crashed.stderr
    assert "HandlerCrashedError" in crashed.stderr and "ValueError: boom now" in crashed.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("send", "counter", "k" * 257, "add"), "InvalidKeyError: key is 257 characters long"),
        (("send", "counter", "", "add"), "InvalidKeyError: key must not be empty"),
        (("call", "counter", "k", "add", "{by: 2}"), "not JSON"),
        (("send", "counter", "k", "add", "[1, 2"), "not JSON"),
        (("send", "ghost", "k", "add"), "UnknownEntityError: unknown entity 'ghost'"),
        (("send", "counter", "k", "reset"), "UnknownOperationError"),
        (("send", "journal", "k", "append", "NaN"), "InvalidPayloadError"),
        (("read", "counter", "k" * 300), "InvalidKeyError"),
        (("call", "counter", "k", "add", "--timeout", "0"), "call timeout must be a positive"),
    ],
    ids=[
        "long-key",
        "empty-key",
        "bad-json",
        "cut-json",
        "entity",
        "op",
        "nan",
        "read-key",
        "zero-timeout",
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_publishes_nothing(
    offline_settings: Settings, redis_client: redis.Redis, args: tuple[str, ...], words: str
) -> None:
    proc = keyq(offline_settings, *args)
    assert proc.returncode == EXIT_USAGE, (proc.returncode, proc.stdout, proc.stderr)
    assert words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert redis_client.dbsize() == 0


def test_bad_configuration_exits_2_naming_the_variable(offline_settings: Settings) -> None:
    proc = keyq(offline_settings, "send", "counter", "k", "add", env={"KEYQ_PARTITIONS": "many"})
    assert proc.returncode == EXIT_USAGE
    assert "KEYQ_PARTITIONS='many' is not an integer" in proc.stderr


def test_call_without_worker_times_out_with_exit_1(
    offline_settings: Settings, redis_client: redis.Redis
) -> None:
    proc = keyq(offline_settings, "call", "counter", "lonely", "add", "--timeout", "0.5")
    assert proc.returncode == EXIT_FAILED, (proc.returncode, proc.stderr)
    assert "CallTimeoutError: no reply from counter/lonely add within 0.5s" in proc.stderr
    assert proc.stdout == ""
    depths = [redis_client.llen(offline_settings.queue_name(p)) for p in range(TEST_PARTITIONS)]
    assert sum(depths) == 1  # the message stays queued: it may still be applied later


def test_unreachable_broker_exits_3_without_leaking_its_password(
    offline_settings: Settings,
) -> None:
    down = "redis://:hunter2@127.0.0.1:1/0"
    proc = keyq(offline_settings, "send", "counter", "k", "add", env={"KEYQ_BROKER_URL": down})
    assert proc.returncode == EXIT_UNAVAILABLE, (proc.returncode, proc.stderr)
    assert "BrokerUnavailableError" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout


def test_help_lists_the_commands(offline_settings: Settings) -> None:
    proc = keyq(offline_settings, "--help")
    assert proc.returncode == EXIT_OK
    for command in ("worker", "send", "call", "read", "status", "migrate"):
        assert command in proc.stdout


def test_read_falls_back_to_the_repo_when_no_worker_runs(
    start_worker: WorkerFactory, settings: Settings, redis_client: redis.Redis
) -> None:
    worker = start_worker()
    stdout_json(keyq(settings, "call", "journal", "cli-j", "append", '"x"'))
    worker.stop()
    cached = list(redis_client.scan_iter(match=f"{settings.namespace}:c:*"))
    assert cached, "the call left no cache entry to drop"
    redis_client.delete(*cached)  # a cold cache: read must go to the Repo
    assert stdout_json(keyq(settings, "read", "journal", "cli-j")) == {"items": ["x"]}
