"""The journal invariant, checked per key: what producers saw accepted against what was applied.

Producers append ``{"p": producer, "n": seq}`` to a key's journal, seq growing per producer. A
send that returned is *accepted*: it must appear exactly once, after every smaller seq of its
producer that appears (G2, G3). A send that raised is *uncertain*: the broker may or may not have
it, so it may appear at most once and is counted apart, never as lost. Anything else in a
journal (a seq never sent, a foreign item) is *unknown*.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

EXAMPLES = 5  # keys named per problem in a verdict, to start the search from


@dataclass(frozen=True, slots=True)
class Sent:
    """One send of a producer to a key, in the producer's order."""

    producer: int
    seq: int
    accepted: bool  # the send returned (False: it raised, the outcome is unknown)


@dataclass
class Verdict:
    """Counts over every key, and a few example keys per problem."""

    keys: int = 0
    accepted: int = 0
    uncertain: int = 0  # sends that raised
    applied: int = 0  # accepted sends found in their journal
    applied_uncertain: int = 0  # sends that raised, found applied all the same
    lost: int = 0  # accepted, not applied
    doubled: int = 0  # extra copies of any send
    out_of_order: int = 0  # applied after a later seq of the same producer
    unknown: int = 0  # journal items that no producer sent
    examples: dict[str, list[str]] = field(default_factory=dict)
    affected: set[str] = field(default_factory=set)  # every key with a problem

    @property
    def ok(self) -> bool:
        return not (self.lost or self.doubled or self.out_of_order or self.unknown)

    def note(self, problem: str, key: str) -> None:
        self.affected.add(key)
        seen = self.examples.setdefault(problem, [])
        if len(seen) < EXAMPLES and key not in seen:
            seen.append(key)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["affected"] = len(self.affected)
        return {**out, "ok": self.ok}


def _ident(item: object) -> tuple[int, int] | None:
    if isinstance(item, dict) and set(item) == {"p", "n"}:
        p, n = item["p"], item["n"]
        if type(p) is int and type(n) is int:
            return p, n
    return None


def check_key(verdict: Verdict, key: str, sent: Sequence[Sent], journal: Sequence[object]) -> None:
    """Add one key's figures to the verdict."""
    outcome = {(s.producer, s.seq): s.accepted for s in sent}
    verdict.keys += 1
    verdict.accepted += sum(outcome.values())
    verdict.uncertain += len(outcome) - sum(outcome.values())
    counts: Counter[tuple[int, int]] = Counter()
    high: dict[int, int] = {}  # per producer: the highest seq applied so far
    for item in journal:
        ident = _ident(item)
        if ident is None or ident not in outcome:
            verdict.unknown += 1
            verdict.note("unknown", key)
            continue
        counts[ident] += 1
        if counts[ident] > 1:
            verdict.doubled += 1
            verdict.note("doubled", key)
            continue
        producer, seq = ident
        if seq < high.get(producer, -1):
            verdict.out_of_order += 1
            verdict.note("out_of_order", key)
        high[producer] = max(seq, high.get(producer, -1))
    for ident, accepted in outcome.items():
        if accepted and not counts[ident]:
            verdict.lost += 1
            verdict.note("lost", key)
        elif counts[ident]:
            if accepted:
                verdict.applied += 1
            else:
                verdict.applied_uncertain += 1


def verify(
    sent: Mapping[str, Sequence[Sent]], journals: Mapping[str, Sequence[object] | None]
) -> Verdict:
    """Check every key that was sent to (a key with no state has an empty journal)."""
    verdict = Verdict()
    for key in sorted(set(sent) | set(journals)):
        check_key(verdict, key, sent.get(key, ()), journals.get(key) or ())
    return verdict
