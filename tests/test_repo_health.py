"""keyq.repo_health: when a node counts its database as lost, and how it finds it again."""

from __future__ import annotations

from keyq.errors import RepoError
from keyq.repo_health import PROBE_EVERY_S, RepoHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_unhealthy_only_after_the_handoff_time_of_failures_in_a_row() -> None:
    clock = Clock()
    health = RepoHealth(10.0, lambda: None, clock)
    health.failed()
    clock.now += 9.9
    health.failed()  # still the same outage: its start is kept
    assert health.healthy()
    clock.now += 0.2
    assert not health.healthy()
    health.succeeded()
    assert health.healthy()
    health.failed()  # a new outage starts the count again
    clock.now += 5.0
    assert health.healthy()


def test_the_probe_ends_an_outage_and_is_rate_limited() -> None:
    clock = Clock()
    answers: list[bool] = [False, False, True]
    asked: list[float] = []

    def probe() -> None:
        asked.append(clock.now)
        if not answers.pop(0):
            raise RepoError("database down")

    health = RepoHealth(1.0, probe, clock)
    assert health.probe_if_down() and asked == []  # healthy: no probe at all
    health.failed()
    clock.now += 2.0
    assert not health.probe_if_down()  # probe 1: down
    assert not health.probe_if_down()  # too soon: no probe
    clock.now += PROBE_EVERY_S
    assert not health.probe_if_down()  # probe 2: down
    clock.now += PROBE_EVERY_S
    assert health.probe_if_down()  # probe 3: it answers
    assert health.healthy() and len(asked) == 3
