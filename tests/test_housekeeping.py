"""Housekeeping never holds up a worker's partitions."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from keyq.celery_app import RECONCILE_TASK, default_queue
from keyq.client import Client
from keyq.reconciler import FAULT_RECONCILE_SLEEP
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll
from tests.test_supervisor import free_port, metric

pytestmark = pytest.mark.integration


def test_a_slow_reconcile_run_does_not_hold_up_the_workers_partitions(
    start_worker: WorkerFactory, settings: Settings, client: Client, redis_client: redis.Redis
) -> None:
    """The worker that takes the beat task runs it beside its partitions: a call is answered
    while the (deliberately slow) run still holds the reconciler's lock."""
    start_worker(env={FAULT_RECONCILE_SLEEP: "5"})
    assert client.call("counter", "warm", "add", {"by": 1}) == 1
    client.app.send_task(RECONCILE_TASK, queue=default_queue(settings))
    lock_key = settings.redis_key("reconcile", "lock")
    poll(lambda: redis_client.exists(lock_key), what="the reconcile run to start")

    assert client.call("counter", "during", "add", {"by": 1}, timeout=3) == 1
    assert redis_client.exists(lock_key), "the run ended before the call was answered"


def test_mailbox_depth_is_published_while_the_worker_is_busy(
    start_worker: WorkerFactory, settings: Settings, client: Client, tmp_path: Path
) -> None:
    """keyq_mailbox_depth shows the messages waiting on a held partition, also while a long
    handler keeps the worker's loop busy."""
    port = free_port()
    start_worker(env={"KEYQ_METRICS_PORT": str(port)})
    key = "busy"
    partition = str(partition_for(key, settings.partitions))
    mark = tmp_path / "inside-handler"
    client.send("slow", key, "see", {"mark": str(mark), "seconds": 4})
    poll(mark.exists, what="the slow handler to start")
    for i in range(5):
        client.send("slow", key, "see", i)
    poll(
        lambda: metric(port, "keyq_mailbox_depth", partition=partition) >= 5,
        timeout=3,
        what="the depth gauge to show the 5 waiting messages",
    )
    poll(
        lambda: len((client.read("slow", key) or {}).get("log", [])) == 6,
        timeout=20,
        what="all 6 messages applied",
    )
    poll(
        lambda: metric(port, "keyq_mailbox_depth", partition=partition) == 0,
        what="the gauge to fall back to 0",
    )
