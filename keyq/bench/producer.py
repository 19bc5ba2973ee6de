"""Producer cost, side by side in one thread: keyq's Client.send and send_many against plain
Celery's apply_async, on the same Redis, with no worker running.

The three loops take turns in rounds (send, apply_async, send_many, again), so a noisy
neighbour slows all three alike; wall time (perf_counter) gives the rate and CPU time of this
process (process_time) gives the cost per message. Everything goes to queues of a namespace of
its own, deleted at the end: nothing here is ever applied.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from keyq.bench.celery_noop import NOOP_TASK
from keyq.client import Client
from keyq.settings import Settings

PRODUCER_ROUNDS = 5  # each loop runs this many times, taking turns with the others
PRODUCER_WARMUP = 50  # untimed sends per loop first: connections, templates, scripts
SEND_MANY_CALL = 1000  # messages per send_many call
PRODUCER_NAMESPACE_SUFFIX = "prod"  # the producer's namespace: the run's plus this


@dataclass
class LoopCost:
    """One producer loop's totals over its rounds."""

    messages: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def add(self, messages: int, wall_s: float, cpu_s: float) -> None:
        self.messages += messages
        self.wall_s += wall_s
        self.cpu_s += cpu_s

    @property
    def per_s(self) -> float | None:
        return self.messages / self.wall_s if self.wall_s > 0 else None

    @property
    def cpu_us(self) -> float | None:
        return self.cpu_s / self.messages * 1e6 if self.messages else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "wall_s": round(self.wall_s, 4),
            "cpu_s": round(self.cpu_s, 4),
            "msgs_per_s": self.per_s,
            "cpu_us_per_msg": self.cpu_us,
        }


def _timed(cost: LoopCost, messages: int, loop: Callable[[], None]) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    loop()
    cost.add(messages, time.perf_counter() - wall, time.process_time() - cpu)


def producer_settings(settings: Settings) -> Settings:
    """The run's settings in a namespace of their own (its keys still match the run's
    namespace, so the run's cleanup removes anything left behind)."""
    return settings.with_(namespace=settings.namespace + PRODUCER_NAMESPACE_SUFFIX)


def measure_producers(
    settings: Settings, celery_app: Any, entity: str, op: str, messages: int, keys: int
) -> dict[str, Any]:
    """Client.send, apply_async of a no-op task and send_many, `messages` each, in this thread
    (celery_app: the plain Celery app of keyq.bench.celery_noop on the same broker)."""
    own = producer_settings(settings)
    client = Client(own)
    noop = celery_app.tasks[NOOP_TASK]
    queue = f"{own.namespace}.celery"
    per_round = max(1, messages // PRODUCER_ROUNDS)
    send, apply_async, send_many = LoopCost(), LoopCost(), LoopCost()
    counter = [0]

    def key() -> str:
        counter[0] += 1
        return f"k{counter[0] % keys}"

    def send_loop(n: int) -> Callable[[], None]:
        def loop() -> None:
            for _ in range(n):
                client.send(entity, key(), op, {"by": 1})

        return loop

    def apply_loop(n: int) -> Callable[[], None]:
        def loop() -> None:
            for _ in range(n):
                noop.apply_async(queue=queue)

        return loop

    def send_many_loop(n: int) -> Callable[[], None]:
        def loop() -> None:
            for start in range(0, n, SEND_MANY_CALL):
                size = min(SEND_MANY_CALL, n - start)
                client.send_many(entity, [(key(), op, {"by": 1}) for _ in range(size)])

        return loop

    try:
        send_loop(PRODUCER_WARMUP)()
        apply_loop(PRODUCER_WARMUP)()
        send_many_loop(PRODUCER_WARMUP)()
        for _ in range(PRODUCER_ROUNDS):
            _timed(send, per_round, send_loop(per_round))
            _timed(apply_async, per_round, apply_loop(per_round))
            _timed(send_many, per_round, send_many_loop(per_round))
    finally:
        client.close()
        _delete_namespace(own.redis_url, own.namespace)
    return {
        "rounds": PRODUCER_ROUNDS,
        "send": send.as_dict(),
        "apply_async": apply_async.as_dict(),
        "send_many": send_many.as_dict(),
    }


def _delete_namespace(redis_url: str, namespace: str) -> None:
    """Drop the producer's queues (and kombu's bindings of its Celery queue)."""
    r = redis.Redis.from_url(redis_url)
    try:
        names = list(r.scan_iter(match=f"*{namespace}*", count=1000))
        for start in range(0, len(names), 500):
            r.delete(*names[start : start + 500])
    finally:
        r.close()
