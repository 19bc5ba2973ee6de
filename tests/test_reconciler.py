"""The reconciler heals each drift in one run, and a run on a healthy system changes nothing."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis

from keyq import metrics
from keyq.celery_app import DISPATCH_TASK
from keyq.client import Client
from keyq.envelope import ACTIVATE_OP, make_system_envelope, parse_envelope
from keyq.errors import MalformedMessageError, UnknownOperationError
from keyq.mailbox import decode
from keyq.ownership import Membership
from keyq.reconciler import Reconciler
from keyq.repo import Repo
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import ROOT, WorkerFactory, poll, settings_env
from tests.test_cache import seed

NOTHING = {
    "names_released": 0,
    "activations_published": 0,
    "cache_refreshed": 0,
    "cache_dropped": 0,
    "warmed": 0,
    "swept": 0,
    "errors": 0,
    "healed": 0,
}


def changes(report_json: dict[str, object]) -> dict[str, object]:
    return {k: report_json[k] for k in NOTHING}


@pytest.fixture
def reconciler(settings: Settings, redis_client: redis.Redis) -> Iterator[Reconciler]:
    r = Reconciler(settings)
    yield r
    r.close()


def test_leaked_name_is_released_and_live_names_are_kept(
    reconciler: Reconciler, redis_client: redis.Redis, settings: Settings
) -> None:
    membership = Membership(redis_client, settings)
    membership.heartbeat("live-node", {})
    names = reconciler.names
    redis_client.set(names.name_key("counter", "held"), "live-node")
    redis_client.set(names.name_key("counter", "leaked"), "crashed-node")
    healed_before = metrics.reconcile_healed.labels("orphan_name")._value.get()

    report = reconciler.run_once()

    assert report.ran and report.names_checked == 2 and report.names_released == 1
    assert redis_client.get(names.name_key("counter", "leaked")) is None
    assert redis_client.get(names.name_key("counter", "held")) == b"live-node"
    assert metrics.reconcile_healed.labels("orphan_name")._value.get() - healed_before == 1

    membership.heartbeat("live-node", {})
    again = reconciler.run_once()
    assert changes(again.to_json()) == NOTHING
    assert redis_client.get(names.name_key("counter", "held")) == b"live-node"


def test_stale_cache_entry_is_refreshed_and_entry_unknown_to_repo_dropped(
    reconciler: Reconciler, repo: Repo
) -> None:
    seed(repo, "counter", {"stale": (3, {"value": 3}), "fresh": (2, {"value": 2})})
    cache = reconciler.cache
    cache.put("counter", "stale", 1, {"value": 1})  # a post-commit cache write that was lost
    cache.put("counter", "fresh", 2, {"value": 2})
    cache.put("counter", "phantom", 4, {"value": 4})  # no such key in the Repo

    report = reconciler.run_once()

    assert (report.cache_checked, report.cache_refreshed, report.cache_dropped) == (3, 1, 1)
    stale = cache.get("counter", "stale")
    assert stale is not None and (stale.version, stale.state) == (3, {"value": 3})
    assert cache.get("counter", "phantom") is None
    fresh = cache.get("counter", "fresh")
    assert fresh is not None and fresh.version == 2

    again = reconciler.run_once()
    assert again.cache_checked == 2 and changes(again.to_json()) == NOTHING


def test_hot_key_evicted_from_cache_is_warmed_before_it_is_asked_for(
    reconciler: Reconciler, client: Client, repo: Repo
) -> None:
    seed(repo, "counter", {f"h{i}": (1, {"value": i}) for i in range(5)})
    for _ in range(3):
        for i in range(5):
            client.read("counter", f"h{i}")
    client.cache.drop("counter", "h0")  # evicted (sweep, Redis restart, failover ...)
    assert client.cache.get("counter", "h0") is None

    report = reconciler.run_once()

    assert report.warm_checked == 5 and report.warmed == 1
    got = client.cache.get("counter", "h0")
    assert got is not None and (got.version, got.state) == (1, {"value": 0})
    hits = client.cache.stats()["hits"]
    assert client.read("counter", "h0") == {"value": 0}
    assert client.cache.stats()["hits"] == hits + 1  # served from the cache

    again = reconciler.run_once()
    assert changes(again.to_json()) == NOTHING


@pytest.mark.integration
def test_always_on_key_with_no_activation_is_reactivated(
    start_worker: WorkerFactory,
    client: Client,
    repo: Repo,
    reconciler: Reconciler,
    settings: Settings,
) -> None:
    """The Repo holds an always-on key, no node holds it: one run gets it activated (name
    registered by a live worker) without running a handler or writing a new version; idle
    passivation then leaves it alone while it drops ordinary keys."""
    seed(repo, "beacon", {"b1": (3, {"pings": 3})})
    seed(repo, "counter", {"c1": (1, {"value": 1})})  # not always-on: left alone
    worker = start_worker(settings_override=settings.with_(idle_timeout_s=0.5))
    assert not client.resolve("beacon", "b1").active

    report = reconciler.run_once()

    assert report.always_on_checked == 1 and report.activations_published == 1
    node = worker.node_id(client.redis, client.settings)
    poll(lambda: client.resolve("beacon", "b1").node == node, what="beacon b1 to be activated")
    assert "keyq activated by the reconciler entity=beacon key=b1" in worker.log()
    stored = repo.load_one("beacon", "b1")
    assert stored is not None and (stored.version, stored.state) == (3, {"pings": 3})
    assert not client.resolve("counter", "c1").active

    client.call("counter", "c2", "add")  # an ordinary key, passivated once idle
    poll(lambda: not client.resolve("counter", "c2").active, what="counter c2 to passivate")
    assert client.resolve("beacon", "b1").node == node

    again = reconciler.run_once()
    assert again.always_on_checked == 1 and changes(again.to_json()) == NOTHING
    assert client.call("beacon", "b1", "ping") == 4  # the activation holds the Repo's state


def test_always_on_activations_are_bounded_per_run(
    settings: Settings, redis_client: redis.Redis, repo: Repo
) -> None:
    """No worker runs: each run publishes at most a batch, resumes where the last one stopped,
    and does not repeat a pending activation."""
    seed(repo, "beacon", {f"b{i}": (1, {"pings": 1}) for i in range(5)})
    r = Reconciler(settings.with_(reconcile_batch=3))
    try:
        first, second, third = r.run_once(), r.run_once(), r.run_once()
    finally:
        r.close()
    assert (first.activations_published, second.activations_published) == (3, 2)
    assert third.activations_published == 0
    envelopes = [
        env
        for p in range(settings.partitions)
        for raw in redis_client.lrange(settings.queue_name(p), 0, -1)
        for env in decode(raw, (DISPATCH_TASK,), DISPATCH_TASK).envelopes
    ]
    assert sorted(e["key"] for e in envelopes) == [f"b{i}" for i in range(5)]
    assert all(e["op"] == "keyq.activate" and e["system"] is True for e in envelopes)


def test_producers_cannot_send_reserved_ops(client: Client) -> None:
    with pytest.raises(UnknownOperationError, match="reserved"):
        client.send("beacon", "b1", "keyq.activate")


def test_reconcile_once_command_runs_it_and_prints_what_it_did(
    settings: Settings, redis_client: redis.Redis
) -> None:
    name_key = settings.redis_key("n", "counter", "leaked")
    redis_client.set(name_key, "crashed-node")
    out = subprocess.run(
        [sys.executable, "-m", "keyq", "reconcile", "--once"],
        env=settings_env(settings),
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["ran"] is True and printed["names_released"] == 1 and printed["healed"] == 1
    assert redis_client.get(name_key) is None


def test_workers_accept_reserved_ops_only_as_known_system_messages() -> None:
    """keyq.* ops come only from keyq's own publishers: the worker's parse refuses a keyq.*
    op without the system flag, an unknown keyq.* op, and a system flag on a user op."""
    base = {"id": "m1", "entity": "beacon", "key": "b1", "partition": partition_for("b1", 8)}
    parse = functools.partial(parse_envelope, partitions=8, max_key_length=256)
    assert parse({**base, "op": "keyq.activate", "system": True}).system
    for bad in (
        {"op": "keyq.activate"},
        {"op": "keyq.activate", "system": "yes"},
        {"op": "keyq.reset", "system": True},
        {"op": "ping", "system": True},
    ):
        with pytest.raises(MalformedMessageError):
            parse({**base, **bad})
    assert not parse({**base, "op": "ping"}).system
    assert make_system_envelope("beacon", "b1", ACTIVATE_OP, partitions=8).to_wire()["system"]


def test_a_failing_step_does_not_stop_the_others(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """With the database down, the Repo steps fail and are counted; the names still heal."""
    down = settings.with_(database_url="postgresql://postgres@127.0.0.1:9/nowhere")
    redis_client.set(settings.redis_key("n", "counter", "leaked"), "crashed-node")
    r = Reconciler(down)
    try:
        r.cache.put("counter", "k", 1, {"value": 1})
        report = r.run_once()
    finally:
        r.close()
    assert report.ran and report.names_released == 1
    assert report.errors == 2  # always-on keys and the stale-cache check need the Repo
