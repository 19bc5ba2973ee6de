"""Every `keyq` command with Redis down, with the database down and with bad input: one line on
stderr that names the problem, the documented exit code (2 bad input, 3 unavailable), never a
traceback. Also: a taken metrics port, and stable node names (`keyq worker --hostname`)."""

from __future__ import annotations

import functools
import itertools
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from keyq.cli import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from keyq.embedded import free_port
from keyq.ownership import MAX_NODE_NAME_LENGTH, new_node_id
from keyq.repo import DeadLetter, Repo
from keyq.settings import Settings
from tests.conftest import ROOT, TEST_PARTITIONS, WorkerFactory, poll, settings_env
from tests.test_cli import keyq

pytestmark = pytest.mark.integration

SECRET = "hunter2"  # the password of every dead server's URL: it must never be printed
FAST = {"KEYQ_STARTUP_WAIT_S": "1", "KEYQ_CALL_TIMEOUT_S": "0.5"}
LONG_RUNNING = {"worker", "beat"}  # Celery may log before keyq gives up; the last line counts


@dataclass(frozen=True)
class World:
    """Settings whose servers are up (Redis DB of the tests, a migrated SQLite file holding one
    dead letter), and URLs of servers that are down."""

    settings: Settings
    dead_letter_id: int
    dead_port: int

    @property
    def redis_down(self) -> dict[str, str]:
        url = f"redis://:{SECRET}@127.0.0.1:{self.dead_port}/0"
        return {**FAST, "KEYQ_REDIS_URL": url, "KEYQ_BROKER_URL": url}

    @property
    def database_down(self) -> dict[str, str]:
        return {
            **FAST,
            "KEYQ_DATABASE_URL": f"postgresql://postgres:{SECRET}@127.0.0.1:{self.dead_port}/x",
        }


@pytest.fixture
def world(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> Iterator[World]:
    database_url = f"sqlite:///{tmp_path / 'faults.sqlite3'}"
    repo = Repo(database_url)
    repo.migrate()
    repo.commit(
        3,
        1,
        [],
        dead_letters=[
            DeadLetter(
                message_id="m-faults",
                entity="counter",
                key="k",
                op="add",
                partition=3,
                envelope={"id": "m-faults", "payload": {"by": 1}},
                reason="crashed",
                error_type="ValueError",
                error_message="boom",
            )
        ],
    )
    (dead,) = repo.dead_letters()
    repo.dispose()
    assert dead.id is not None
    settings = Settings(
        broker_url=redis_url,
        redis_url=redis_url,
        database_url=database_url,
        namespace=f"t{uuid.uuid4().hex[:8]}",
        partitions=TEST_PARTITIONS,
        entity_modules=("keyq.examples", "tests.entities"),
    )
    yield World(settings, dead.id, free_port())


def run(
    world: World, args: tuple[str, ...], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return keyq(
        world.settings,
        *(a.replace("{id}", str(world.dead_letter_id)) for a in args),
        env=env,
        timeout=90,
    )


def assert_one_line(
    proc: subprocess.CompletedProcess[str], code: int, words: tuple[str, ...], command: str
) -> str:
    """The exit code, no traceback, no password, and one `error: ...` line holding words."""
    everything = proc.stdout + proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in everything, proc.stderr[-3000:]
    assert SECRET not in everything
    lines = proc.stderr.splitlines()
    if command in LONG_RUNNING:
        lines = lines[-1:]
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert line.startswith("error: ") and line.strip() != "error:", line
    for word in words:
        assert word in line, (word, line)
    return line


# --- Redis down ---------------------------------------------------------------------------

SERVER_REDIS = ("Redis at redis://:***@127.0.0.1:",)
SERVER_BROKER = ("at redis://:***@127.0.0.1:",)  # "broker at" or "Redis at": both name the URL

REDIS_DOWN: list[tuple[str, tuple[str, ...], int, tuple[str, ...]]] = [
    # (id, arguments, exit code, words of the error line; () for a command that succeeds)
    ("send", ("send", "counter", "k", "add", '{"by": 1}'), EXIT_UNAVAILABLE, SERVER_BROKER),
    ("call", ("call", "counter", "k", "add", '{"by": 1}'), EXIT_UNAVAILABLE, SERVER_BROKER),
    ("read", ("read", "counter", "k"), EXIT_UNAVAILABLE, SERVER_REDIS),
    ("resolve", ("resolve", "counter", "k"), EXIT_UNAVAILABLE, SERVER_REDIS),
    ("status", ("status", "--json"), EXIT_UNAVAILABLE, SERVER_REDIS),
    ("reconcile", ("reconcile", "--once"), EXIT_UNAVAILABLE, SERVER_REDIS),
    ("dl-list", ("dead-letters", "list"), EXIT_OK, ()),  # the database only
    ("dl-show", ("dead-letters", "show", "{id}"), EXIT_OK, ()),
    ("dl-replay", ("dead-letters", "replay", "{id}"), EXIT_UNAVAILABLE, SERVER_BROKER),
    ("dl-purge", ("dead-letters", "purge", "--id", "{id}", "--yes"), EXIT_OK, ()),
    ("migrate", ("migrate",), EXIT_UNAVAILABLE, SERVER_REDIS),  # the migration lock
    ("worker", ("worker",), EXIT_UNAVAILABLE, (*SERVER_REDIS, "KEYQ_STARTUP_WAIT_S")),
    ("beat", ("beat",), EXIT_UNAVAILABLE, (*SERVER_REDIS, "KEYQ_STARTUP_WAIT_S")),
    ("demo", ("demo",), EXIT_UNAVAILABLE, SERVER_REDIS),
]


@pytest.mark.parametrize(
    ("args", "code", "words"), [c[1:] for c in REDIS_DOWN], ids=[c[0] for c in REDIS_DOWN]
)
def test_with_redis_down_every_command_fails_in_one_line_naming_redis(
    world: World, args: tuple[str, ...], code: int, words: tuple[str, ...]
) -> None:
    started = time.monotonic()
    proc = run(world, args, world.redis_down)
    assert time.monotonic() - started < 30, "the command waited far past KEYQ_STARTUP_WAIT_S"
    if code == EXIT_OK:
        assert proc.returncode == EXIT_OK, proc.stderr
        assert "Traceback" not in proc.stderr and SECRET not in proc.stdout + proc.stderr
        assert [json.loads(line) for line in proc.stdout.splitlines()], "no output"
        return
    assert_one_line(proc, code, words, args[0])
    assert proc.stdout == "" or args[0] == "demo", proc.stdout


def test_replay_with_the_broker_down_keeps_the_dead_letter(world: World) -> None:
    assert run(world, ("dead-letters", "replay", "{id}"), world.redis_down).returncode == 3
    listed = run(world, ("dead-letters", "list"), {})
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [world.dead_letter_id]


# --- database down -----------------------------------------------------------------------

SERVER_DATABASE = ("database", "postgresql://postgres:***@127.0.0.1:")

DATABASE_DOWN: list[tuple[str, tuple[str, ...], int, tuple[str, ...]]] = [
    ("send", ("send", "counter", "k", "add", '{"by": 1}'), EXIT_OK, ()),  # Redis only
    # no worker can run with the database down: the caller sees its timeout
    ("call", ("call", "counter", "k", "add", '{"by": 1}'), EXIT_FAILED, ("CallTimeoutError",)),
    ("read", ("read", "counter", "k"), EXIT_UNAVAILABLE, SERVER_DATABASE),  # a cache miss
    ("resolve", ("resolve", "counter", "k"), EXIT_OK, ()),
    ("status", ("status", "--json"), EXIT_OK, ()),
    ("reconcile", ("reconcile", "--once"), EXIT_UNAVAILABLE, SERVER_DATABASE),
    ("dl-list", ("dead-letters", "list"), EXIT_UNAVAILABLE, SERVER_DATABASE),
    ("dl-show", ("dead-letters", "show", "1"), EXIT_UNAVAILABLE, SERVER_DATABASE),
    ("dl-replay", ("dead-letters", "replay", "1"), EXIT_UNAVAILABLE, SERVER_DATABASE),
    ("dl-purge", ("dead-letters", "purge", "--all", "--yes"), EXIT_UNAVAILABLE, SERVER_DATABASE),
    ("migrate", ("migrate",), EXIT_UNAVAILABLE, SERVER_DATABASE),
    ("worker", ("worker",), EXIT_UNAVAILABLE, SERVER_DATABASE),
    ("demo", ("demo",), EXIT_UNAVAILABLE, SERVER_DATABASE),
]


@pytest.mark.parametrize(
    ("args", "code", "words"), [c[1:] for c in DATABASE_DOWN], ids=[c[0] for c in DATABASE_DOWN]
)
def test_with_the_database_down_every_command_fails_in_one_line_or_works(
    world: World, args: tuple[str, ...], code: int, words: tuple[str, ...]
) -> None:
    proc = run(world, args, world.database_down)
    if code == EXIT_OK:
        assert proc.returncode == EXIT_OK, proc.stderr
        assert proc.stderr == "", proc.stderr
        json.loads(proc.stdout)
        return
    assert_one_line(proc, code, words, args[0])


def test_beat_needs_no_database_and_keeps_running_without_one(world: World, tmp_path: Path) -> None:
    env = settings_env(world.settings)
    env.update(world.database_down)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keyq",
            "beat",
            "--schedule",
            str(tmp_path / "beat-schedule"),
        ],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(4)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "Traceback" not in stderr, stderr[-3000:]


# --- bad input -----------------------------------------------------------------------------

BAD_INPUT: list[tuple[str, tuple[str, ...], dict[str, str], tuple[str, ...]]] = [
    ("worker", ("worker", "--partitions", "5-99"), {}, ("--partitions",)),
    ("worker-name-bar", ("worker", "--hostname", "a|b"), {}, ("'a|b'", "'|'")),
    ("worker-name-empty", ("worker", "-n", ""), {}, ("must not be empty",)),
    ("worker-name-space", ("worker", "-n", "a b"), {}, ("whitespace",)),
    ("worker-name-long", ("worker", "-n", "x" * 65), {}, (f"at most {MAX_NODE_NAME_LENGTH}",)),
    ("worker-port", ("worker", "--metrics-port", "70000"), {}, ("--metrics-port",)),
    ("beat", ("beat", "--bogus"), {}, ("No such option '--bogus'", "beat --help")),
    ("send", ("send", "counter", "k", "add", "{by: 2}"), {}, ("not JSON",)),
    ("send-missing", ("send", "counter", "k"), {}, ("Missing argument 'OP'", "send --help")),
    ("call", ("call", "ghost", "k", "add"), {}, ("UnknownEntityError",)),
    ("read", ("read", "counter", ""), {}, ("InvalidKeyError",)),
    ("resolve", ("resolve", "ghost", "k"), {}, ("UnknownEntityError",)),
    ("status", ("status", "--bogus"), {}, ("No such option '--bogus'",)),
    ("reconcile", ("reconcile",), {}, ("Missing option '--once'",)),
    ("dl-list", ("dead-letters", "list", "--reason", "bogus"), {}, ("'bogus' is not one of",)),
    ("dl-show", ("dead-letters", "show", "abc"), {}, ("'abc' is not a valid integer",)),
    ("dl-replay", ("dead-letters", "replay"), {}, ("Missing argument 'IDS...'",)),
    ("dl-purge", ("dead-letters", "purge"), {}, ("needs a filter",)),
    ("migrate", ("migrate",), {"KEYQ_DATABASE_URL": "mysql://db/x"}, ("KEYQ_DATABASE_URL",)),
    ("demo", ("demo", "--workers", "many"), {}, ("'many' is not a valid integer",)),
    ("config", ("status",), {"KEYQ_PARTITIONS": "many"}, ("KEYQ_PARTITIONS='many'",)),
    ("command", ("bogus",), {}, ("No such command 'bogus'",)),
]


@pytest.mark.parametrize(
    ("args", "env", "words"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_to_any_command_exits_2_in_one_line(
    world: World,
    redis_client: redis.Redis,
    args: tuple[str, ...],
    env: dict[str, str],
    words: tuple[str, ...],
) -> None:
    proc = run(world, args, {**FAST, **env})
    assert_one_line(proc, EXIT_USAGE, words, "")  # also worker: it must refuse before Celery
    assert proc.stdout == ""
    assert redis_client.dbsize() == 0  # nothing was published, registered or locked


def test_an_unexpected_error_is_one_line_with_a_hint_and_its_traceback_on_request(
    world: World, tmp_path: Path
) -> None:
    (tmp_path / "exploding_entities.py").write_text("raise RuntimeError('kaboom at import')\n")
    env = {
        "KEYQ_ENTITY_MODULES": "exploding_entities",
        "PYTHONPATH": f"{tmp_path}:{ROOT}",
    }
    proc = run(world, ("send", "counter", "k", "add"), env)
    line = assert_one_line(proc, EXIT_FAILED, ("internal: RuntimeError: kaboom at import",), "")
    assert line.endswith("(set KEYQ_DEBUG=1 for the traceback)")
    debug = run(world, ("send", "counter", "k", "add"), {**env, "KEYQ_DEBUG": "1"})
    assert debug.returncode == EXIT_FAILED
    assert "Traceback" in debug.stderr and debug.stderr.splitlines()[-1] == line


# --- metrics: one port per worker process -------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_second_worker_on_a_taken_metrics_port_exits_2_naming_the_port(
    start_worker: WorkerFactory, settings: Settings
) -> None:
    port = free_port()
    start_worker(env={"KEYQ_METRICS_PORT": str(port)})
    assert "keyq_partitions_owned" in scrape(port)  # the first worker serves the port

    second = keyq(settings, "worker", env={**FAST, "KEYQ_METRICS_PORT": str(port)}, timeout=60)
    line = assert_one_line(second, EXIT_USAGE, (f"metrics port {port}", "KEYQ_METRICS_PORT"), "")
    assert "already in use" in line and "--metrics-port" in line
    assert second.stdout == ""  # refused before Celery printed its banner

    # --metrics-port overrides the environment: here it points the worker at the taken port
    other = free_port()
    flag = keyq(
        settings,
        "worker",
        "--metrics-port",
        str(port),
        env={**FAST, "KEYQ_METRICS_PORT": str(other)},
        timeout=60,
    )
    assert_one_line(flag, EXIT_USAGE, (f"metrics port {port}",), "")


# --- stable node names --------------------------------------------------------------------


def test_node_names_are_unique_by_default_and_checked_when_given() -> None:
    assert new_node_id() != new_node_id()
    host = socket.gethostname()
    assert new_node_id("w1@%h") == f"w1@{host}"
    assert new_node_id("%n-a%%") == f"{host.split('.')[0]}-a%"


def status_json(settings: Settings) -> dict[str, Any]:
    proc = keyq(settings, "status", "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    return dict(json.loads(proc.stdout))


def log_holds(log: Path, text: str) -> bool:
    return text in log.read_text()


def start_named_worker(settings: Settings, name: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "keyq", "worker", "--loglevel", "info", "-n", name],
            env=settings_env(settings),
            cwd=str(ROOT),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def tokens_of(
    settings: Settings, name: str, proc: subprocess.Popen[bytes], log: Path
) -> dict[int, int]:
    """Wait until this process is the named member and owns every partition; its tokens."""

    def owns_all() -> dict[int, int] | None:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early:\n{log.read_text()[-3000:]}")
        snap = status_json(settings)
        if not any(m["node"] == name and m.get("pid") == proc.pid for m in snap["members"]):
            return None  # not yet this process (a crashed run stays a member for one TTL)
        owned = {p["partition"]: p["token"] for p in snap["partitions"] if p["owner"] == name}
        return owned if len(owned) == TEST_PARTITIONS else None

    found = poll(owns_all, 40.0, interval=0.3, what=f"node {name} to own every partition")
    assert isinstance(found, dict)
    return found


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_named_worker_shows_its_name_and_can_restart_under_it(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    name = f"node-{uuid.uuid4().hex[:6]}"
    runs: list[dict[int, int]] = []
    for i, stop in enumerate((signal.SIGTERM, signal.SIGKILL, signal.SIGTERM)):
        log = tmp_path / f"worker-{i}.log"
        proc = start_named_worker(settings, name, log)
        try:
            runs.append(tokens_of(settings, name, proc, log))
            # keyq's log lines and Celery's (so Flower's) node name
            poll(functools.partial(log_holds, log, f"{name}@keyq ready"), 20.0, what="Celery")
            assert f"keyq worker starting node={name} " in log.read_text()
        finally:
            proc.send_signal(stop)  # graceful, then a crash: the next start reuses the name
            proc.wait(30)
        assert "Traceback" not in log.read_text()
    for before, after in itertools.pairwise(runs):
        # a restarted node never adopts its previous run's lease: every token is new
        assert all(after[p] > before[p] for p in before), (before, after)


def test_a_sentinel_error_is_one_readable_line_without_the_client_object() -> None:
    """redis-py's MasterNotFoundError prints the whole client (pool, connection, every
    option); the CLI line keeps what went wrong."""
    from keyq.cli_errors import one_line

    text = (
        "Redis at sentinel://127.0.0.1:26399 is not answering: No master found for 'm' : "
        "<redis.client.Redis(<redis.connection.ConnectionPool(<redis.connection.Connection("
        "db=0,password=<REDACTED>,host=127.0.0.1,port=26399,opts=<object object at 0x7f>)>)>)>"
        " - network:ConnectionError"
    )
    assert one_line(text) == (
        "Redis at sentinel://127.0.0.1:26399 is not answering: No master found for 'm'"
        " - network:ConnectionError"
    )
