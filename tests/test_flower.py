"""Flower (the `ops` extra) against real workers: a crashed keyq message is a FAILURE task named
for its entity and operation, with its key, and so is a message the apply step refused (unknown
operation; a malformed one without an id as `keyq.refused`); the Broker API reports every
partition queue's length (keyq's transport under Flower's `redis` scheme, see
celeryconfig.py)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from keyq.celery_app import DISPATCH_TASK
from keyq.client import Client
from keyq.errors import HandlerCrashedError
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import ROOT, WorkerFactory, poll, settings_env
from tests.ops_helpers import free_port
from tests.ownership_helpers import database_url  # noqa: F401  (PostgreSQL only)

AUTH = "ops:flower-test"


@pytest.fixture
def flower(settings: Settings, tmp_path: Path) -> Iterator[str]:
    celery = Path(sys.executable).parent / "celery"
    assert (celery.exists() and shutil.which("flower")) or _has_flower(), (
        "Flower is not installed: pip install '.[ops]'"
    )
    port = free_port()
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(celery), "--config", "celeryconfig", "flower", f"--port={port}",
             "--address=127.0.0.1", f"--basic-auth={AUTH}", "--persistent=False"],
            env=settings_env(settings), cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        poll(lambda: _answers(base) or proc.poll() is not None, 30.0, what="Flower to answer")
        assert proc.poll() is None, log.read_text()
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _has_flower() -> bool:
    try:
        import flower  # noqa: F401
    except ImportError:
        return False
    return True


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/healthcheck", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def api(base: str, path: str) -> Any:
    request = urllib.request.Request(f"{base}{path}")
    request.add_header("Authorization", "Basic " + base64.b64encode(AUTH.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def test_flower_shows_crashed_and_refused_messages_as_failures_and_every_queue_length(
    flower: str,
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    redis_client: redis.Redis,
) -> None:
    start_worker()
    assert client.call("counter", "fine", "add", {"by": 1}) == 1
    crashed = client.send("flaky", "poison-key", "boom", {"n": 1})
    with pytest.raises(HandlerCrashedError):
        client.call("flaky", "poison-key-2", "boom", {"n": 2})

    def failed_task() -> dict[str, Any] | None:
        tasks = api(flower, "/api/tasks?limit=1000")
        task = tasks.get(crashed)
        return task if task and task.get("state") == "FAILURE" else None

    task = poll(failed_task, 20.0, what="Flower to show the crashed message as FAILURE")
    assert isinstance(task, dict)
    assert task["name"] == "flaky.boom"
    assert "poison-key" in str(task["args"])
    assert "boom" in str(task.get("exception"))

    # refused by the apply step, never seen by a handler: an unknown operation, and a malformed
    # message without an id, published around the Client's validation as a foreign producer could
    wire = client.envelope("counter", "refused-key", "add", {"by": 1}).to_wire()
    unknown_id = "unknown-op-1"
    queue = settings.queue_name(partition_for("refused-key", settings.partitions))
    client.app.send_task(
        DISPATCH_TASK, args=[[{**wire, "id": unknown_id, "op": "no_such_op"}]], queue=queue
    )
    client.app.send_task(DISPATCH_TASK, args=[[{"bad": 1}]], queue=queue)

    def refused_tasks() -> tuple[dict[str, Any], dict[str, Any]] | None:
        tasks = api(flower, "/api/tasks?limit=1000")
        unknown = tasks.get(unknown_id)
        malformed = [t for t in tasks.values() if t.get("name") == "keyq.refused"]
        if unknown and unknown.get("state") == "FAILURE" and malformed:
            return unknown, malformed[0]
        return None

    refused = poll(refused_tasks, 20.0, what="Flower to show the refused messages as FAILURE")
    assert isinstance(refused, tuple)
    unknown, malformed = refused
    assert unknown["name"] == "counter.no_such_op"
    assert "refused-key" in str(unknown["args"])
    assert "no operation 'no_such_op'" in str(unknown.get("exception")), unknown
    assert malformed["state"] == "FAILURE"
    assert "lacks field(s)" in str(malformed.get("exception")), malformed

    last: list[Any] = []

    def lengths() -> dict[str, int] | None:
        api(flower, "/api/workers?refresh=1")  # what the Workers page's refresh does
        got = api(flower, "/api/queues/length")
        last[:] = [got]
        found = {q["name"]: q["messages"] for q in got.get("active_queues", [])}
        wanted = {settings.queue_name(p) for p in range(settings.partitions)}
        return found if wanted <= set(found) else None

    try:
        found = poll(lengths, 20.0, what="Flower to report every partition queue's length")
    except AssertionError as e:
        raise AssertionError(f"{e}; Flower answered {last}") from None
    assert isinstance(found, dict)
    assert all(isinstance(n, int) and n >= 0 for n in found.values())


def test_events_are_sampled_above_the_configured_rate_and_failures_never() -> None:
    from keyq.errors import ConfigurationError
    from keyq.flower_events import Sampler, rate_from_env

    s = Sampler(rate=100.0)
    kept_slow = sum(s.keep(now=i * 0.02) for i in range(50))  # 50 per s over 1 s: all kept
    assert kept_slow == 50 and s.every == 1
    s = Sampler(rate=100.0)
    kept = sum(s.keep(now=i * 0.001) for i in range(3000))  # 1,000 per s over 3 s
    assert s.every == 10
    # the first 10 whole, then 1 in 10 (the burst's rate as seen so far): about 100 per s
    assert 290 <= kept <= 330
    s = Sampler(rate=100.0)
    burst = sum(s.keep(now=i * 0.00005) for i in range(10_000))  # 10,000 in half a second
    assert 10 <= burst <= 100 and s.every >= 100  # not all 10,000 (was: a window passed whole)
    assert rate_from_env({}) == 200.0 and rate_from_env({"KEYQ_FLOWER_EVENT_RATE": "0"}) == 0
    with pytest.raises(ConfigurationError, match="KEYQ_FLOWER_EVENT_RATE"):
        rate_from_env({"KEYQ_FLOWER_EVENT_RATE": "lots"})


def test_events_of_asks_the_sampler_for_successes_only() -> None:
    from types import SimpleNamespace

    from keyq.flower_events import events_of

    def env(i: int) -> SimpleNamespace:
        return SimpleNamespace(id=f"m{i}", entity="counter", key=f"k{i}", op="add")

    rows = [(env(i), "applied", "") for i in range(10)] + [(env(10), "crashed", "boom")]
    outcome = SimpleNamespace(messages=rows, dead_letters=[])
    asked: list[int] = []

    def keep() -> bool:
        asked.append(1)
        return len(asked) % 5 == 0  # 1 in 5

    events = events_of(outcome, keep=keep)
    assert len(asked) == 10  # once per success, never for the crash
    assert [e.message_id for e in events] == ["m4", "m9", "m10"]
    assert events[-1].status == "crashed" and events[-1].error == "boom"
    assert len(events_of(outcome)) == 11  # no sampler: every message


def test_events_past_the_sending_threads_queue_are_dropped_and_counted(settings: Any) -> None:
    from keyq import metrics
    from keyq.flower_events import QUEUE_LIMIT, FlowerEvents, MessageEvent

    flower = FlowerEvents(settings, "node-drop", rate=1e9)
    for _ in range(QUEUE_LIMIT):  # a sending thread that fell behind (none runs here)
        flower._queue.put(([], {}, 0.0))
    before = metrics.task_events_dropped._value.get()
    failed = [MessageEvent(f"m{i}", "counter", "k", "add", "crashed", "boom") for i in range(3)]
    assert flower.emit(failed) == 0
    assert flower.dropped == 3
    assert metrics.task_events_dropped._value.get() - before == 3
    assert flower._thread is None  # nothing was started to send them


def test_the_events_of_many_batches_go_out_in_few_broker_messages(
    settings: Any, redis_client: redis.Redis
) -> None:
    """Batches committed close together share one publish (the sending thread gathers
    COALESCE_S of them): at 1,000 msg/s a worker commits hundreds of batches a second, and a
    wake-up and a publish for each cost it about a tenth of its CPU. Every event still goes out."""
    from keyq.flower_events import FlowerEvents, MessageEvent

    pubsub = redis_client.pubsub()
    pubsub.psubscribe("*celeryev*")
    poll(lambda: pubsub.get_message(timeout=0.1), 5.0, what="the subscription")
    flower = FlowerEvents(settings, "node-coalesce", rate=1e9)
    try:
        for b in range(20):
            assert flower.emit([MessageEvent(f"m{b}", "counter", "k", "add", "applied")]) == 1
        assert flower.flush(10.0), "the events were not sent"
        published: list[Any] = []
        while (message := pubsub.get_message(timeout=0.5)) is not None:
            published.append(message)
    finally:
        flower.close()
        pubsub.close()
    events, ours = [], 0
    for message in published:  # (any other process's events on this server are left out)
        body = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
        sent = body if isinstance(body, list) else [body]
        mine = [e for e in sent if "node-coalesce" in e["hostname"]]
        events += mine
        ours += bool(mine)
    succeeded = sorted(e["uuid"] for e in events if e["type"] == "task-succeeded")
    assert succeeded == sorted(f"m{b}" for b in range(20))
    assert len(events) == 60  # received, started, succeeded: each message's three
    assert 1 <= ours <= 3, f"{ours} publishes for 20 batches"
