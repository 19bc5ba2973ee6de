"""The claim folded into the broker fetch: which queues' messages the fetch claims at once.

A batch used to begin with two round trips: the broker fetch (keyq/lua/fetch.lua) recorded the
message in kombu's unacked table, then the worker's claim (claim_batch.lua) moved it into the
partition's in-flight list under the lease and drained more. For each partition it serves, the
worker keeps a claim plan here (the lease, the in-flight list, whether the partition is fresh
from a takeover); keyq's transport passes the plans to the fetch, which does the claim's steps
itself, and hands what it claimed to ``deliver`` without Celery in between (the worker's own
strategy skipped Celery's task machinery already). The crash safety is the claim's: a message
is always in its queue or in an in-flight list, which the next owner restores.

Only where Redis is also the broker (the lease must be on the fetch's server), and only while
KEYQ_FETCH_CLAIM is on (the default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from keyq.mailbox import Claimed, _b, partition_of_queue
from keyq.settings import Settings

# what becomes of a claimed delivery: (queue, the message's bytes, the claim's steps, the plan
# the fetch claimed it under)
Deliver = Callable[[str, bytes, Claimed, "ClaimPlan"], None]


@dataclass(frozen=True)
class ClaimPlan:
    """What the fetch needs to claim a message of one partition queue."""

    token: int  # the lease's fencing token
    lease_key: str
    lease_value: str  # owner|token, as the lease holds it while the partition is ours
    inflight_key: str
    fresh: bool  # taken over and not served by a batch yet


class FetchClaims:
    """The claim plans of one worker process, and what the transport does with a claim."""

    def __init__(
        self,
        settings: Settings,
        deliver: Deliver,
        give_back: Callable[[str, ClaimPlan, bool], None],
        lost: Callable[[str, ClaimPlan], None],
        room: int,
        poison_room: int,
        drain_step: int,
    ) -> None:
        self.settings = settings
        # by queue name; replaced, never changed in place, so that the transport's reference
        # to the plans a fetch was sent with stays what the fetch was sent with
        self.plans: dict[str, ClaimPlan] = {}
        self.version = 0  # moves with every change: the transport packs its fetch anew
        self.deliver = deliver
        # the consumer left the queue, or the delivery failed (True: count it): the in-flight
        # list back at the queue head; never raises
        self.give_back = give_back
        self.lost = lost  # the lease is not the plan's any more
        self.room = room
        self.poison_room = poison_room
        self.drain_step = drain_step

    def put(self, queue: str, plan: ClaimPlan) -> None:
        if self.plans.get(queue) != plan:
            self.plans = {**self.plans, queue: plan}
            self.version += 1

    def drop(self, queue: str) -> None:
        if queue in self.plans:
            self.plans = {q: p for q, p in self.plans.items() if q != queue}
            self.version += 1

    def fetch_args(
        self, queues: Sequence[str], acked: Sequence[bool]
    ) -> tuple[list[str], list[str | int]]:
        """The fetch's plan keys and its ARGV (see fetch.lua) for these queue keys in order."""
        keys: list[str] = []
        flags: list[str] = []
        values: list[str] = []
        for queue, with_acks in zip(queues, acked, strict=True):
            plan = self.plans.get(queue) if with_acks else None
            if plan is None:
                flags.append("1" if with_acks else "0")
                continue
            keys += [plan.lease_key, plan.inflight_key]
            values += [plan.lease_value, "1" if plan.fresh else "0"]
            flags.append(f"c{len(values) // 2}")
        head: list[str | int] = [len(keys) // 2, self.room, self.poison_room, self.drain_step]
        return keys, [*head, *flags, *values]

    def claimed(self, reply: Sequence[Any]) -> Claimed:
        """The fetch's claim steps (the reply's items after queue, payload, 3, left)."""
        drained, poison, found, share = reply
        waiting: dict[int, int] = {}
        for queue, length in zip(found[::2], found[1::2], strict=True):
            partition = partition_of_queue(self.settings, _b(queue).decode())
            if partition is not None:
                waiting[partition] = int(length)
        return Claimed(1, [_b(m) for m in drained], [_b(m) for m in poison], waiting, int(share))
