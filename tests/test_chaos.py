"""The chaos tool: its fault plan is a pure function of the seed, its check finds every lost,
doubled and reordered journal item, and `scripts/chaos --quick` holds the journal invariant
through every fault kind on real servers it starts itself."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from keyq.chaos import schedule
from keyq.chaos.poison import MARKER, poison_message
from keyq.chaos.verify import Sent, verify
from keyq.settings import Settings
from tests.conftest import ROOT

LEASE_TTL_S = 0.8


def plan(seed: int, count: int = 5, kinds: tuple[str, ...] = schedule.FAULT_KINDS) -> list:
    return schedule.make_schedule(seed, count, list(kinds), 25.0, 2, 64, LEASE_TTL_S)


# --- schedule ---------------------------------------------------------------------------------


def test_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    assert plan(7) == plan(7)
    assert plan(7) != plan(8)


def test_schedule_has_every_kind_once_before_any_twice_in_time_order_inside_the_load() -> None:
    for seed in range(20):
        faults = plan(seed, count=7)
        assert {f.kind for f in faults} == set(schedule.FAULT_KINDS)
        times = [f.at_s for f in faults]
        assert times == sorted(times)
        assert times[0] > 0 and times[-1] < 25.0


def test_pauses_outlast_the_lease_and_poison_names_valid_partitions() -> None:
    faults = [f for seed in range(20) for f in plan(seed)]
    pauses = [f.duration_s for f in faults if f.kind == schedule.SIGSTOP]
    assert pauses and min(pauses) > LEASE_TTL_S
    poison = [p for f in faults if f.kind == schedule.POISON for p in f.poison]
    assert poison and all(0 <= partition < 64 for _, partition in poison)
    assert {variant for variant, _ in poison} == set(schedule.POISON_VARIANTS)


def test_schedule_keeps_to_the_kinds_asked_for_and_refuses_unknown_ones() -> None:
    assert {f.kind for f in plan(3, count=6, kinds=(schedule.KILL9,))} == {schedule.KILL9}
    with pytest.raises(ValueError, match="unknown fault kind"):
        plan(3, kinds=("meteor",))


# --- verify -----------------------------------------------------------------------------------


def sends(*seqs: int, producer: int = 0, accepted: bool = True) -> list[Sent]:
    return [Sent(producer, n, accepted) for n in seqs]


def items(*seqs: int, producer: int = 0) -> list[object]:
    return [{"p": producer, "n": n} for n in seqs]


def test_journal_holding_every_accepted_send_once_in_order_is_clean() -> None:
    verdict = verify({"a": sends(1, 2, 3), "b": sends(4)}, {"a": items(1, 2, 3), "b": items(4)})
    assert verdict.ok
    assert (verdict.accepted, verdict.applied, verdict.keys) == (4, 4, 2)


def test_verify_detects_a_lost_item() -> None:
    verdict = verify({"a": sends(1, 2, 3)}, {"a": items(1, 3)})
    assert verdict.lost == 1 and not verdict.ok
    assert verdict.examples["lost"] == ["a"]


def test_verify_detects_a_key_whose_state_is_missing() -> None:
    verdict = verify({"a": sends(1)}, {})
    assert verdict.lost == 1 and not verdict.ok


def test_verify_detects_a_doubled_item() -> None:
    verdict = verify({"a": sends(1, 2)}, {"a": items(1, 2, 2)})
    assert verdict.doubled == 1 and verdict.lost == 0 and not verdict.ok


def test_verify_detects_a_reordered_item() -> None:
    verdict = verify({"a": sends(1, 2, 3)}, {"a": items(1, 3, 2)})
    assert verdict.out_of_order == 1 and verdict.lost == 0 and not verdict.ok


def test_order_is_per_producer() -> None:
    sent = {"a": sends(1, 2) + sends(1, 2, producer=1)}
    journal = {"a": items(1) + items(1, producer=1) + items(2, producer=1) + items(2)}
    assert verify(sent, journal).ok


def test_a_send_that_raised_is_neither_lost_when_absent_nor_doubled_when_applied_once() -> None:
    sent = {"a": sends(1) + sends(2, accepted=False) + sends(3)}
    absent = verify(sent, {"a": items(1, 3)})
    applied = verify(sent, {"a": items(1, 2, 3)})
    assert absent.ok and applied.ok
    assert (absent.uncertain, absent.applied_uncertain) == (1, 0)
    assert (applied.uncertain, applied.applied_uncertain, applied.applied) == (1, 1, 2)
    assert verify(sent, {"a": items(1, 2, 2, 3)}).doubled == 1


def test_foreign_items_in_a_journal_are_counted_as_unknown() -> None:
    verdict = verify({"a": sends(1)}, {"a": [*items(1), {"p": 0, "n": 99}, "junk"]})
    assert verdict.unknown == 2 and not verdict.ok


# --- poison -----------------------------------------------------------------------------------


def test_lone_surrogate_poison_is_a_valid_celery_message_with_an_unencodable_key() -> None:
    raw = poison_message("lone_surrogate", Settings(namespace="chaos"), 5)
    message = json.loads(raw)
    assert message["headers"]["task"] == "keyq.dispatch"
    assert message["properties"]["delivery_info"]["routing_key"] == "chaos.p5"
    [[envelope]], _, _ = json.loads(base64.b64decode(message["body"]))
    assert envelope["key"] == "\ud800" and envelope["partition"] == 5
    with pytest.raises(UnicodeEncodeError):
        envelope["key"].encode()
    garbage = poison_message("not_json", Settings(), 0)
    assert MARKER.encode() in garbage
    with pytest.raises(ValueError):
        json.loads(garbage)


# --- the tool, end to end ---------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_quick_chaos_run_loses_doubles_and_reorders_nothing(tmp_path: Path) -> None:
    report_path = tmp_path / "chaos.json"
    done = subprocess.run(
        [
            str(ROOT / "scripts" / "chaos"),
            "--quick",
            "--no-poison",
            "--seed",
            "11",
            "--json",
            str(report_path),
        ],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    assert report_path.exists(), f"no report; exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    doc = json.loads(report_path.read_text())
    summary = doc["summary"]
    assert summary["accepted"] >= 9000, summary
    assert (summary["lost"], summary["doubled"], summary["out_of_order"]) == (0, 0, 0), summary
    assert summary["unknown"] == 0 and not summary["stall"], summary
    assert summary["applied"] == summary["accepted"], summary
    applied = {f["kind"] for f in doc["faults"]}
    assert applied == set(schedule.FAULT_KINDS) - {schedule.POISON}, doc["faults"]
    assert summary["poison_sent"] == 0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RESULT: PASS" in done.stdout
