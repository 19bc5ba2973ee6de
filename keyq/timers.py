"""Timers: a key's messages to itself after a delay, stored in the Repo beside its state.

A handler schedules a timer through ``keyq.context.current().schedule(...)``; the row is
committed with the state that asked for it. The worker that owns the key's partition polls its
partitions' due timers in bounded batches (``TimerPoller``, from its housekeeping tick) and
publishes each as an ordinary envelope on the key's partition, with a message id made of the
timer id and the due time, so a re-publish is skipped by the per-key dedupe. Applying the fire
checks that the row is still the one that was published, runs the handler, and deletes or
reschedules the row in the batch's commit (``decide`` applies the catch-up policy).

One clock: whether a timer is due, and when a handler's schedule() is due, is decided by the
database's clock (``SharedClock``), never by a worker's own wall clock, so a host whose clock is
off fires nothing early or late. The poller and the applier read it as this host's clock plus the
offset last read (read again every CLOCK_MAX_AGE_S).

A quiet poller asks the database nothing. Only a partition's owner writes its timers (the
commits of its batches, fenced), so what one query said stays true until the owner's own
commits change it: each query also says when the next timer of the partitions is due
(``Repo.poll_timers``); the worker hands every committed timer change to ``note``, and a new
partition set, a fire in flight or TIMER_REQUERY_S without a query ask again. An idle worker
polled twice per housekeeping tick (the clock, then the due timers: 1-4 ms of its event loop
every 150 ms, the longer under load); now it asks once per TIMER_REQUERY_S.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from keyq.envelope import Envelope, TimerRef
from keyq.errors import RepoError
from keyq.records import TimerChange, TimerDelete, TimerRow
from keyq.repo import Repo

log = logging.getLogger(__name__)

FIRES_PER_TICK = 200  # at most this many fires published per housekeeping tick (no bursts)
MAX_IN_FLIGHT = 2000  # fires published but not yet applied; past this, wait (backpressure)
REPUBLISH_AFTER_S = 30.0  # a fire still due this long after its publish is published again
CLOCK_MAX_AGE_S = 10.0  # a shared-clock offset older than this is read again before use
TIMER_REQUERY_S = 5.0  # a quiet poller still asks the database this often (a safety net)
_NEVER_MS = 2**62  # "no timer to wait for" as a due time


class SharedClock:
    """The one clock that timers are armed and fired by: the database's (``Repo.clock_ms``).

    ``sync`` reads the database's clock and keeps its offset from this host's clock; ``now``
    is this host's clock plus that offset (within about half a query's round trip), read
    again first when it was never read or is older than ``max_age_s``. Without a reader it is
    the local clock (the in-process harness, whose fake clock is the only clock).
    """

    def __init__(
        self,
        read_ms: Callable[[], int] | None = None,
        local: Callable[[], float] = time.time,
        max_age_s: float = CLOCK_MAX_AGE_S,
    ) -> None:
        self._read_ms = read_ms
        self._local = local
        self.max_age_s = max_age_s
        self.offset_s = 0.0  # shared clock minus this host's clock, as last read
        self._read_at: float | None = None  # local time of the last reading

    def sync(self) -> int:
        """Read the shared clock (epoch ms) and remember its offset from the local clock."""
        if self._read_ms is None:
            return int(self._local() * 1000)
        before = self._local()
        shared_ms = self._read_ms()
        after = self._local()
        self.offset_s = shared_ms / 1000.0 - (before + after) / 2
        self._read_at = after
        return shared_ms

    def now(self) -> float:
        """Epoch seconds on the shared clock."""
        local = self._local()
        stale = self._read_at is None or abs(local - self._read_at) > self.max_age_s
        if self._read_ms is not None and stale:
            try:
                return self.sync() / 1000.0
            except RepoError as e:  # the batch's own queries wait the outage out
                log.warning(
                    "keyq could not read the database clock, using offset %.3fs: %s",
                    self.offset_s,
                    e,
                )
        return local + self.offset_s


def fire_message_id(timer_id: str, due_ms: int) -> str:
    """The deterministic id of a timer's fire: the same fire always has the same id."""
    return f"timer-{timer_id}-{due_ms}"


def fire_envelope(row: TimerRow, now: float) -> Envelope:
    return Envelope(
        id=fire_message_id(row.timer_id, row.due_ms),
        entity=row.entity,
        key=row.key,
        op=row.op,
        payload=row.payload,
        partition=row.partition,
        reply=False,
        sent_at=now,
        timer=TimerRef(row.name, row.timer_id, row.due_ms),
    )


@dataclass(frozen=True, slots=True)
class FireDecision:
    """What applying a due timer does: run the handler or not, and when it fires next."""

    run: bool
    missed: int  # whole periods missed before this fire
    next_due_ms: int | None  # None: the timer is done (one-shot), delete its row


def decide(row: TimerRow, now_ms: int) -> FireDecision:
    """Apply the catch-up policy of a timer that is due (pure; see context.schedule)."""
    if row.every_ms is None:
        return FireDecision(True, 0, None)
    every = row.every_ms
    missed = max(0, now_ms - row.due_ms) // every  # periods that passed after this one was due
    if row.catch_up == "each":
        return FireDecision(True, missed, row.due_ms + every)
    next_due = row.due_ms + (missed + 1) * every  # the first period still in the future
    if row.catch_up == "skip" and missed > 0:
        return FireDecision(False, missed, next_due)
    return FireDecision(True, missed, next_due)  # coalesce, or skip when on time


class KeyTimers:
    """One key's timers during a batch: the Repo's rows overlaid with this batch's changes."""

    def __init__(self, entity: str, key: str, loaded: dict[str, TimerRow] | None) -> None:
        self.entity = entity
        self.key = key
        self._loaded = loaded or {}
        self._changes: dict[str, TimerChange] = {}

    def get(self, name: str) -> TimerRow | None:
        change = self._changes.get(name)
        if change is not None:
            return change if isinstance(change, TimerRow) else None
        return self._loaded.get(name)

    def matches(self, ref: TimerRef) -> TimerRow | None:
        """The row a fire was published for, if it is still pending unchanged."""
        row = self.get(ref.name)
        if row is None or row.timer_id != ref.timer_id or row.due_ms != ref.due_ms:
            return None
        return row

    def consume(self, row: TimerRow, decision: FireDecision) -> None:
        """The fire happened (or was skipped): reschedule a periodic timer, else delete it."""
        if decision.next_due_ms is None:
            self._changes[row.name] = TimerDelete(row.entity, row.key, row.name)
        else:
            self._changes[row.name] = TimerRow(
                entity=row.entity,
                key=row.key,
                name=row.name,
                timer_id=row.timer_id,
                partition=row.partition,
                due_ms=decision.next_due_ms,
                op=row.op,
                payload=row.payload,
                every_ms=row.every_ms,
                catch_up=row.catch_up,
            )

    def apply(self, changes: Iterable[TimerChange]) -> None:
        """What a handler asked for (schedule or cancel), in order; the last one per name wins."""
        for change in changes:
            self._changes[change.name] = change

    def changes(self) -> list[TimerChange]:
        return list(self._changes.values())


class TimerPoller:
    """Publishes the due timers of the partitions a worker holds, a bounded batch per tick."""

    def __init__(
        self,
        repo: Repo,
        publish: Callable[[Sequence[Envelope]], None],
        *,
        fires_per_tick: int = FIRES_PER_TICK,
        max_in_flight: int = MAX_IN_FLIGHT,
        republish_after_s: float = REPUBLISH_AFTER_S,
        clock: Callable[[], float] = time.time,
        requery_s: float = TIMER_REQUERY_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` is this host's clock: it times republishes and stamps ``sent_at``; the
        due-ness of timers is the database's clock (``self.clock``, shared with the applier)."""
        self.repo = repo
        self.publish = publish
        self.fires_per_tick = fires_per_tick
        self.max_in_flight = max_in_flight
        self.republish_after_s = republish_after_s
        self.requery_s = requery_s
        self._clock = clock
        self._monotonic = monotonic
        self.clock = SharedClock(repo.clock_ms, local=clock)
        # fire id -> (partition, published at, (due_ms, timer_id): its place in due order)
        self._published: dict[str, tuple[int, float, tuple[int, str]]] = {}
        # what the last query said: for these partitions no timer is due before quiet_until_ms
        self._quiet_parts: frozenset[int] = frozenset()
        self._quiet_until_ms = 0
        self._queried_at = float("-inf")  # monotonic time of the last query
        self.queries = 0  # due-timer queries made (the quiet skip is tested by it)

    def note(self, changes: Iterable[TimerChange]) -> None:
        """Timer changes this worker committed (a handler's schedule, a fire's reschedule): a
        timer due before the time the poller meant to ask again is asked for in time."""
        for change in changes:
            if isinstance(change, TimerRow):
                self._quiet_until_ms = min(self._quiet_until_ms, change.due_ms)

    def _quiet(self, parts: frozenset[int], now_ms: int) -> bool:
        """Nothing can be due: the last query covered these partitions up to past now, no fire
        is in flight (its apply must be seen), and the safety interval has not run out."""
        return (
            not self._published
            and parts == self._quiet_parts
            and now_ms < self._quiet_until_ms
            and self._monotonic() - self._queried_at < self.requery_s
        )

    def in_flight(self) -> int:
        return len(self._published)

    def forget(self, partition: int) -> None:
        """The partition moved away: its new owner publishes what is still due."""
        self._published = {k: v for k, v in self._published.items() if v[0] != partition}

    def tick(self, partitions: Iterable[int]) -> int:
        """Publish up to fires_per_tick due fires (one broker message per partition).

        Fires already published are forgotten as soon as they are no longer due (applied),
        BEFORE the room for new ones is computed: a full in-flight set must drain, never stall
        (it once returned early here, with 2,000 fires in flight, and timers stopped for good).
        Due order is (due_ms, timer_id), a total order: with due_ms alone, fires of timers due
        at the same instant as the query's last row could not be told applied, and a backlog
        of more than max_in_flight timers due at once stopped for good.
        """
        parts = frozenset(partitions)
        self._published = {k: v for k, v in self._published.items() if v[0] in parts}
        if not parts:
            return 0
        now_ms = int(self.clock.now() * 1000)  # due by the database's clock, not this host's
        if self._quiet(parts, now_ms):
            return 0
        now = self._clock()
        limit = self.max_in_flight + self.fires_per_tick
        rows, next_due_ms = self.repo.poll_timers(parts, now_ms, limit)
        self.queries += 1
        self._queried_at = self._monotonic()
        cut = len(rows) >= limit  # more were due than fit: ask again at the next tick
        self._quiet_parts = parts
        if cut:
            self._quiet_until_ms = now_ms
        else:
            self._quiet_until_ms = _NEVER_MS if next_due_ms is None else next_due_ms
        due_ids = {fire_message_id(r.timer_id, r.due_ms) for r in rows}
        # rows come in due order: a published fire before the last row that is not among them
        # has been applied (all of them, when the query was not cut by its limit)
        horizon = (rows[-1].due_ms, rows[-1].timer_id) if cut else None
        self._published = {
            k: v
            for k, v in self._published.items()
            if k in due_ids or (horizon is not None and v[2] > horizon)
        }
        room = min(self.fires_per_tick, self.max_in_flight - len(self._published))
        if room <= 0:
            return 0
        by_partition: dict[int, list[Envelope]] = {}
        sent = 0
        for row in rows:
            if sent >= room:
                break
            fire_id = fire_message_id(row.timer_id, row.due_ms)
            previous = self._published.get(fire_id)
            if previous is not None and now - previous[1] < self.republish_after_s:
                continue
            by_partition.setdefault(row.partition, []).append(fire_envelope(row, now))
            sent += 1
        for partition, envelopes in by_partition.items():
            self.publish(envelopes)  # a broker error propagates: nothing is marked published
            for env in envelopes:
                order = (env.timer.due_ms, env.timer.timer_id) if env.timer else (0, "")
                self._published[env.id] = (partition, now, order)
        if sent:
            log.info("keyq timers published fires=%d in_flight=%d", sent, len(self._published))
        return sent
