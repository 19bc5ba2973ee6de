"""Consumers cancelled from outside: re-added at the next ownership tick.

Celery lets anyone with broker access stop a worker consuming a queue (`celery control
cancel_consumer`, Flower's "cancel consumer" button). For keyq that is a silent stall: the node
still holds the partition's lease and renews it, so no other node takes the partition over, and
its messages wait for ever. The lease is the truth about who serves a partition, so the
consumer follows the lease: every ownership tick compares the queues this node holds leases for
with the queues its Celery consumer reads, re-adds any that is missing, and says so in the log
and in ``keyq_consumers_readded_total``. An operator who wants a node to stop serving
partitions stops the node (its leases move on); there is no way to hold a lease without serving.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter

from keyq.metrics import REGISTRY
from keyq.ownership import PartitionOwnership
from keyq.settings import Settings

log = logging.getLogger(__name__)

consumers_readded = Counter(
    "keyq_consumers_readded_total",
    "Partition consumers cancelled from outside (remote control, Flower) and re-added",
    ["partition"],
    registry=REGISTRY,
)


def readd_cancelled(consumer: Any, ownership: PartitionOwnership, settings: Settings) -> list[int]:
    """Re-add the consumer of every partition this node holds a valid lease for but does not
    read (a Celery consumer, in its own event loop); returns those partitions."""
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is None:  # the consumer is (re)starting: its start re-adds our queues
        return []
    readded: list[int] = []
    for partition in sorted(ownership.serving()):  # not lost or expiring: the tick drops those
        queue = settings.queue_name(partition)
        if task_consumer.consuming_from(queue):
            continue
        log.warning(
            "keyq partition consumer was cancelled from outside while this node holds its "
            "lease; consuming it again partition=%s queue=%s node=%s",
            partition, queue, ownership.node_id,
        )
        consumer.add_task_queue(queue)
        consumers_readded.labels(str(partition)).inc()
        readded.append(partition)
    return readded
