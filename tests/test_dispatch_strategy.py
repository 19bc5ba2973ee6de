"""keyq.celery_worker.keyq_strategy: a plain keyq.dispatch message goes straight to the runtime;
one that Celery must hold first (an ETA) still takes Celery's own path and waits for it."""

from __future__ import annotations

import time

from keyq.celery_app import DISPATCH_TASK
from keyq.client import Client
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll


def test_a_plain_message_is_applied_and_an_eta_message_waits_for_its_eta(
    start_worker: WorkerFactory, settings: Settings, client: Client
) -> None:
    start_worker()
    queue = settings.queue_name(partition_for("strat", settings.partitions))
    client.app.send_task(
        DISPATCH_TASK,
        args=[[client.envelope("counter", "strat", "add", {"by": 1}).to_wire()]],
        queue=queue,
    )
    poll(lambda: client.read("counter", "strat") == {"value": 1}, what="the plain message")
    eta_s = 3.0
    sent = time.monotonic()
    client.app.send_task(
        DISPATCH_TASK,
        args=[[client.envelope("counter", "strat", "add", {"by": 10}).to_wire()]],
        queue=queue,
        countdown=eta_s,
    )
    client.send("counter", "strat", "add", {"by": 100})  # behind it on the queue, no ETA
    poll(lambda: client.read("counter", "strat") == {"value": 101}, what="the message behind")
    assert time.monotonic() - sent < eta_s  # not held back by the one Celery holds
    poll(lambda: client.read("counter", "strat") == {"value": 111}, 20.0, what="the ETA message")
    assert time.monotonic() - sent >= eta_s - 0.1  # Celery's clock and ours: same host
