"""Whether this node can reach its database: a node that cannot must not keep its partitions.

A worker whose database fails while the other nodes still reach theirs (a cut link, a broken
connection pool) would otherwise hold its leases and retry forever: its partitions stall though
healthy nodes could serve them. After ``KEYQ_REPO_HANDOFF_S`` of failures in a row the node
counts as unhealthy: it gives up the batch in hand (its messages go back to their queue heads,
nothing dead-lettered), leaves the rendezvous set and releases its partitions; the others take
them. The heartbeat thread probes the database about once a second meanwhile, and the node
rejoins at the first answer. When the database is down for every node, every node steps back
alike and all rejoin when it answers: the messages wait in their queues.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

PROBE_EVERY_S = 1.0  # while unhealthy, the heartbeat thread asks the database this often


class RepoHealth:
    """Failures in a row since when, and the probe that ends an outage."""

    def __init__(
        self,
        handoff_s: float,
        probe: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.handoff_s = handoff_s
        self._probe = probe
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._last_probe = float("-inf")

    def failed(self) -> None:
        """A Repo call failed for want of the database (not for bad data or a fence)."""
        with self._lock:
            if self._down_since is None:
                self._down_since = self._clock()

    def succeeded(self) -> None:
        with self._lock:
            was = self._down_since
            self._down_since = None
        if was is not None and self._clock() - was > self.handoff_s:
            log.warning("keyq database answers again: this node takes partitions again")

    def healthy(self) -> bool:
        """False once the database has failed for longer than handoff_s (cheap; no probe)."""
        with self._lock:
            since = self._down_since
        return since is None or self._clock() - since <= self.handoff_s

    def probe_if_down(self) -> bool:
        """For the heartbeat thread: while unhealthy, ask the database (at most once per
        PROBE_EVERY_S) and clear the outage at its first answer. Returns healthy()."""
        if self.healthy():
            return True
        now = self._clock()
        if now - self._last_probe < PROBE_EVERY_S:
            return False
        self._last_probe = now
        try:
            self._probe()
        except Exception as e:  # still down: stay out
            log.info("keyq database still unreachable: %s", e)
            return False
        self.succeeded()
        return True
