"""Supervision, OTP style: what happens when a handler crashes or runs too long.

The decision is made here, not in the apply step: a crash restarts the key (its activation is
dropped and reloaded from the Repo) after an exponential backoff with jitter, as long as the key's
restart intensity allows (at most N restarts within a window, counted per key as OTP counts per
child: one bad key never uses up the budget of the others); past it, or when the handler ran past
its time limit, the message goes to the dead-letter table and the key's next messages go on.

The defaults ride out a dependency that is down for ten seconds without a dead letter: ten
restarts within a minute, waits from 0.1 s doubling to 2 s (about 11 s in all). Every knob has a
Settings default (KEYQ_MAX_RESTARTS, KEYQ_RESTART_WINDOW_S, KEYQ_BACKOFF_MIN_S,
KEYQ_BACKOFF_MAX_S, KEYQ_MAX_HANDLER_SECONDS) and a per-entity override (class attributes of the
same names on the Entity).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # getsignal without the enum lookup
import random
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from keyq.errors import HandlerTimeoutError

JITTER = 0.2  # each wait is the exponential step times a random factor in [1 - J, 1 + J]
MAX_TRACKED_KEYS = 100_000  # keys whose recent restarts are remembered (oldest forgotten first)


@dataclass(frozen=True)
class SupervisionPolicy:
    """How one entity type is supervised (Settings' defaults, each overridable per entity)."""

    max_restarts: int
    within_seconds: float
    backoff_min_s: float
    backoff_max_s: float
    max_handler_seconds: float  # 0: no limit


@dataclass(frozen=True)
class Decision:
    """What to do after a handler failed: restart after delay_s, or dead-letter (reason)."""

    restart: bool
    delay_s: float = 0.0
    reason: str = "crashed"


def backoff_delay(
    attempt: int, policy: SupervisionPolicy, rng: random.Random | None = None
) -> float:
    """The wait before the n-th restart (attempt >= 1): min * 2^(n-1), capped, with jitter."""
    step = min(policy.backoff_max_s, policy.backoff_min_s * (2 ** max(0, attempt - 1)))
    factor = 1.0 + JITTER * (2.0 * (rng or random).random() - 1.0)
    return float(max(0.0, min(policy.backoff_max_s, step * factor)))


class Supervisor:
    """Restart decisions for the keys of one worker process."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._restarts: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self.total: dict[str, int] = {}  # restarts per entity type, since the process started

    def on_crash(
        self, entity: str, key: str, attempt: int, policy: SupervisionPolicy, exc: BaseException
    ) -> Decision:
        """A handler of (entity, key) raised on its attempt-th try of a message."""
        if isinstance(exc, HandlerTimeoutError):
            return Decision(False, reason="timeout")  # it would only spin again
        if not self._allow((entity, key), policy):
            return Decision(False, reason="crashed")
        self.total[entity] = self.total.get(entity, 0) + 1
        return Decision(True, backoff_delay(attempt, policy, self._rng))

    def recent(self, entity: str, key: str) -> int:
        return len(self._restarts.get((entity, key), ()))

    def _allow(self, key_id: tuple[str, str], policy: SupervisionPolicy) -> bool:
        now = self._clock()
        window = self._restarts.pop(key_id, None) or deque()
        while window and window[0] <= now - policy.within_seconds:
            window.popleft()
        allowed = len(window) < policy.max_restarts
        if allowed:
            window.append(now)
        self._restarts[key_id] = window  # most recently used last
        while len(self._restarts) > MAX_TRACKED_KEYS:
            self._restarts.popitem(last=False)
        return allowed


class time_limit:
    """Raise HandlerTimeoutError in the handler if it runs longer than seconds.

    Uses SIGALRM, so it interrupts Python code only, and only in the main thread (where the
    worker's solo pool runs handlers); elsewhere, and for code stuck outside Python, the
    worker's progress watchdog (keyq.watchdog) is the backstop. The signal handler is installed
    once per process and each limit only arms and disarms the timer (two system calls): this
    runs once per applied message, and signal.signal() per message cost a tenth of a drain.
    """

    __slots__ = ("armed", "seconds", "what")

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.armed = False

    def __enter__(self) -> None:
        global _ARMED
        if self.seconds <= 0 or threading.get_ident() != _MAIN_THREAD_ID:
            return
        if _signal.getsignal(signal.SIGALRM) is not _expire:
            _PREVIOUS[0] = signal.signal(signal.SIGALRM, _expire)
        _ARMED = self
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *_exc: object) -> None:
        global _ARMED
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            _ARMED = None
            self.armed = False


_MAIN_THREAD_ID = threading.main_thread().ident
_ARMED: time_limit | None = None  # the limit whose timer runs now
_PREVIOUS: list[Any] = [None]  # the SIGALRM handler before ours, still called when none is armed


def _expire(signum: int, frame: FrameType | None) -> Any:
    armed = _ARMED
    if armed is None:  # not ours: an alarm of whoever had SIGALRM before
        previous = _PREVIOUS[0]
        return previous(signum, frame) if callable(previous) else None
    raise HandlerTimeoutError(f"{armed.what} ran longer than its limit of {armed.seconds:g}s")
