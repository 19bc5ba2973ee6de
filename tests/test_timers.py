"""Timers: a key's messages to itself, stored with its state, fired by its partition's owner."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest

from keyq.activations import ActivationTable
from keyq.applier import Applier
from keyq.client import Client
from keyq.context import current
from keyq.entity import Entity, EntityRegistry, handler
from keyq.envelope import Envelope, TimerRef
from keyq.errors import HandlerCrashedError, NoHandlerContextError, ValidationError
from keyq.repo import Repo, StateWrite, TimerDelete, TimerRow
from keyq.routing import partition_for
from keyq.settings import Settings
from keyq.testing import Harness
from keyq.timers import (
    TIMER_REQUERY_S,
    FireDecision,
    SharedClock,
    TimerPoller,
    decide,
    fire_message_id,
)
from tests.conftest import WorkerFactory, poll
from tests.test_supervisor import ENTITY_MODULES

pytestmark = pytest.mark.integration




def timers_of(repo: Repo, entity: str, key: str) -> dict[str, TimerRow]:
    return repo.load_timers([(entity, key)]).get((entity, key), {})


def state(client: Client, entity: str, key: str) -> dict[str, Any]:
    return client.read(entity, key) or {}


# --- with real workers -------------------------------------------------------------------


def test_device_goes_offline_when_its_heartbeats_stop(
    start_worker: WorkerFactory, client: Client, repo: Repo
) -> None:
    start_worker()
    assert client.call("device", "d1", "heartbeat", {"offline_after_s": 0.3}) == "online"
    [row] = timers_of(repo, "device", "d1").values()  # committed with the state
    assert row.op == "went_offline" and row.name == "liveness"
    poll(lambda: state(client, "device", "d1").get("status") == "offline", what="offline")
    assert timers_of(repo, "device", "d1") == {}  # the fire deleted it in its commit
    assert state(client, "device", "d1")["beats"] == 1


def test_scheduling_a_name_again_replaces_its_timer_and_cancel_deletes_it(
    start_worker: WorkerFactory, sup_client: Client, sup_settings: Settings, repo: Repo
) -> None:
    start_worker(settings_override=sup_settings)
    sup_client.call("ticker", "r1", "once", {"delay_s": 3600})
    first = timers_of(repo, "ticker", "r1")["t"]
    sup_client.call("ticker", "r1", "once", {"delay_s": 7200})
    second = timers_of(repo, "ticker", "r1")
    assert list(second) == ["t"] and second["t"].timer_id != first.timer_id
    assert second["t"].due_ms > first.due_ms
    sup_client.call("ticker", "r1", "stop")
    assert timers_of(repo, "ticker", "r1") == {}


def test_a_handler_that_crashes_leaves_no_timer_behind(
    start_worker: WorkerFactory, sup_client: Client, sup_settings: Settings, repo: Repo
) -> None:
    start_worker(settings_override=sup_settings)
    with pytest.raises(HandlerCrashedError):
        sup_client.call("ticker", "c1", "schedule_then_crash")
    assert timers_of(repo, "ticker", "c1") == {}


def test_periodic_timer_fires_repeatedly_until_cancelled(
    start_worker: WorkerFactory, sup_client: Client, sup_settings: Settings, repo: Repo
) -> None:
    start_worker(settings_override=sup_settings)
    sup_client.call("ticker", "p1", "every", {"every_s": 0.2})
    poll(lambda: state(sup_client, "ticker", "p1").get("ticks", 0) >= 3, what="3 ticks")
    fired = state(sup_client, "ticker", "p1")["fired"]
    assert len(set(fired)) == len(fired)  # each fire has its own (deterministic) id
    sup_client.call("ticker", "p1", "stop")
    assert timers_of(repo, "ticker", "p1") == {}


def test_timer_survives_a_worker_crash_and_fires_once(
    start_worker: WorkerFactory, sup_client: Client, sup_settings: Settings, repo: Repo
) -> None:
    worker = start_worker(settings_override=sup_settings)
    sup_client.call("ticker", "k1", "once", {"delay_s": 0.5})
    worker.kill()  # kill -9 before the timer is due
    assert "t" in timers_of(repo, "ticker", "k1")
    start_worker(settings_override=sup_settings)
    poll(lambda: state(sup_client, "ticker", "k1").get("ticks") == 1, what="the fire")
    assert timers_of(repo, "ticker", "k1") == {}
    # a later message sees exactly one tick: the fire was applied once
    sup_client.call("ticker", "k1", "stop")
    assert state(sup_client, "ticker", "k1")["ticks"] == 1


def test_timer_whose_handler_always_crashes_is_dead_lettered_once(
    start_worker: WorkerFactory, sup_client: Client, sup_settings: Settings, repo: Repo
) -> None:
    start_worker(settings_override=sup_settings)
    sup_client.call("ticker", "b1", "bomb", {"delay_s": 0.1})
    poll(lambda: repo.dead_letters(entity="ticker", key="b1"), what="the dead-lettered fire")
    [dead] = repo.dead_letters(entity="ticker", key="b1")
    assert dead.op == "explode" and dead.message_id.startswith("timer-")
    assert timers_of(repo, "ticker", "b1") == {}  # consumed: it does not fire again
    assert sup_client.call("ticker", "b1", "tick") == 0  # and the key goes on


# --- the apply step and the poller on a real Repo, without Celery ---------------------------


def _applier(settings: Settings) -> tuple[Applier, Repo]:
    repo = Repo(settings.database_url)
    registry = EntityRegistry.from_modules(ENTITY_MODULES)
    table = ActivationTable(100, 60.0)
    return Applier(settings, registry, repo, table, sleep=lambda s: None), repo


def _fire_of(row: TimerRow, partitions: int) -> dict[str, Any]:
    env = Envelope(
        id=fire_message_id(row.timer_id, row.due_ms),
        entity=row.entity,
        key=row.key,
        op=row.op,
        payload=row.payload,
        partition=partition_for(row.key, partitions),
        reply=False,
        sent_at=0.0,
        timer=TimerRef(row.name, row.timer_id, row.due_ms),
    )
    return env.to_wire()


def test_stale_and_duplicate_fires_have_no_effect(sup_settings: Settings) -> None:
    applier, repo = _applier(sup_settings)
    part = partition_for("s1", sup_settings.partitions)
    try:
        sched = {"id": "m1", "entity": "ticker", "key": "s1", "op": "once", "partition": part}
        applier.apply(part, 1, [{**sched, "payload": {"delay_s": 0}}])
        [row] = timers_of(repo, "ticker", "s1").values()
        stale = TimerRow(**{**_row_dict(row), "timer_id": "0" * 32})
        out = applier.apply(part, 1, [_fire_of(stale, sup_settings.partitions)])
        assert out.stale_timer_fires == 1 and out.timer_fires == 0
        fire = _fire_of(row, sup_settings.partitions)
        out = applier.apply(part, 1, [fire, fire])  # the same fire published twice
        assert out.timer_fires == 1 and out.duplicates == 1
        assert applier.apply(part, 1, [fire]).duplicates == 1  # and once more later
        stored = repo.load_one("ticker", "s1")
        assert stored is not None and stored.state["ticks"] == 1
        assert timers_of(repo, "ticker", "s1") == {}
    finally:
        repo.dispose()


def test_each_policy_fires_once_per_missed_period_coalesce_once(sup_settings: Settings) -> None:
    applier, repo = _applier(sup_settings)
    part = partition_for("late", sup_settings.partitions)
    try:
        now_ms = int(time.time() * 1000)
        due = now_ms - 3500  # 3 whole periods of 1 s missed, and half of the next
        rows = [
            TimerRow("ticker", "late", name, f"{i:032d}", part, due, "tick", None, 1000, p)
            for i, (name, p) in enumerate([("e", "each"), ("c", "coalesce"), ("s", "skip")])
        ]
        repo.commit(part, 1, [StateWrite("ticker", "late", _initial(), 1, [])], timers=rows)
        fires = [_fire_of(r, sup_settings.partitions) for r in rows]
        out = applier.apply(part, 1, fires)
        assert out.timer_fires == 2  # each and coalesce ran; skip dropped its missed periods
        after = timers_of(repo, "ticker", "late")
        assert after["e"].due_ms == now_ms - 2500  # each: the next missed period comes next
        assert after["c"].due_ms == after["s"].due_ms == now_ms + 500  # the next future slot
        stored = repo.load_one("ticker", "late")
        assert stored is not None and stored.state["missed"] == [3, 3]
    finally:
        repo.dispose()


def test_fire_of_a_timer_whose_op_is_gone_is_dead_lettered_and_consumed(
    sup_settings: Settings,
) -> None:
    applier, repo = _applier(sup_settings)
    part = partition_for("g1", sup_settings.partitions)
    try:
        gone = TimerRow("ticker", "g1", "old", "a" * 32, part, 1, "renamed_op")
        kept = TimerRow("ticker", "g1", "new", "b" * 32, part, 1, "tick")
        repo.commit(part, 1, [], timers=[gone, kept])
        stale_ref = TimerRow(**{**_row_dict(kept), "timer_id": "c" * 32, "op": "renamed_op"})
        fires = [
            _fire_of(gone, sup_settings.partitions),
            _fire_of(stale_ref, sup_settings.partitions),
        ]
        out = applier.apply(part, 1, fires)
        assert out.malformed == 2 and [d.reason for d in out.dead_letters] == ["unknown"] * 2
        assert list(timers_of(repo, "ticker", "g1")) == ["new"]  # only the exact timer went
    finally:
        repo.dispose()


def test_poller_publishes_a_bounded_batch_per_tick_and_republishes_same_ids(
    sup_settings: Settings,
) -> None:
    repo = Repo(sup_settings.database_url)
    try:
        rows = [
            TimerRow("ticker", f"k{i}", "t", f"{i:032d}", i % 8, 1000 + i, "tick")
            for i in range(250)
        ]
        repo.commit(0, 1, [], timers=rows)
        published: list[Sequence[Envelope]] = []
        clock = [10.0]
        poller = TimerPoller(
            repo,
            published.append,
            fires_per_tick=100,
            republish_after_s=5.0,
            clock=lambda: clock[0],
        )
        assert poller.tick(range(8)) == 100  # a restart with 250 due timers: no burst
        assert all(len({e.partition for e in batch}) == 1 for batch in published)
        assert poller.tick(range(8)) == 100 and poller.tick(range(8)) == 50
        ids = [e.id for batch in published for e in batch]
        assert len(set(ids)) == 250 and poller.tick(range(8)) == 0  # in flight: not again
        clock[0] += 6.0  # never applied (lost?): published again, with the same ids
        again = [e.id for _ in range(3) if poller.tick(range(8)) for e in published[-1]]
        assert set(ids) >= set(again) and poller.tick([99]) == 0  # only held partitions
    finally:
        repo.dispose()


def test_poller_drains_a_backlog_larger_than_its_in_flight_limit(sup_settings: Settings) -> None:
    """Timers never stop under a backlog: once the in-flight set is full and its fires are
    applied, the next ticks publish the rest (the poller used to return before pruning)."""
    repo = Repo(sup_settings.database_url)
    try:
        rows = [
            TimerRow("ticker", f"b{i}", "t", f"{i:032d}", i % 8, 1000 + i, "tick")
            for i in range(120)
        ]
        repo.commit(0, 1, [], timers=rows)
        published: list[Envelope] = []
        poller = TimerPoller(
            repo,
            published.extend,
            fires_per_tick=15,
            max_in_flight=30,
            republish_after_s=3600.0,
            clock=lambda: 10.0,
        )
        for _ in range(40):
            if poller.tick(range(8)) == 0 and len(published) == len(rows):
                break
            # the worker applies what was published: each fire consumes its timer row
            applied = [e for e in published if e.timer is not None]
            repo.commit(
                0,
                1,
                [],
                timers=[TimerDelete(e.entity, e.key, e.timer.name) for e in applied if e.timer],
            )
        assert sorted(e.key for e in published) == sorted(r.key for r in rows)  # once each
        assert poller.in_flight() == 0
    finally:
        repo.dispose()


def test_poller_drains_a_backlog_of_timers_that_are_all_due_at_the_same_instant(
    sup_settings: Settings,
) -> None:
    """Many timers armed for one instant: the in-flight set must still drain. (Pruning by due
    time alone kept every applied fire whose due time equalled the query's last row, so with
    more than max_in_flight timers due at once the poller stopped for good.)"""
    repo = Repo(sup_settings.database_url)
    try:
        rows = [
            TimerRow("ticker", f"s{i}", "t", f"{(i * 7919) % 120:032x}", i % 8, 5000, "tick")
            for i in range(120)
        ]
        repo.commit(0, 1, [], timers=rows)
        published: list[Envelope] = []
        poller = TimerPoller(
            repo, published.extend, fires_per_tick=15, max_in_flight=30, republish_after_s=3600.0
        )
        for _ in range(40):
            if poller.tick(range(8)) == 0 and len(published) == len(rows):
                break
            repo.commit(  # the worker applies what was published: each fire consumes its row
                0,
                1,
                [],
                timers=[TimerDelete(e.entity, e.key, e.timer.name) for e in published if e.timer],
            )
        assert sorted(e.key for e in published) == sorted(r.key for r in rows)  # once each
        assert poller.in_flight() == 0
    finally:
        repo.dispose()


class _Monotonic:
    """A monotonic clock a test moves by hand (the poller's safety interval is timed on it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_quiet_poller_asks_the_database_again_only_after_its_safety_interval(
    sup_settings: Settings,
) -> None:
    """Nothing due: the ticks after the first ask nothing, until TIMER_REQUERY_S has passed or
    the partition set changed (each query used to read the clock and then the due timers)."""
    repo = Repo(sup_settings.database_url)
    try:
        mono = _Monotonic()
        poller = TimerPoller(repo, lambda envs: None, requery_s=5.0, monotonic=mono)
        for _ in range(10):
            assert poller.tick(range(8)) == 0
        assert poller.queries == 1
        mono.now += 4.9
        assert poller.tick(range(8)) == 0 and poller.queries == 1
        mono.now += 0.2  # the safety interval ran out
        assert poller.tick(range(8)) == 0 and poller.queries == 2
        assert poller.tick(range(9)) == 0 and poller.queries == 3  # a partition was taken over
    finally:
        repo.dispose()


def test_a_timer_the_worker_committed_is_asked_for_at_once_when_noted(
    sup_settings: Settings,
) -> None:
    """A timer committed by the partition's owner while its poller is quiet is published at the
    next tick once noted (the worker notes every commit's timer changes); not noted, only the
    safety interval would find it."""
    repo = Repo(sup_settings.database_url)
    try:
        published: list[Envelope] = []
        poller = TimerPoller(repo, published.extend, monotonic=_Monotonic())
        assert poller.tick(range(8)) == 0 and poller.queries == 1
        now_ms = repo.clock_ms()
        row = TimerRow("ticker", "noted", "t", "c" * 32, 3, now_ms - 1, "tick")
        repo.commit(3, 1, [], timers=[row])
        assert poller.tick(range(8)) == 0 and poller.queries == 1  # quiet: it cannot know
        poller.note([TimerDelete("ticker", "other", "t")])  # a cancel makes nothing due sooner
        assert poller.tick(range(8)) == 0 and poller.queries == 1
        poller.note([row])
        assert poller.tick(range(8)) == 1 and [e.key for e in published] == ["noted"]
    finally:
        repo.dispose()


def test_a_quiet_poller_asks_again_when_the_next_timer_is_due(sup_settings: Settings) -> None:
    """Each query also says when the next timer is due: it is not published early, and the
    poller asks again once it is due, with nothing noted and the safety interval far off."""
    repo = Repo(sup_settings.database_url)
    try:
        db_now = repo.clock_ms()
        due = db_now + 500
        repo.commit(0, 1, [], timers=[TimerRow("ticker", "soon", "t", "d" * 32, 0, due, "tick")])
        local = [time.time()]
        published: list[Envelope] = []
        poller = TimerPoller(
            repo, published.extend, clock=lambda: local[0], monotonic=_Monotonic()
        )
        assert poller.tick([0]) == 0 and published == []  # not early
        assert poller.tick([0]) == 0 and poller.queries == 1
        local[0] += 1.0  # this host's clock (and so the shared one) moves on past the due time
        assert poller.tick([0]) == 1 and [e.key for e in published] == ["soon"]
        assert poller.queries == 2
    finally:
        repo.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # the poller: both
def test_a_quiet_worker_seldom_polls_timers_and_fires_a_new_timer_on_time(
    start_worker: WorkerFactory, client: Client
) -> None:
    """An idle worker asks the database for due timers about once per TIMER_REQUERY_S (it
    asked twice every housekeeping tick, 150 ms), and a timer a handler schedules right after
    such a query fires on time, not at the next one (the worker notes its commits' timers)."""
    from tests.test_supervisor import free_port, metric

    port = free_port()
    start_worker(env={"KEYQ_METRICS_PORT": str(port)})

    def queries() -> float:
        return metric(port, "keyq_repo_seconds_count", op="due_timers")

    poll(lambda: queries() >= 1, what="the worker's first due-timer query")
    assert client.call("device", "warm", "heartbeat", {"offline_after_s": 3600}) == "online"
    before = queries()
    time.sleep(2.0)
    assert queries() - before <= 1, "the quiet worker kept polling its timers"
    last = queries()
    poll(lambda: queries() > last, timeout=TIMER_REQUERY_S + 5, what="the safety query")
    started = time.monotonic()
    assert client.call("device", "d2", "heartbeat", {"offline_after_s": 0.2}) == "online"
    poll(
        lambda: state(client, "device", "d2").get("status") == "offline",
        timeout=TIMER_REQUERY_S / 2,
        what="the new timer to fire before the next safety query",
    )
    assert time.monotonic() - started < TIMER_REQUERY_S - 1.0


# --- one clock: the database's -------------------------------------------------------------


class _SkewedTime:
    """A stand-in for the time module whose wall clock is off by skew_s."""

    def __init__(self, skew_s: float) -> None:
        self.skew_s = skew_s

    def time(self) -> float:
        return time.time() + self.skew_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.parametrize("skew_s", [3600.0, -3600.0])
def test_a_poller_on_a_host_an_hour_off_fires_by_the_database_clock(
    sup_settings: Settings, skew_s: float
) -> None:
    repo = Repo(sup_settings.database_url)
    try:
        db_now = repo.clock_ms()
        assert abs(db_now - time.time() * 1000) < 60_000  # one machine: the clocks agree
        rows = [
            TimerRow("ticker", "due", "t", "a" * 32, 0, db_now - 1000, "tick"),
            TimerRow("ticker", "later", "t", "b" * 32, 0, db_now + 30_000, "tick"),
        ]
        repo.commit(0, 1, [], timers=rows)
        published: list[Envelope] = []
        poller = TimerPoller(repo, published.extend, clock=_SkewedTime(skew_s).time)
        assert poller.tick([0]) == 1
        assert [e.key for e in published] == ["due"]  # not early, not an hour late
        assert abs(poller.clock.offset_s + skew_s) < 5.0  # it measured the host's skew
    finally:
        repo.dispose()


def test_a_handler_on_a_host_an_hour_fast_arms_its_timer_on_the_database_clock(
    sup_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keyq.applier

    applier, repo = _applier(sup_settings)
    skewed = _SkewedTime(3600.0)
    monkeypatch.setattr(keyq.applier, "time", skewed)  # the applier's host clock is an hour fast
    applier.timer_clock = SharedClock(repo.clock_ms, local=skewed.time).now  # as the worker does
    part = partition_for("c1", sup_settings.partitions)
    try:
        before = repo.clock_ms()
        msg = {"id": "m1", "entity": "ticker", "key": "c1", "op": "once", "partition": part}
        applier.apply(part, 1, [{**msg, "payload": {"delay_s": 60}}])
        after = repo.clock_ms()
        [row] = timers_of(repo, "ticker", "c1").values()
        assert before + 60_000 - 1000 <= row.due_ms <= after + 60_000 + 1000
    finally:
        repo.dispose()


def test_shared_clock_without_a_reader_is_the_local_clock_and_rereads_when_stale() -> None:
    assert SharedClock(local=lambda: 5.0).now() == 5.0  # the harness: its fake clock only
    reads: list[int] = []
    local = [100.0]

    def read_ms() -> int:
        reads.append(1)
        return 160_000  # the shared clock is 60 s ahead of this host

    clock = SharedClock(read_ms, local=lambda: local[0], max_age_s=10.0)
    assert clock.now() == 160.0 and len(reads) == 1  # read on first use
    local[0] = 105.0
    assert clock.now() == 165.0 and len(reads) == 1  # this host's clock plus the offset
    local[0] = 120.0
    assert clock.now() == 160.0 and len(reads) == 2  # too old: read again


# --- jitter: periodic timers armed together do not fire in lockstep -------------------------


class Pulse(Entity):
    """`arm {"every", "jitter"}` starts a periodic `beat`; each beat records when it ran."""

    name = "t-pulse"
    initial_state: ClassVar[dict[str, Any]] = {"beats": []}

    @handler
    def arm(self, state: dict[str, Any], payload: dict[str, Any]) -> tuple[Any, None]:
        every = payload["every"]
        current().schedule(every, "beat", name="p", every_s=every, jitter=payload["jitter"])
        return state, None

    @handler
    def beat(self, state: dict[str, Any], payload: Any) -> tuple[Any, None]:
        return {"beats": [*state["beats"], current().now]}, None


def _pulses(n: int, every: float, jitter: float) -> tuple[Harness, float]:
    h = Harness(Pulse)
    start = h.clock.now
    for i in range(n):
        h.send("t-pulse", f"p{i}", "arm", {"every": every, "jitter": jitter})
    h.run()  # all armed at the same instant
    return h, start


def test_jitter_spreads_periodic_timers_armed_together_within_the_period() -> None:
    every, jitter, n = 60.0, 0.2, 1000
    h, start = _pulses(n, every, jitter)
    h.advance(every * (1 + jitter) + 1)
    firsts = [h.state("t-pulse", f"p{i}")["beats"] for i in range(n)]
    assert all(len(b) == 1 for b in firsts)  # each fired once in its first period
    offsets = [b[0] - start for b in firsts]
    assert all(every <= o <= every * (1 + jitter) + 0.01 for o in offsets)  # within the window
    assert len({round(o, 3) for o in offsets}) > 0.9 * n  # not in lockstep: spread over keys
    assert max(offsets) - min(offsets) > 0.9 * every * jitter  # across the whole window
    h.advance(every)
    for i in range(n):  # and each key then fires every period exactly: the delay is fixed
        first, second = h.state("t-pulse", f"p{i}")["beats"]
        assert abs(second - first - every) < 0.01
    h.send("t-pulse", "p7", "arm", {"every": every, "jitter": jitter})  # armed again later
    h.run()
    [row] = h.timers("t-pulse", "p7").values()
    assert abs((row.due_ms / 1000 - h.clock.now) - offsets[7]) < 0.01  # the same delay again


def test_without_jitter_periodic_timers_armed_together_fire_in_lockstep() -> None:
    h, start = _pulses(200, 60.0, 0.0)
    h.advance(61)
    beats = [h.state("t-pulse", f"p{i}")["beats"] for i in range(200)]
    assert {round(b - start, 3) for bs in beats for b in bs} == {60.0}  # all at once


# --- pure functions -----------------------------------------------------------------------


def _initial() -> dict[str, Any]:
    return {"ticks": 0, "missed": [], "fired": []}


def _row_dict(row: TimerRow) -> dict[str, Any]:
    return {f: getattr(row, f) for f in row.__dataclass_fields__}


def _row(every_ms: int | None, catch_up: str = "coalesce") -> TimerRow:
    return TimerRow("e", "k", "t", "id", 0, 10_000, "op", None, every_ms, catch_up)


def test_catch_up_policies() -> None:
    assert decide(_row(None), 99_000) == FireDecision(True, 0, None)  # one-shot: fire, delete
    on_time = 10_050
    for policy in ("coalesce", "skip", "each"):
        assert decide(_row(1000, policy), on_time) == FireDecision(True, 0, 11_000)
    late = 13_500  # 3 whole periods missed
    assert decide(_row(1000, "coalesce"), late) == FireDecision(True, 3, 14_000)
    assert decide(_row(1000, "skip"), late) == FireDecision(False, 3, 14_000)
    assert decide(_row(1000, "each"), late) == FireDecision(True, 3, 11_000)


def test_context_is_only_available_inside_handlers_and_validates_schedules() -> None:
    with pytest.raises(NoHandlerContextError):
        current()
    from keyq.context import HandlerContext, running

    registry = EntityRegistry.from_modules(ENTITY_MODULES)
    ctx = HandlerContext(registry.get("ticker"), "k", "m", 0, 100.0, 1024)
    with running(ctx):
        assert current() is ctx
        with pytest.raises(ValidationError):
            current().schedule(-1, "tick")
        with pytest.raises(ValidationError):
            current().schedule(1, "nope")
        with pytest.raises(ValidationError):
            current().schedule(1, "tick", catch_up="sometimes")
        with pytest.raises(ValidationError):
            current().schedule(1, "tick", payload="x" * 2000)
        for bad in (-0.1, 1.5, float("nan"), "0.1"):
            with pytest.raises(ValidationError, match="jitter"):
                current().schedule(1, "tick", every_s=2, jitter=bad)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="needs every_s"):
            current().schedule(1, "tick", jitter=0.1)  # one-shot timers are not spread
        current().schedule(1.5, "tick", every_s=2)
    [row] = ctx.changes
    assert isinstance(row, TimerRow) and row.due_ms == 101_500 and row.every_ms == 2000
