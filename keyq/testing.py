"""An in-process test kit for entities: the worker's own apply step, no servers.

Testing a handler should not need Redis, PostgreSQL and worker processes, and it should not test
a second, simpler implementation either. ``Harness`` feeds messages to ``keyq.applier.Applier``
(the code a worker runs) with a real ``ActivationTable`` and ``Supervisor``, and stands in
for the rest of a worker: a ``MemoryRepo`` with the Repo's commit rules (fencing tokens, versions,
applied ids, timers and dead letters in one all-or-nothing step), per-partition FIFO queues, a
``FakeClock`` that drives timers (``keyq.timers.decide`` applies the catch-up policies), idle
passivation with ``on_passivate``, and injected faults: a duplicate delivery, a process that
dies before or after its commit, and a takeover by a new process whose redelivered batch the
dedupe window absorbs.

Use it directly, or through the pytest fixture ``keyq_harness`` (this module is a pytest
plugin, registered by keyq's ``pytest11`` entry point; ``pytest -p keyq.testing`` also works)::

    def test_withdraw_is_refused_past_the_balance(keyq_harness):
        h = keyq_harness(Wallet)
        assert h.call("wallet", "alice", "deposit", {"amount": 10}) == 10
        with pytest.raises(keyq.Rejected):
            h.call("wallet", "alice", "withdraw", {"amount": 11})
        assert h.state("wallet", "alice") == {"balance": 10}

The harness swaps the applier module's wall clock for its fake clock while it applies (the
applier reads ``time.time()`` for timer due times), so run one harness per thread at a time.
"""

from __future__ import annotations

import copy
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, cast

from keyq import reply as replies
from keyq.activations import Activation, ActivationTable, KeyId
from keyq.applier import Applier, BatchOutcome
from keyq.entity import JSON, Entity, EntityRegistry
from keyq.envelope import producer_envelope
from keyq.errors import CallTimeoutError
from keyq.memory_repo import MemoryRepo, json_copy
from keyq.records import DeadLetter, TimerRow
from keyq.repo import Repo
from keyq.settings import Settings
from keyq.supervisor import Supervisor
from keyq.timers import fire_envelope

DEFAULT_START = 1_700_000_000.0  # the fake clock's epoch seconds at the start of a test
DEFAULT_PARTITIONS = 8  # enough to spread keys; the real count does not change behaviour
_MAX_TIMER_ROUNDS = 100_000  # advance() gives up past this many fire rounds (a runaway loop)
_RUNAWAY = (
    f"timers kept firing for {_MAX_TIMER_ROUNDS} rounds in one advance(): a handler that "
    "schedules its own timer again with no delay?"
)
_TICK_S = 0.0001  # a timer is applied this long after its due time (ms rounding stays exact)


class FakeClock:
    """Epoch seconds that move only when told (advance, or a restart's backoff sleep)."""

    def __init__(self, start: float = DEFAULT_START) -> None:
        self.now = start
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        """A restart's backoff: recorded and added to the clock, never waited."""
        self.slept.append(seconds)
        self.now += seconds


class _TimeShim:
    """The `time` module as the applier sees it while the harness applies a batch."""

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock

    def time(self) -> float:
        return self._clock.now

    def monotonic(self) -> float:  # restart backoffs are timed on it
        return self._clock.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextmanager
def _applier_clock(clock: FakeClock) -> Iterator[None]:
    import keyq.applier as applier_module

    namespace = vars(applier_module)
    saved = namespace["time"]
    namespace["time"] = _TimeShim(clock)
    try:
        yield
    finally:
        namespace["time"] = saved


class ProcessDied(BaseException):
    """Injected: the worker process died here (a BaseException, so no handler code or retry
    loop catches it, as nothing catches a kill -9)."""


@dataclass
class Process:
    """One simulated worker process: its activations, supervisor and lease token."""

    applier: Applier
    activations: ActivationTable
    supervisor: Supervisor
    token: int


@dataclass
class Stats:
    """What the batches applied so far did (summed BatchOutcome counters)."""

    batches: int = 0
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    crashed: int = 0
    restarts: int = 0
    malformed: int = 0
    timer_fires: int = 0
    spawned: int = 0
    passivated: int = 0
    process_deaths: int = 0
    takeovers: int = 0

    def add(self, outcome: BatchOutcome) -> None:
        self.batches += 1
        self.applied += outcome.applied
        self.duplicates += outcome.duplicates
        self.rejected += outcome.rejected
        self.crashed += outcome.crashed
        self.restarts += outcome.restarts
        self.malformed += outcome.malformed
        self.timer_fires += outcome.timer_fires
        self.spawned += len(outcome.spawned)


@dataclass
class _Pending:
    """A planned fault for the next commit."""

    when: str  # "before" | "after"


class Harness:
    """Runs entities through the worker's apply step in this process, on a fake clock.

    ``send`` queues a message on its key's partition (validated exactly as Client.send does);
    ``run`` applies everything queued, a batch per partition in one group commit as a busy
    worker does; ``call`` is send + run + the decoded reply (Rejected, HandlerCrashedError ...
    as Client.call raises them). ``advance`` moves the clock, fires due timers and passivates
    idle keys. Faults: ``duplicate``, ``crash_next_commit(after=...)``, ``takeover``.
    """

    def __init__(
        self,
        *entities: type[Entity],
        modules: Sequence[str] = (),
        settings: Settings | None = None,
        start: float = DEFAULT_START,
    ) -> None:
        if entities and modules:
            raise TypeError("give Harness entity classes or entity modules, not both")
        self.registry = (
            EntityRegistry.from_modules(modules) if modules else EntityRegistry(entities)
        )
        self.settings = settings or Settings(partitions=DEFAULT_PARTITIONS, entity_modules=())
        self.clock = FakeClock(start)
        self.repo = MemoryRepo()
        self.queues: dict[int, deque[dict[str, Any]]] = {}
        self.sent: dict[str, dict[str, Any]] = {}  # message id -> wire envelope
        self.replies: dict[str, str] = {}  # message id -> encoded reply, as pushed to Redis
        self.outcomes: list[BatchOutcome] = []
        self.passivated: list[KeyId] = []  # in order, by idle timeout or the activation cap
        self.stats = Stats()
        self._tokens = 0
        self._fault: _Pending | None = None
        self.process = self._spawn()

    # --- processes -------------------------------------------------------------------------

    def _spawn(self) -> Process:
        self._tokens += 1
        for p in range(self.settings.partitions):  # the new owner's grant, as prepare() does
            self.repo.record_fence(p, self._tokens)
        activations = ActivationTable(
            self.settings.max_activations, self.settings.idle_timeout_s, clock=self.clock.monotonic
        )
        supervisor = Supervisor(clock=self.clock.monotonic, rng=random.Random(self._tokens))
        applier = Applier(
            self.settings,
            self.registry,
            cast(Repo, self.repo),  # MemoryRepo has the methods the apply step calls
            activations,
            supervisor=supervisor,
            sleep=self.clock.sleep,
        )
        return Process(applier, activations, supervisor, self._tokens)

    def takeover(self) -> Process:
        """The process dies (kill -9: no on_passivate) and a new one takes every partition with
        newer fencing tokens; what was queued or in flight is delivered to it, in order.
        Returns the dead process: its late writes are refused (see ``apply_as``)."""
        old = self.process
        self.process = self._spawn()
        self.stats.takeovers += 1
        return old

    def crash_next_commit(self, *, after: bool = False) -> None:
        """Kill the process at its next commit: before it (nothing is written) or after it
        (written, but never acked nor replied). Either way the next owner gets the batch
        again; ``run`` carries on with a takeover."""
        self._fault = _Pending("after" if after else "before")

    # --- producing -------------------------------------------------------------------------

    def send(
        self,
        entity: str,
        key: str,
        op: str,
        payload: JSON = None,
        *,
        idempotency_key: str | None = None,
        reply: bool = False,
    ) -> str:
        """Queue a message (validated like Client.send); nothing is applied until run()."""
        env = producer_envelope(
            self.registry,
            self.settings,
            entity,
            key,
            op,
            payload,
            reply=reply,
            idempotency_key=idempotency_key,
        )
        env = replace(env, sent_at=self.clock.now)  # latencies on the fake clock
        wire = json_copy(env.to_wire())
        self.sent.setdefault(env.id, wire)
        self.queues.setdefault(env.partition, deque()).append(wire)
        return env.id

    def send_raw(self, partition: int, document: object) -> None:
        """Queue any wire document, as another producer (or a bug) could publish it."""
        self.queues.setdefault(partition, deque()).append(cast(dict[str, Any], document))

    def duplicate(self, message_id: str) -> None:
        """Deliver a message sent earlier once more (at-least-once delivery)."""
        wire = self.sent[message_id]
        self.queues.setdefault(int(wire["partition"]), deque()).append(copy.deepcopy(wire))

    def call(
        self,
        entity: str,
        key: str,
        op: str,
        payload: JSON = None,
        *,
        idempotency_key: str | None = None,
    ) -> JSON:
        """send + run + the reply; raises what Client.call raises (CallTimeoutError when no
        reply was sent, e.g. a duplicate of an applied message)."""
        msg_id = self.send(entity, key, op, payload, idempotency_key=idempotency_key, reply=True)
        self.run()
        encoded = self.replies.pop(msg_id, None)
        if encoded is None:
            raise CallTimeoutError(f"no reply from {entity}/{key} {op} (message {msg_id})")
        return replies.decode(encoded, entity=entity, key=key, op=op, message_id=msg_id)

    # --- applying --------------------------------------------------------------------------

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def run(self) -> Stats:
        """Apply everything queued: each round takes up to a batch of every partition and
        commits them together; a killed process is replaced and its batch redelivered."""
        while self.pending():
            taken = {
                p: [q[i] for i in range(min(len(q), self.settings.batch_max))]
                for p, q in sorted(self.queues.items())
                if q
            }
            try:
                outcome = self._apply(self.process, taken)
            except ProcessDied:
                self.stats.process_deaths += 1
                self.takeover()  # unacked: the batch stays at its queues' heads, in order
                continue
            for p, raws in taken.items():  # acked after the commit
                for _ in raws:
                    self.queues[p].popleft()
            self._after_commit(outcome)
        return self.stats

    def apply_as(self, process: Process, entity: str, key: str, op: str, payload: JSON) -> None:
        """Have a (dead, paused) process apply one message now: a stale owner's write, which
        the fencing token refuses with StaleWriteError once a newer owner exists."""
        env = producer_envelope(self.registry, self.settings, entity, key, op, payload)
        self._after_commit(self._apply(process, {env.partition: [json_copy(env.to_wire())]}))

    def _apply(self, process: Process, taken: dict[int, list[dict[str, Any]]]) -> BatchOutcome:
        fault, self._fault = self._fault, None
        if fault is not None:

            def die() -> None:
                raise ProcessDied(f"injected: process died {fault.when} its commit")

            if fault.when == "before":
                self.repo.before_commit = die
            else:
                self.repo.after_commit = die
        try:
            with _applier_clock(self.clock):
                return process.applier.apply_group(
                    [(p, process.token, raws) for p, raws in taken.items()],
                    on_early_commit=self._after_commit,  # as the worker: see apply_group
                )
        finally:
            self.repo.before_commit = self.repo.after_commit = None

    def _after_commit(self, outcome: BatchOutcome) -> None:
        self.outcomes.append(outcome)
        self.stats.add(outcome)
        for message_id, encoded in outcome.replies:
            self.replies.setdefault(message_id, encoded)  # a duplicate's reply queues behind
        for act in outcome.evicted:  # the activation cap: least recently used out
            self._passivate(act)

    # --- time ------------------------------------------------------------------------------

    def advance(self, seconds: float, *, down: bool = False) -> int:
        """Move the clock; returns the number of timer fires applied.

        A live worker (the default) fires each timer at its due time, in due order, so a
        periodic timer fires once per period. ``down=True`` models a partition that was down
        (or backed up) for the whole span: the clock jumps, then what is due fires once, and
        periodic timers follow their catch-up policy (coalesce, skip or each)."""
        target = self.clock.now + seconds
        before = self.stats.timer_fires
        if not down:
            for _ in range(_MAX_TIMER_ROUNDS):
                due = self.repo.next_due_ms()
                if due is None or due / 1000 > target:
                    break
                self.clock.now = max(self.clock.now, due / 1000 + _TICK_S)
                self.passivate_idle()
                self._fire_due()
            else:
                raise RuntimeError(_RUNAWAY)
        self.clock.now = max(self.clock.now, target)
        self.passivate_idle()
        for _ in range(_MAX_TIMER_ROUNDS):
            if not self._fire_due():
                break
        else:
            raise RuntimeError(_RUNAWAY)
        return self.stats.timer_fires - before

    def _fire_due(self) -> bool:
        """Publish every due timer's fire (as the owner's poller does) and apply them."""
        rows = self.repo.due_timers(range(self.settings.partitions), self._now_ms(), 1_000_000)
        for row in rows:
            wire = json_copy(fire_envelope(row, self.clock.now).to_wire())
            self.queues.setdefault(row.partition, deque()).append(wire)
        self.run()
        return bool(rows)

    def _now_ms(self) -> int:
        return int(self.clock.now * 1000)

    # --- passivation -----------------------------------------------------------------------

    def passivate_idle(self) -> list[KeyId]:
        """Passivate keys idle past the idle timeout (always-on keys stay), as the worker's
        housekeeping does; their on_passivate runs."""
        idle = self.process.activations.idle(self.clock.monotonic())
        gone: list[KeyId] = []
        for act in idle:
            if act.entity_type.instance.always_on:
                self.process.activations.put(act)
                continue
            self._passivate(act)
            gone.append(act.id)
        return gone

    def passivate(self, entity: str, key: str) -> bool:
        """Passivate one key now (as the idle timeout would); False if it is not active."""
        act = self.process.activations.drop((entity, key))
        if act is None:
            return False
        self._passivate(act)
        return True

    def is_active(self, entity: str, key: str) -> bool:
        return (entity, key) in self.process.activations

    def _passivate(self, act: Activation) -> None:
        act.entity_type.instance.on_passivate(act.state)
        self.passivated.append(act.id)
        self.stats.passivated += 1

    # --- what is committed -----------------------------------------------------------------

    def state(self, entity: str, key: str) -> JSON:
        """The key's committed state (None if it never committed), as Client.read gives it."""
        row = self.repo.load_one(entity, key)
        return None if row is None else row.state

    def version(self, entity: str, key: str) -> int:
        row = self.repo.rows.get((entity, key))
        return 0 if row is None else row.version

    def timers(self, entity: str, key: str) -> dict[str, TimerRow]:
        """The key's pending timers by name."""
        return dict(self.repo.timers.get((entity, key), {}))

    @property
    def dead_letters(self) -> list[DeadLetter]:
        return list(self.repo.dead)


try:
    import pytest
except ImportError:  # the harness works without pytest; only the fixture needs it
    pass
else:

    @pytest.fixture
    def keyq_harness() -> Iterator[Callable[..., Harness]]:
        """Factory fixture: ``keyq_harness(Wallet, ...)`` -> a fresh Harness per call."""

        def make(*entities: type[Entity], **options: Any) -> Harness:
            return Harness(*entities, **options)

        yield make


__all__ = [
    "DEFAULT_START",
    "FakeClock",
    "Harness",
    "MemoryRepo",
    "Process",
    "ProcessDied",
    "Stats",
]
