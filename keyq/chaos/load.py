"""The journal load: producer threads append ``{"p": producer, "n": seq}`` to their keys, paced
to a target rate, and record every send's outcome. A send that raised is retried as a NEW send
(a new message id and the next seq); the one that raised is kept as uncertain, never assumed
lost nor applied."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from keyq.chaos.verify import Sent
from keyq.client import Client

ENTITY, OP = "journal", "append"
RETRY_PAUSE_S = 0.2  # after a failed send, before the next attempt
GIVE_UP_S = 120.0  # a producer that cannot send for this long stops (reported as unsent)


def journal_key(i: int) -> str:
    return f"j{i:05d}"


@dataclass
class Producer:
    """One thread sending its share of messages to its own keys, in round-robin order."""

    index: int
    keys: list[str]
    messages: int
    rate: float  # messages per second for this producer
    client: Client
    stop: threading.Event
    sent: dict[str, list[Sent]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    unsent: int = 0
    seq: int = 0

    def _attempt(self, key: str) -> bool:
        self.seq += 1
        try:
            self.client.send(ENTITY, key, OP, {"p": self.index, "n": self.seq})
        except Exception as e:  # any failure leaves the outcome unknown
            self.errors[type(e).__name__] += 1
            self.sent.setdefault(key, []).append(Sent(self.index, self.seq, False))
            return False
        self.sent.setdefault(key, []).append(Sent(self.index, self.seq, True))
        return True

    def run(self) -> None:
        started = time.monotonic()
        for i in range(self.messages):
            if self.stop.is_set():
                self.unsent += self.messages - i
                return
            ahead = started + i / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            key = self.keys[i % len(self.keys)]
            failing_since = time.monotonic()
            while not self._attempt(key):
                if self.stop.is_set() or time.monotonic() - failing_since > GIVE_UP_S:
                    self.unsent += self.messages - i
                    return
                time.sleep(RETRY_PAUSE_S)


@dataclass
class Load:
    """Several producers over ``keys`` keys; start(), then join()."""

    client: Client
    messages: int
    keys: int
    producers: int
    rate: float
    stop: threading.Event = field(default_factory=threading.Event)
    workers: list[Producer] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        names = [journal_key(i) for i in range(self.keys)]
        for p in range(self.producers):
            share = self.messages // self.producers + (p < self.messages % self.producers)
            producer = Producer(
                p,
                names[p :: self.producers],
                share,
                self.rate / self.producers,
                self.client,
                self.stop,
            )
            thread = threading.Thread(target=producer.run, name=f"producer-{p}", daemon=True)
            self.workers.append(producer)
            self.threads.append(thread)
            thread.start()

    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self, timeout: float = 30.0) -> None:
        for t in self.threads:
            t.join(timeout)

    def sent(self) -> dict[str, list[Sent]]:
        out: dict[str, list[Sent]] = {}
        for producer in self.workers:
            for key, sends in producer.sent.items():
                out.setdefault(key, []).extend(sends)
        return out

    def errors(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for producer in self.workers:
            total.update(producer.errors)
        return dict(total)

    def unsent(self) -> int:
        return sum(p.unsent for p in self.workers)
