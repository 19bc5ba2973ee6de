"""Housekeeping never holds up a worker's partitions."""

from __future__ import annotations

import pytest
import redis

from keyq.celery_app import RECONCILE_TASK, default_queue
from keyq.client import Client
from keyq.reconciler import FAULT_RECONCILE_SLEEP
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll

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
