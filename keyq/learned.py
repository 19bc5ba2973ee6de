"""A yes/no guess learned from how it turned out: is an extra look likely to find work?

Two places in a worker choose between looking for more work at once (one more step, which
finds nothing when no message has arrived) and waiting to be told: the broker fetch after a
delivery that emptied its queue (keyq.transport) and the follow-on drain in a batch's
post-commit round trip (keyq.worker). Under a steady stream the look mostly finds messages,
for one caller's sequential calls never. Each keeps a moving average of such looks' outcomes,
looks while most of them found something, and otherwise still looks once in `probe` asks, so
that it notices a stream that has become steady. A producer's connection chooses alike between
polling for a reply and blocking for it (keyq.reply_spin).
"""

from __future__ import annotations

WEIGHT = 0.2  # weight of the newest outcome in the moving average
PROBE = 8  # while waiting is the better guess, one ask in this many looks anyway


class LearnedGuess:
    """Whether to look: ask() before, learn(found) after each look that was made."""

    __slots__ = ("asked", "average", "probe", "weight")

    def __init__(self, weight: float = WEIGHT, probe: int = PROBE) -> None:
        self.average = 1.0  # start by looking: a first steady stream pays at once
        self.asked = 0
        self.weight = weight
        self.probe = probe

    def ask(self) -> bool:
        self.asked += 1
        return self.average >= 0.5 or self.asked % self.probe == 0

    def learn(self, found: bool) -> None:
        self.average += self.weight * (found - self.average)
