"""The fault plan of a chaos run: a pure function of the seed, so a failing run can be replayed.

Every kind asked for appears once before any kind appears twice (when the count allows), and
the faults are spread over the load window, one per slot, so two never overlap by design.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

KILL9 = "kill9"  # kill -9 of a worker process, then a replacement starts
SIGSTOP = "sigstop"  # SIGSTOP of a worker for longer than the lease TTL, then SIGCONT
PG_RESTART = "pg_restart"  # pg_ctl stop -m immediate, then start
REDIS_RESTART = "redis_restart"  # kill -9 of redis-server, then start from its AOF
POISON = "poison"  # raw garbage pushed onto partition queues
FAULT_KINDS = (KILL9, SIGSTOP, PG_RESTART, REDIS_RESTART, POISON)

POISON_VARIANTS = ("not_json", "lone_surrogate", "unknown_encoding")
WINDOW_START = 0.1  # faults begin after this fraction of the load window ...
WINDOW_END = 0.85  # ... and end before this one, so the load runs on both sides of them
PAUSE_LEASES = (2.0, 4.0)  # a SIGSTOP lasts this many lease TTLs (at random between)
DOWN_S = (0.5, 2.0)  # a server stays down this long (seconds, at random between)


@dataclass(frozen=True)
class Fault:
    """One planned fault: when (seconds after the load starts), what, and its parameters."""

    at_s: float
    kind: str
    worker: int = 0  # kill9 / sigstop: the index of the worker slot hit
    duration_s: float = 0.0  # sigstop: the pause; restarts: the time the server stays down
    poison: tuple[tuple[str, int], ...] = field(default=())  # (variant, partition) pushed

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"at_s": round(self.at_s, 3), "kind": self.kind}
        if self.kind in (KILL9, SIGSTOP):
            out["worker"] = self.worker
        if self.duration_s:
            out["duration_s"] = round(self.duration_s, 3)
        if self.poison:
            out["poison"] = [list(p) for p in self.poison]
        return out


def check_kinds(kinds: list[str]) -> list[str]:
    """The fault kinds asked for, refused with the list of known ones when one is unknown."""
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown fault kind(s) {unknown}; choose from {', '.join(FAULT_KINDS)}")
    return list(dict.fromkeys(kinds))


def make_schedule(
    seed: int,
    count: int,
    kinds: list[str],
    window_s: float,
    workers: int,
    partitions: int,
    lease_ttl_s: float,
) -> list[Fault]:
    """``count`` faults of the given kinds over a load of ``window_s`` seconds, by time."""
    kinds = check_kinds(kinds)
    if count < 0 or window_s <= 0 or workers < 1 or partitions < 1:
        raise ValueError("count >= 0, window_s > 0, workers >= 1 and partitions >= 1 are needed")
    rng = random.Random(seed)
    order = rng.sample(kinds, len(kinds))[:count]
    order += [rng.choice(kinds) for _ in range(count - len(order))]
    rng.shuffle(order)
    start, span = window_s * WINDOW_START, window_s * (WINDOW_END - WINDOW_START)
    slot = span / count if count else 0.0
    faults = []
    for i, kind in enumerate(order):
        at = start + slot * i + rng.uniform(0.0, slot * 0.3)
        worker, duration = 0, 0.0
        poison: tuple[tuple[str, int], ...] = ()
        if kind in (KILL9, SIGSTOP):
            worker = rng.randrange(workers)
        if kind == SIGSTOP:
            duration = lease_ttl_s * rng.uniform(*PAUSE_LEASES)
        elif kind in (PG_RESTART, REDIS_RESTART):
            duration = rng.uniform(*DOWN_S)
        elif kind == POISON:
            poison = tuple((v, rng.randrange(partitions)) for v in POISON_VARIANTS)
        faults.append(Fault(at, kind, worker, duration, poison))
    return faults
