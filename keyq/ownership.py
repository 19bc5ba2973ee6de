"""Membership and partition ownership: heartbeats, rendezvous assignment, fenced leases.

Each worker node heartbeats into a Redis sorted set scored by the server's clock. The owner of a
partition is chosen by rendezvous (highest random weight) hashing over the live members, so a
join or a leave moves only about 1/n of the partitions. A node consumes a partition's queue only
while it holds the partition's lease: SET NX PX with a fencing token from INCR that grows with
every grant. The token goes with every Repo write, so a paused former owner cannot write.

Two threads share this object: a heartbeat thread (``heartbeat``: membership and lease renewal,
so long batches never lose a lease) and the consumer's event loop (``tick``: claims, handoffs and
the consumer changes that must happen in the loop).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import redis

from keyq.cluster import (  # re-exported: the cluster view is what ownership acts on
    MAX_NODE_NAME_LENGTH as MAX_NODE_NAME_LENGTH,
)
from keyq.cluster import LeaseInfo as LeaseInfo
from keyq.cluster import Leases as Leases
from keyq.cluster import Membership as Membership
from keyq.cluster import assignment as assignment
from keyq.cluster import new_node_id as new_node_id
from keyq.cluster import rendezvous_owner as rendezvous_owner
from keyq.errors import StaleWriteError
from keyq.mailbox import HANDOFF_GRACE_S as HANDOFF_GRACE_S
from keyq.settings import Settings

log = logging.getLogger(__name__)

HEARTBEATS_PER_TTL = 8  # renewals within one TTL: a node must stall 7/8 TTL to lose a lease
TICKS_PER_TTL = 10  # ownership ticks within one TTL: a free lease is claimed this fast
HEARTBEAT_LOG_EVERY_S = 5.0  # a failing heartbeat logs this seldom (it beats every TTL / 8)
EXIT_STALLED = 70  # the watchdog's exit code: the consumer loop stopped making progress


class OwnershipHooks(Protocol):
    """What the worker does when ownership changes; all called from the consumer loop."""

    def prepare(self, partition: int, token: int) -> None:
        """Before consuming: record the token in the Repo and restore the previous owner's
        unacknowledged messages at the head of the queue."""

    def start_consuming(self, partition: int) -> None: ...

    def stop_consuming(self, partition: int) -> None: ...

    def forget(self, partition: int) -> None:
        """Drop in-memory activations of a partition this node no longer owns."""

    def settle(self) -> bool:
        """After consumers stop and before leases go: take back what a broker read still holds
        (to the queue head). True if nothing can arrive any more, so no grace wait is needed."""
        return False

    def observe(self, held: dict[int, int]) -> None:
        """Called by the heartbeat thread after each beat, also while a batch runs (gauges)."""

    def stalled(self) -> str | None:
        """Called by the heartbeat thread: why the consumer loop is stuck, or None. A stuck
        node must not keep its leases alive: it stops renewing them and exits."""
        return None

    def pulse(self) -> dict[str, object]:
        """What the heartbeat publishes about the consumer's progress (`keyq status`)."""
        return {}

    def healthy(self) -> bool:
        """Whether this node can serve partitions (its database answers). An unhealthy node
        leaves the rendezvous set and gives its partitions up until it is healthy again."""
        return True


@dataclass
class TickReport:
    acquired: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    draining: list[int] = field(default_factory=list)


class PartitionOwnership:
    """One node's view and control of the partitions it owns."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        node_id: str,
        hooks: OwnershipHooks,
        static_partitions: tuple[int, ...] | None = None,
        info: dict[str, object] | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.node_id = node_id
        self.hooks = hooks
        self.static_partitions = static_partitions
        self.leases = Leases(client, settings)
        self.membership = Membership(client, settings)
        self.info = dict(info or {})
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}  # partition -> token, consuming
        self._draining: dict[int, tuple[int, float]] = {}  # partition -> (token, stop time)
        # partition -> the token whose lease was lost (a failed renewal, a refused write): the
        # loop stops consuming at its next tick. By token, so a late report about an old lease
        # never stops a newer lease of the same partition.
        self._lost: dict[int, int] = {}
        # partition -> monotonic time its lease surely lasts until (claim or renewal start + TTL):
        # past it this node stops applying even before its heartbeat learns the lease is gone
        self._valid_until: dict[int, float] = {}
        self._members: list[str] = []
        self._static_elsewhere: set[int] = set()  # partitions of live static nodes
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    # --- read side (any thread) ------------------------------------------------------------

    def token(self, partition: int) -> int | None:
        """The fencing token if this node holds and consumes the partition now."""
        now = time.monotonic()
        with self._lock:
            token = self._held.get(partition)
            return token if token is not None and self._serves(partition, token, now) else None

    def _serves(self, partition: int, token: int, now: float) -> bool:
        """Held under `token`, not given up by the task body, its lease valid here (under
        self._lock)."""
        return self._lost.get(partition) != token and now < self._valid_until.get(partition, 0.0)

    def mark_lost(self, partition: int, token: int) -> None:
        """The task body learnt that the lease `token` of the partition moved on (a refused
        write); a report about an older lease than the one held now changes nothing."""
        with self._lock:
            if self._held.get(partition) == token:
                self._lost[partition] = token

    def held(self) -> dict[int, int]:
        with self._lock:
            return dict(self._held)

    def serving(self) -> dict[int, int]:
        """The held partitions this node consumes now (see token): not one given up by the
        task body, whose lease may still name this node in Redis until the next tick."""
        now = time.monotonic()
        with self._lock:
            return {p: t for p, t in self._held.items() if self._serves(p, t, now)}

    def members(self) -> list[str]:
        with self._lock:
            return list(self._members)

    def desired(self, members: list[str]) -> set[int]:
        if self.static_partitions is not None:
            return set(self.static_partitions)
        if not self.hooks.healthy():
            return set()  # out of the rendezvous set: the healthy nodes take them
        if self.node_id not in members:
            members = [*members, self.node_id]
        with self._lock:
            static = set(self._static_elsewhere)
        return {
            p
            for p in range(self.settings.partitions)
            if p not in static and rendezvous_owner(p, members) == self.node_id
        }

    # --- heartbeat thread ------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Announce this node and renew the leases it holds (or drains); mark lost ones."""
        with self._lock:
            consuming = sorted(p for p, t in self._held.items() if self._lost.get(p) != t)
        info = {**self.info, **self.hooks.pulse(), "partitions": consuming, "ts": time.time()}
        balanced = self.static_partitions is None and self.hooks.healthy()
        members, static = self.membership.heartbeat(self.node_id, info, balanced=balanced)
        with self._lock:
            self._members = members
            self._static_elsewhere = static
            # a lost lease is not renewed again (the loop drops it at its next tick)
            renewing = {p: tok for p, tok in self._held.items() if self._lost.get(p) != tok}
            renewing.update({p: tok for p, (tok, _) in self._draining.items()})
        started = time.monotonic()
        result = self.leases.renew(self.node_id, renewing)
        lost = [p for p, ok in result.items() if not ok]
        with self._lock:
            for p, ok in result.items():
                if ok and self._held.get(p) == renewing[p]:
                    self._valid_until[p] = started + self.settings.lease_ttl_s
            for p in lost:  # only if the lease renewed is still the one held
                if self._held.get(p) == renewing[p]:
                    self._lost[p] = renewing[p]
        if lost:
            log.error("keyq lost partition leases node=%s partitions=%s", self.node_id, lost)

    def start_heartbeat(self) -> None:
        self.heartbeat()
        self._thread = threading.Thread(
            target=self._heartbeat_loop, name="keyq-heartbeat", daemon=True
        )
        self._thread.start()

    def _heartbeat_loop(self) -> None:
        interval = self.settings.lease_ttl_s / HEARTBEATS_PER_TTL
        failures, last_logged = 0, float("-inf")  # while Redis is away: one line per 5 s
        while not self._stopping:
            started = time.monotonic()
            stalled = self.hooks.stalled()
            if stalled is not None:
                self._stopping = True  # no renewal from now on: the next owner takes over
                log.critical("keyq watchdog: %s; exiting node=%s", stalled, self.node_id)
                logging.shutdown()
                os._exit(EXIT_STALLED)
            try:
                self.heartbeat()
                if failures:
                    log.warning(
                        "keyq heartbeat works again node=%s after %d failure(s)",
                        self.node_id, failures,
                    )
                    failures, last_logged = 0, float("-inf")
                self.hooks.observe(self.held())
            except redis.RedisError as e:
                failures += 1
                if time.monotonic() - last_logged >= HEARTBEAT_LOG_EVERY_S:
                    last_logged = time.monotonic()
                    log.error(
                        "keyq heartbeat failed node=%s failures=%d error=%s",
                        self.node_id, failures, e,
                    )
            self._wake.wait(max(0.0, interval - (time.monotonic() - started)))

    # --- consumer loop ---------------------------------------------------------------------

    def tick(self, now: float | None = None) -> TickReport:
        """Converge on the desired partition set: stop lost ones, hand off, claim new ones."""
        now = time.monotonic() if now is None else now
        report = TickReport()
        members = self.members() or [self.node_id]
        desired = self.desired(members)

        with self._lock:
            lost = [p for p, t in self._lost.items() if self._held.get(p) == t]
            for p in lost:
                del self._held[p]
                self._valid_until.pop(p, None)
            self._lost.clear()
        for p in lost:
            self._safe(self.hooks.stop_consuming, p)
            self._safe(self.hooks.forget, p)
            report.lost.append(p)

        for p, token in list(self.held().items()):
            if p not in desired:
                self._safe(self.hooks.stop_consuming, p)
                with self._lock:
                    self._held.pop(p, None)
                    self._valid_until.pop(p, None)
                    self._draining[p] = (token, now)
                self._safe(self.hooks.forget, p)

        with self._lock:
            draining = dict(self._draining)
        for p, (token, since) in draining.items():
            if now - since >= HANDOFF_GRACE_S:
                self.leases.release(p, self.node_id, token)
                with self._lock:
                    self._draining.pop(p, None)
                report.released.append(p)
            else:
                report.draining.append(p)

        last_renew = time.monotonic()
        for p in sorted(desired):
            if p in self.held() or p in draining:
                continue
            if time.monotonic() - last_renew > self.settings.lease_ttl_s / 4:
                self.heartbeat()  # many claims in one tick: keep earlier ones alive
                last_renew = time.monotonic()
            claim_started = time.monotonic()
            claimed = self.leases.claim(p, self.node_id)
            if claimed is None:
                continue
            token = claimed
            try:
                self.hooks.prepare(p, token)
                self.hooks.start_consuming(p)
            except StaleWriteError as e:  # the token was not new to the Repo: claim again
                log.warning("keyq claim refused partition=%s node=%s: %s", p, self.node_id, e)
                self.leases.release(p, self.node_id, token)
                continue
            except Exception:
                log.exception("keyq could not take partition %s node=%s", p, self.node_id)
                self.leases.release(p, self.node_id, token)
                continue
            with self._lock:
                self._held[p] = token
                self._valid_until[p] = claim_started + self.settings.lease_ttl_s
            report.acquired.append(p)
        if report.acquired or report.released or report.lost:
            log.info(
                "keyq ownership node=%s acquired=%s released=%s lost=%s held=%d",
                self.node_id,
                report.acquired,
                report.released,
                report.lost,
                len(self.held()),
            )
        return report

    def shutdown(self, grace_s: float = HANDOFF_GRACE_S) -> None:
        """Graceful handoff of everything: stop consuming, take back what a pending broker read
        holds (or wait it out), release the leases (delete, not expire), leave."""
        held = self.held()
        for p in held:
            self._safe(self.hooks.stop_consuming, p)
        settled = False
        try:
            settled = self.hooks.settle()
        except Exception:
            log.exception("keyq could not settle the pending broker read node=%s", self.node_id)
        if held and not settled:
            time.sleep(grace_s)
        with self._lock:
            draining = {p: tok for p, (tok, _) in self._draining.items()}
            self._held.clear()
            self._draining.clear()
            self._valid_until.clear()
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2)  # no renewal may race the releases below
        released: list[int] = []
        expired: list[int] = []
        for p, token in sorted({**held, **draining}.items()):
            try:
                (released if self.leases.release(p, self.node_id, token) else expired).append(p)
            except redis.RedisError as e:
                log.error("keyq could not release partition %s: %s", p, e)
                expired.append(p)
        try:
            self.membership.leave(self.node_id)
        except redis.RedisError as e:
            log.error("keyq could not leave membership: %s", e)
        log.info(
            "keyq node left node=%s released=%s not_ours_any_more=%s",
            self.node_id,
            released,
            expired,
        )

    def _safe(self, fn: object, partition: int) -> None:
        try:
            fn(partition)  # type: ignore[operator]
        except Exception:
            log.exception(
                "keyq ownership hook failed partition=%s node=%s", partition, self.node_id
            )
