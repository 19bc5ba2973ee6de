"""keyq.learned: the worker's guess whether one more look finds work (pure)."""

from __future__ import annotations

from keyq.learned import PROBE, LearnedGuess


def test_it_looks_while_looks_find_work_and_stops_soon_after_they_do_not() -> None:
    guess = LearnedGuess()
    for _ in range(3):
        guess.learn(True)
    answers = []
    for _ in range(4):
        guess.learn(False)
        answers.append(guess.ask())
    assert answers == [True, True, True, False]  # 0.8, 0.64, 0.51, then 0.41: waits now


def test_while_waiting_it_still_probes_once_in_probe_asks_and_comes_back() -> None:
    guess = LearnedGuess()
    for _ in range(10):
        guess.ask()
        guess.learn(False)
    looks = [guess.ask() for _ in range(PROBE * 4)]
    assert sum(looks) == 4  # one in PROBE
    for _ in range(4):  # the probes start finding work: a stream that has become steady
        guess.learn(True)
    assert guess.ask()
