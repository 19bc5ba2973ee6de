"""A background load for the takeover measure: one paced open-loop sender in its own process.

The sender is spawned (so it shares no GIL with the benchmark's polling loop), connects, says it
is ready, then sends message i at t0 + i/rate until it is told to stop, whatever happens to the
earlier ones; it reports how many it sent, over how long, and how far it fell behind schedule.
One process offers up to a few thousand sends per second (about 100 us of CPU each).
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from typing import Any

from keyq.bench.workload import ENTITY, OP, bench_key
from keyq.client import Client
from keyq.settings import Settings

FLAG_BELOW = 0.95  # achieved under this share of the asked rate: the load is flagged
STOP_CHECK_EVERY = 16  # sends between two looks at the stop event


@dataclass(frozen=True)
class LoadResult:
    asked: float  # msg/s
    sent: int  # adds of {"by": 1} (the connecting message adds 0 and is not counted)
    seconds: float  # from the first send to the stop
    behind_s: float  # worst lateness against the schedule

    @property
    def achieved(self) -> float | None:
        return self.sent / self.seconds if self.seconds > 0 else None

    @property
    def flagged(self) -> bool:
        achieved = self.achieved
        return achieved is None or achieved < FLAG_BELOW * self.asked


class BackgroundLoad:
    """Start, then stop: a paced sender of `rate` msg/s over `keys` keys in a spawned process."""

    def __init__(self, settings: Settings, rate: float, keys: int) -> None:
        if rate <= 0:
            raise ValueError("a background load needs a positive rate")
        self.rate = rate
        ctx = multiprocessing.get_context("spawn")
        self._ready = ctx.Event()
        self._stop = ctx.Event()
        self._results: Any = ctx.Queue()
        self._proc = ctx.Process(
            target=_sender,
            args=(settings, rate, keys, self._ready, self._stop, self._results),
            name="keyq-bench-load",
            daemon=True,
        )

    def start(self, timeout: float = 60.0) -> None:
        """Spawn the sender and wait until it is connected and sending."""
        self._proc.start()
        if not self._ready.wait(timeout):
            self._proc.kill()
            raise TimeoutError(f"the load sender did not start within {timeout:g} s")

    def stop(self, timeout: float = 30.0) -> LoadResult:
        self._stop.set()
        try:
            sent, seconds, behind = self._results.get(timeout=timeout)
        finally:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
        return LoadResult(self.rate, int(sent), float(seconds), float(behind))


def _sender(
    settings: Settings, rate: float, keys: int, ready: Any, stop: Any, results: Any
) -> None:
    behind = 0.0
    sent = 0
    with Client(settings) as client:
        client.send(ENTITY, bench_key(0), OP, {"by": 0})  # connect before the clock starts
        ready.set()
        t0 = time.monotonic()
        while sent % STOP_CHECK_EVERY or not stop.is_set():
            delay = t0 + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                behind = max(behind, -delay)
            client.send(ENTITY, bench_key(sent % keys), OP, {"by": 1})
            sent += 1
        seconds = time.monotonic() - t0
    results.put((sent, seconds, behind))
