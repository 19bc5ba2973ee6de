"""kombu's Redis transport with one fix that keyq's ordering needs.

When a consumer stops consuming a queue while a BRPOP that names it is still waiting, the BRPOP
may pop a message of that queue after all. Stock kombu then "requeues the undeliverable message"
at the TAIL of the queue, behind newer messages of the same keys. For keyq's partition queues this
transport pushes it back at the HEAD (the right end, which BRPOP pops next), exactly as it was,
so the partition's next owner sees it first. Other queues keep kombu's behaviour.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

log = logging.getLogger(__name__)


def is_partition_queue(queue: str) -> bool:
    """keyq partition queues are named '<namespace>.p<number>'."""
    head, sep, tail = queue.rpartition(".p")
    return bool(sep and head and tail.isdigit())


class Transport(kombu_redis.Transport):
    """Redis transport that returns undeliverable partition messages to the queue's head."""

    def _reject_inbound_message(self, raw_message: Any) -> None:
        queue = (
            raw_message.get("properties", {}).get("delivery_info", {}).get("routing_key", "")
            if isinstance(raw_message, dict)
            else ""
        )
        if not is_partition_queue(queue):
            super()._reject_inbound_message(raw_message)  # type: ignore[no-untyped-call]
            return
        for channel in self.channels:
            if channel:
                channel.client.rpush(queue, dumps(raw_message))  # type: ignore[no-untyped-call]
                log.info("keyq returned a message to the head of %s (no consumer here now)", queue)
                return
        super()._reject_inbound_message(raw_message)  # type: ignore[no-untyped-call]
