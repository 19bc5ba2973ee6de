"""A timer backlog on real workers: 12,000 timers due at the same instant all fire, each once,
within a bound, at a limited rate that never stops (issue 11 item 5).

The workers load this module's entity (KEYQ_ENTITY_MODULES=tests.test_timer_backlog): `arm`
schedules a fire at an absolute time on the database's clock, so every key's timer comes due
at once however long arming took.
"""

from __future__ import annotations

import re
import time
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa

from keyq.client import Client
from keyq.context import current
from keyq.entity import Entity, handler
from keyq.repo import Repo, make_engine, timer_table
from keyq.settings import Settings
from keyq.timers import FIRES_PER_TICK
from tests.conftest import WorkerFactory, poll
from tests.ownership_helpers import database_url  # noqa: F401  (PostgreSQL only)

pytestmark = pytest.mark.integration

KEYS = 12_000
ENTITY = "backlog-timer"
MODULE = "tests.test_timer_backlog"
# Each worker publishes at most FIRES_PER_TICK (200) fires per housekeeping tick (every
# lease_ttl/4 = 0.2 s): 2 workers drain 12,000 in about 6 s when the apply side keeps up. The
# bound allows 4x that for two noisy cores; a poller that stalls (the old in-flight bug stopped
# for good at 2,000) never gets there.
FIRE_BOUND_S = 30.0
ARM_S = 16  # arming 12,000 keys takes about 8 s here (two workers, about 1,500 applies/s)
STALL_S = 5.0  # no progress at all for this long while fires are outstanding is a stall


class BacklogTimer(Entity):
    """`arm {"at": epoch s}` sets one timer due then; its fire counts itself in the state."""

    name = ENTITY
    initial_state: ClassVar[dict[str, Any]] = {"fires": 0, "due": None, "at": None}

    @handler
    def arm(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], None]:
        current().schedule(max(0.0, payload["at"] - current().now), "fire", name="t")
        return state, None

    @handler
    def fire(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], None]:
        timer = current().timer
        due = timer.due if timer is not None else None
        return {"fires": state["fires"] + 1, "due": due, "at": current().now}, None


def _fire_counts(engine: sa.Engine) -> dict[int, int]:
    """How many keys have fired n times, by n (0 for armed keys that did not fire yet)."""
    query = sa.text(
        "SELECT (state->>'fires')::int, count(*) FROM keyq_state WHERE entity = :e GROUP BY 1"
    )
    with engine.connect() as conn:
        return {int(n): int(c) for n, c in conn.execute(query, {"e": ENTITY})}


def _armed(engine: sa.Engine) -> int:
    query = sa.select(sa.func.count()).where(timer_table.c.entity == ENTITY)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def test_twelve_thousand_timers_due_at_once_all_fire_exactly_once_within_a_bound(
    start_worker: WorkerFactory, settings: Settings, repo: Repo
) -> None:
    s = settings.with_(entity_modules=(MODULE,))
    workers = [start_worker("0-3", settings_override=s), start_worker("4-7", settings_override=s)]
    engine = make_engine(s.database_url)
    client = Client(s)
    try:
        # every timer is due at the same instant of the database's clock, after arming is done
        at_ms = repo.clock_ms() + ARM_S * 1000
        keys = [f"k{i}" for i in range(KEYS)]
        client.send_many(ENTITY, [(k, "arm", {"at": at_ms / 1000}) for k in keys])
        poll(lambda: _armed(engine) == KEYS, 30.0, 0.2, what=f"{KEYS} timers armed")
        armed_by = repo.clock_ms()
        assert armed_by < at_ms, f"arming took too long to build a backlog ({armed_by - at_ms})"
        assert _fire_counts(engine) == {0: KEYS}  # nothing fired early

        # drain: sample progress; it must never stop while fires are outstanding
        samples: list[tuple[float, int]] = []
        last_progress = time.monotonic()
        while True:
            counts = _fire_counts(engine)
            fired = KEYS - counts.get(0, 0)
            now = time.monotonic()
            if samples and fired > samples[-1][1]:
                last_progress = now
            samples.append((now, fired))
            if fired == KEYS:
                break
            behind_s = repo.clock_ms() / 1000 - at_ms / 1000
            assert behind_s < FIRE_BOUND_S, f"only {fired} of {KEYS} fired {behind_s:.1f}s late"
            if behind_s > STALL_S:
                stalled = now - last_progress
                assert stalled < STALL_S, f"fires stopped at {fired} of {KEYS} for {stalled:.1f}s"
            time.sleep(0.25)
        done_ms = repo.clock_ms()

        # exactly once: every key fired once, none twice, and no timer is left
        assert _fire_counts(engine) == {1: KEYS}
        assert _armed(engine) == 0
        states = repo.load([(ENTITY, k) for k in keys])
        late = sorted(st.state["at"] - at_ms / 1000 for st in states.values())
        assert len(late) == KEYS and all(st.state["due"] == at_ms / 1000 for st in states.values())
        assert late[0] >= 0  # none fired before it was due, by the one clock
        assert late[-1] < FIRE_BOUND_S
        # limited: no tick of either worker published more than its limit
        ticks = [re.findall(r"keyq timers published fires=(\d+)", w.log()) for w in workers]
        published = [int(n) for found in ticks for n in found]
        assert sum(published) >= KEYS and max(published) <= FIRES_PER_TICK
        drain_s = (done_ms - at_ms) / 1000
        print(
            f"\n{KEYS} timers due at once: all fired once in {drain_s:.1f}s "
            f"({KEYS / drain_s:.0f}/s), median lateness {late[KEYS // 2]:.1f}s, "
            f"{len(published)} publishing ticks, largest {max(published)}"
        )
    finally:
        client.close()
        engine.dispose()
