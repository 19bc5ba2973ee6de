"""A partition consumer cancelled from outside (`celery control cancel_consumer`, Flower's
button) while the node keeps the lease does not stall the partition: the node consumes it again
at its next ownership tick and says so in its log."""

from __future__ import annotations

import redis

from keyq.celery_app import make_app
from keyq.celery_worker import celery_hostname
from keyq.client import Client
from keyq.routing import partition_for
from keyq.settings import Settings
from tests.conftest import WorkerFactory, poll
from tests.ownership_helpers import database_url, lease_owners  # noqa: F401


def test_a_cancelled_consumer_is_re_added_and_its_partition_keeps_being_served(
    start_worker: WorkerFactory, client: Client, settings: Settings, redis_client: redis.Redis
) -> None:
    worker = start_worker()
    node = worker.node_id(redis_client, settings)
    key = "guarded-key"
    p = partition_for(key, settings.partitions)
    queue = settings.queue_name(p)
    assert client.call("counter", key, "add", {"by": 1}) == 1

    control = make_app(settings, name="keyq-test-control")
    try:
        replies = control.control.cancel_consumer(
            queue, destination=[celery_hostname(node)], reply=True, timeout=5.0
        )
        assert replies, "the worker did not answer cancel_consumer"
        poll(lambda: f"Canceling queue {queue}" in worker.log(), 10.0,
             what="Celery to cancel the consumer")
        poll(lambda: "cancelled from outside" in worker.log(), 10.0,
             what="the worker to notice the cancelled consumer")
        assert lease_owners(redis_client, settings)[p] == node  # it kept the lease ...
        assert client.call("counter", key, "add", {"by": 1}, timeout=5.0) == 2  # ... and serves

        def consuming() -> bool:
            active = control.control.inspect(
                destination=[celery_hostname(node)], timeout=2.0
            ).active_queues() or {}
            return any(q["name"] == queue for qs in active.values() for q in qs)

        poll(consuming, 10.0, what="the worker to report consuming the queue again")
    finally:
        control.close()
    line = next(x for x in worker.log().splitlines() if "cancelled from outside" in x)
    assert f"partition={p}" in line and f"node={node}" in line
