"""The apply step on a real Repo, without Celery: once-only per message id, rejects and crashes
never leak half-made state, and a bad message is dead-lettered without stopping its batch."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import pytest

from keyq.activations import ActivationTable
from keyq.applier import Applier, BatchOutcome
from keyq.dedupe import DedupeWindow
from keyq.entity import Entity, EntityRegistry, handler
from keyq.envelope import make_envelope
from keyq.errors import Rejected, StaleWriteError
from keyq.repo import Repo
from keyq.routing import partition_for
from keyq.settings import Settings
from keyq.supervisor import Supervisor

PARTITIONS = 8
MODULES = ("keyq.examples", "tests.entities", "tests.test_applier")


class Picky(Entity):
    """Rejects after corrupting its state in place: the reject must not keep the corruption."""

    name = "test-picky"
    initial_state: dict[str, Any] = {"n": 0, "junk": []}

    @handler
    def inc(self, state: dict[str, Any], payload: Any) -> tuple[dict[str, Any], int]:
        return {**state, "n": state["n"] + 1}, state["n"] + 1

    @handler
    def mutate_then_reject(self, state: dict[str, Any], payload: Any) -> tuple[Any, Any]:
        state["junk"].append("corrupt")
        state["n"] = -1
        raise Rejected("not today")

    @handler
    def no_tuple(self, state: dict[str, Any], payload: Any) -> Any:
        return state


@pytest.fixture
def registry() -> EntityRegistry:
    return EntityRegistry.from_modules(MODULES)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, partitions=PARTITIONS, entity_modules=MODULES).with_(
        dedupe_window=256, batch_max=64
    )


@pytest.fixture
def store(database_url: str) -> Iterator[Repo]:
    r = Repo(database_url)
    yield r
    r.dispose()


class Harness:
    """An Applier as one worker process holds it; `restart()` is a fresh process."""

    def __init__(self, settings: Settings, registry: EntityRegistry, repo: Repo) -> None:
        self.settings, self.registry, self.repo = settings, registry, repo
        self.sleeps: list[float] = []
        self.restart()

    def restart(self) -> None:
        self.applier = Applier(
            self.settings,
            self.registry,
            self.repo,
            ActivationTable(1000, 300.0),
            Supervisor(rng=random.Random(7)),
            sleep=self.sleeps.append,
        )

    def env(self, entity: str, key: str, op: str, payload: Any = None, **kw: Any) -> dict[str, Any]:
        return make_envelope(
            self.registry,
            entity,
            key,
            op,
            payload,
            partitions=PARTITIONS,
            max_key_length=256,
            max_payload_bytes=65536,
            **kw,
        ).to_wire()

    def apply(self, raws: list[Any], partition: int | None = None, fence: int = 1) -> BatchOutcome:
        if partition is None:
            partition = next(
                r["partition"] for r in raws if isinstance(r, dict) and "partition" in r
            )
        self.repo_failures = 0
        return self.applier.apply(partition, fence, raws, keep_trying=self._keep_trying)

    def _keep_trying(self) -> bool:
        """A Repo failure here is a bug, not an outage: give up instead of retrying forever."""
        self.repo_failures += 1
        return self.repo_failures < 3

    def state(self, entity: str, key: str) -> Any:
        stored = self.repo.load_one(entity, key)
        return None if stored is None else stored.state

    def version(self, entity: str, key: str) -> int:
        stored = self.repo.load_one(entity, key)
        return 0 if stored is None else stored.version


@pytest.fixture
def h(settings: Settings, registry: EntityRegistry, store: Repo) -> Harness:
    return Harness(settings, registry, store)


def key_on(partition: int, prefix: str = "k") -> str:
    """A key that routes to the given partition."""
    return next(
        f"{prefix}{i}"
        for i in range(10_000)
        if partition_for(f"{prefix}{i}", PARTITIONS) == partition
    )


def test_duplicate_ids_in_one_batch_apply_once(h: Harness) -> None:
    a, b = h.env("sequence", "s1", "see", "a"), h.env("sequence", "s1", "see", "b")
    out = h.apply([a, a, b, a, b])
    assert (out.applied, out.duplicates) == (2, 3)
    assert h.state("sequence", "s1") == {"seen": ["a", "b"]}
    assert h.version("sequence", "s1") == 2


def test_redelivered_batch_changes_nothing(h: Harness) -> None:
    key = key_on(3)
    batch = [h.env("sequence", key, "see", i) for i in range(5)]
    batch.append(h.env("counter", key, "add", {"by": 2}))
    h.apply(batch)
    before = (h.state("sequence", key), h.version("sequence", key), h.state("counter", key))
    # the same worker sees it again (kombu redelivery) ...
    again = h.apply(batch)
    assert (again.applied, again.duplicates) == (0, 6)
    # ... and a fresh process (ids come from the Repo, not memory)
    h.restart()
    fresh = h.apply(list(reversed(batch)))
    assert (fresh.applied, fresh.duplicates) == (0, 6)
    after = (h.state("sequence", key), h.version("sequence", key), h.state("counter", key))
    assert after == before == ({"seen": [0, 1, 2, 3, 4]}, 5, {"value": 2})


def test_redelivered_prefix_with_new_messages_applies_only_the_new_ones(h: Harness) -> None:
    first = [h.env("sequence", "s", "see", i) for i in range(3)]
    h.apply(first)
    h.restart()
    out = h.apply([*first, h.env("sequence", "s", "see", 3)])
    assert (out.applied, out.duplicates) == (1, 3)
    assert h.state("sequence", "s") == {"seen": [0, 1, 2, 3]}


def test_reject_leaves_state_unchanged_even_after_in_place_mutation(h: Harness) -> None:
    h.apply([h.env("test-picky", "p", "inc")])
    batch = [
        h.env("test-picky", "p", "inc"),
        h.env("test-picky", "p", "mutate_then_reject", reply=True),
        h.env("test-picky", "p", "inc"),
    ]
    out = h.apply(batch)
    assert (out.applied, out.rejected, out.crashed, out.restarts) == (2, 1, 0, 0)
    assert out.dead_letters == []
    assert h.state("test-picky", "p") == {"n": 3, "junk": []}
    reply = json.loads(dict(out.replies)[batch[1]["id"]])
    assert reply["ok"] is False
    assert reply["error"] == {"kind": "rejected", "type": "Rejected", "message": "not today"}


def test_reject_of_a_new_key_keeps_its_initial_state(h: Harness) -> None:
    h.apply([h.env("test-picky", "fresh", "mutate_then_reject")])
    assert h.state("test-picky", "fresh") == {"n": 0, "junk": []}
    assert Picky.initial_state == {"n": 0, "junk": []}  # the class default was not touched


def test_crash_restarts_from_repo_then_dead_letters_and_later_messages_apply(h: Harness) -> None:
    h.apply([h.env("flaky", "f", "inc")])
    boom = h.env("flaky", "f", "mutate_then_boom", reply=True)
    out = h.apply([h.env("flaky", "f", "inc"), boom, h.env("flaky", "f", "inc")])
    # Flaky allows 2 restarts: 3 attempts, then the dead-letter table
    assert (out.applied, out.crashed, out.restarts) == (2, 1, 2)
    policy = h.settings.supervision
    assert len(h.sleeps) == 2  # exponential, with jitter, within the policy's bounds
    assert policy.backoff_min_s * 0.8 <= h.sleeps[0] <= policy.backoff_min_s * 1.2
    assert policy.backoff_min_s * 1.6 <= h.sleeps[1] <= policy.backoff_min_s * 2.4
    assert h.state("flaky", "f") == {"n": 3, "junk": []}  # the corruption never stuck
    [dl] = h.repo.dead_letters(entity="flaky", key="f")
    assert (dl.message_id, dl.reason, dl.op, dl.attempts) == (
        boom["id"],
        "crashed",
        "mutate_then_boom",
        3,
    )
    assert (dl.error_type, dl.error_message) == ("RuntimeError", "mutated then crashed")
    assert "Traceback" in dl.traceback and "mutate_then_boom" in dl.traceback
    assert dl.envelope["id"] == boom["id"] and dl.partition == boom["partition"]
    reply = json.loads(dict(out.replies)[boom["id"]])
    assert reply["error"]["kind"] == "crashed" and reply["error"]["type"] == "RuntimeError"
    # the key goes on in later batches, and the dead-lettered message is not retried on redelivery
    later = h.apply([boom, h.env("flaky", "f", "inc")])
    assert (later.applied, later.duplicates, later.crashed) == (1, 1, 0)
    assert h.state("flaky", "f") == {"n": 4, "junk": []}
    assert len(h.repo.dead_letters()) == 1


def test_restart_intensity_is_counted_per_key(h: Harness) -> None:
    """OTP counts restarts per child: a key that used up its budget does not use up another's."""
    x, y = key_on(3, "x"), key_on(3, "y")
    out = h.apply(
        [h.env("flaky", x, "boom", 1), h.env("flaky", x, "boom", 2), h.env("flaky", y, "boom", 3)]
    )
    # x's first message uses up x's 2 restarts of the window; x's second is dead at once;
    # y has a budget of its own
    assert (out.crashed, out.restarts) == (3, 4)
    attempts = {d.error_message: d.attempts for d in h.repo.dead_letters()}
    assert attempts == {"boom 1": 3, "boom 2": 1, "boom 3": 3}


def test_handler_returning_non_json_state_is_dead_lettered(h: Harness) -> None:
    h.apply([h.env("flaky", "j", "inc")])
    out = h.apply([h.env("flaky", "j", "bad_state"), h.env("flaky", "j", "inc")])
    assert (out.applied, out.crashed) == (1, 1)
    [dl] = h.repo.dead_letters()
    assert dl.reason == "crashed" and dl.error_type == "TypeError"
    assert "handler returned a state that is not JSON" in dl.error_message
    assert h.state("flaky", "j") == {"n": 2, "junk": []}


def test_handler_not_returning_a_pair_is_dead_lettered(h: Harness) -> None:
    h.apply([h.env("test-picky", "t", "no_tuple"), h.env("test-picky", "t", "inc")])
    [dl] = h.repo.dead_letters()
    assert dl.error_type == "TypeError" and "must return (new_state, reply)" in dl.error_message
    assert h.state("test-picky", "t") == {"n": 1, "junk": []}


def malformed_cases(h: Harness, p: int) -> list[tuple[Any, str, str]]:
    """(raw envelope, reason, words of the error) for partition p."""
    good = h.env("sequence", key_on(p), "see", "x")
    missing_key = {k: v for k, v in good.items() if k != "key"}
    return [
        ("a string", "malformed", "must be a JSON object, got str"),
        (42, "malformed", "must be a JSON object, got int"),
        (None, "malformed", "must be a JSON object, got NoneType"),
        ([good], "malformed", "must be a JSON object, got list"),
        ({"bad": 1}, "malformed", "lacks field(s): id, entity, key, op, partition"),
        (missing_key, "malformed", "lacks field(s): key"),
        ({**good, "id": "d1", "v": 2}, "malformed", "version 2 is not supported"),
        ({**good, "id": "d2", "op": ""}, "malformed", "'op' must be a non-empty string"),
        ({**good, "id": "d3", "key": ""}, "malformed", "key must not be empty"),
        ({**good, "id": "d4", "partition": (p + 1) % PARTITIONS}, "malformed", "does not match"),
        ({**good, "id": "d6", "entity": "nope"}, "unknown", "unknown entity 'nope'"),
        ({**good, "id": "d7", "op": "initial"}, "unknown", "no operation 'initial'"),
    ]


def test_malformed_envelopes_are_dead_lettered_and_the_rest_of_the_batch_applies(
    h: Harness,
) -> None:
    p = 5
    key = key_on(p)
    cases = malformed_cases(h, p)
    batch: list[Any] = []
    for i, (raw, _, _) in enumerate(cases):
        batch.append(h.env("sequence", key, "see", i))
        batch.append(raw)
    out = h.apply(batch, partition=p)
    assert (out.applied, out.malformed) == (len(cases), len(cases))
    assert h.state("sequence", key) == {"seen": list(range(len(cases)))}
    letters = h.repo.dead_letters(limit=1000)
    assert len(letters) == len(cases)
    for dl, (raw, reason, words) in zip(letters, cases, strict=True):
        assert dl.reason == reason, (raw, dl)
        assert words in dl.error_message, (raw, dl.error_message)
        assert dl.partition == p
        assert dl.error_type in (
            "MalformedMessageError",
            "UnknownEntityError",
            "UnknownOperationError",
        )
    assert letters[0].envelope == "a string" and letters[4].envelope == {"bad": 1}


def test_envelope_of_another_partition_is_rerouted_once_then_dead_lettered(h: Harness) -> None:
    p = 5
    stray = h.env("sequence", key_on((p + 1) % PARTITIONS), "see", "x")
    out = h.apply([stray], partition=p)
    assert [e.id for e in out.reroutes] == [stray["id"]] and out.applied == 0
    assert h.repo.dead_letters() == []
    again = h.applier.apply_group([(p, 1, [stray])], rerouted=frozenset({stray["id"]}))
    assert again.reroutes == [] and again.malformed == 1
    [dl] = h.repo.dead_letters()
    assert dl.reason == "malformed" and "again after it was re-routed" in dl.error_message


def test_malformed_message_waiting_for_a_reply_gets_a_refusal(h: Harness) -> None:
    raw = {**h.env("sequence", key_on(2), "see", reply=True), "op": "missing"}
    out = h.apply([raw], partition=2)
    reply = json.loads(dict(out.replies)[raw["id"]])
    assert reply["error"]["kind"] == "refused"


def test_batch_of_only_malformed_messages_commits_its_dead_letters(h: Harness) -> None:
    out = h.apply([{"bad": 1}, "junk"], partition=0)
    assert out.malformed == 2 and out.applied == 0
    assert len(h.repo.dead_letters()) == 2


def test_stale_token_commits_nothing_and_forgets_the_keys(h: Harness) -> None:
    key = key_on(4)
    h.apply([h.env("sequence", key, "see", 0)], fence=1)
    h.repo.record_fence(4, 2)  # another node took the partition
    with pytest.raises(StaleWriteError):
        h.apply([h.env("sequence", key, "see", 1), {"bad": 1}], fence=1)
    assert h.state("sequence", key) == {"seen": [0]}
    assert h.repo.dead_letters() == []
    assert ("sequence", key) not in h.applier.activations  # reloaded from the Repo next time
    h.apply([h.env("sequence", key, "see", 2)], fence=2)
    assert h.state("sequence", key) == {"seen": [0, 2]}


def test_dedupe_window_keeps_the_newest_ids(h: Harness, settings: Settings) -> None:
    h.settings = settings.with_(dedupe_window=4, batch_max=4)
    h.restart()
    envs = [h.env("sequence", "w", "see", i) for i in range(6)]
    h.apply(envs[:3])
    h.apply(envs[3:])
    stored = h.repo.load_one("sequence", "w")
    assert stored is not None
    window = DedupeWindow.from_stored(stored.recent_ids)
    assert len(window) == 4 and window.last == [e["id"] for e in envs]
    assert [window.seen(e["id"]) for e in envs] == [False, False, True, True, True, True]


def test_nul_characters_never_reach_the_database(h: Harness) -> None:
    """PostgreSQL refuses NUL in text and JSONB: such a message must not stall its partition."""
    key = key_on(6)
    good = h.env("journal", key, "append", "x")
    nul_payload = {**h.env("journal", key, "append", "x"), "payload": "a\x00b"}
    nul_key = {**h.env("journal", key, "append", "x"), "id": "nk", "key": "k\x00"}
    nul_entity = {**h.env("journal", key, "append", "x"), "id": "ne", "entity": "jour\x00nal"}
    nul_id = {**h.env("journal", key, "append", "x"), "id": "i\x00d"}
    long_id = {**h.env("journal", key, "append", "x"), "id": "i" * 129}
    batch = [nul_payload, nul_key, nul_entity, nul_id, long_id, good]
    out = h.apply(batch, partition=6)
    # the NUL payload is refused where it enters now, before the handler (it used to crash it)
    assert (out.applied, out.crashed, out.malformed) == (1, 0, 5)
    assert h.state("journal", key) == {"items": ["x"]}
    letters = {d.message_id: d for d in h.repo.dead_letters()}
    assert len(letters) == 5
    refused = letters[nul_payload["id"]]
    assert refused.reason == "malformed" and "NUL" in refused.error_message
    assert refused.envelope["payload"] == "a\\u0000b"  # kept, spelled out
    assert letters["i\\x00d"].reason == "malformed"
    assert letters["ne"].reason == "unknown" and letters["ne"].entity == "jour\\x00nal"
    assert letters["i" * 128].reason == "malformed"


def test_batch_with_more_keys_than_the_activation_cap_applies_every_key(h: Harness) -> None:
    h.applier.activations = ActivationTable(2, 300.0)
    keys = [key_on(1, f"cap{i}-") for i in range(5)]
    batch = [h.env("sequence", k, "see", n) for n in range(3) for k in keys]
    out = h.apply(batch)
    assert out.applied == 15 and len(h.applier.activations) <= 2
    again = h.apply(batch)  # evicted keys remember their ids through the Repo
    assert (again.applied, again.duplicates) == (0, 15)
    assert all(h.state("sequence", k) == {"seen": [0, 1, 2]} for k in keys)


def test_keys_that_finish_are_committed_before_a_key_that_backs_off(h: Harness) -> None:
    """A key that crashes and backs off does not hold up the batch's other keys: they run
    first and are committed (early callback: their replies) before the backoff is waited
    out; the crashing key is committed by the second commit, and nothing is lost."""
    key = next(k for k in (f"q{i}" for i in range(500)) if partition_for(k, PARTITIONS) == 0)
    other = next(k for k in (f"r{i}" for i in range(500)) if partition_for(k, PARTITIONS) == 0)
    batch = [
        h.env("flaky", key, "inc"),
        h.env("flaky", key, "mutate_then_boom"),
        h.env("flaky", other, "inc", reply=True),
        h.env("flaky", key, "inc"),
    ]
    seen: list[tuple[dict[str, Any] | None, int]] = []

    def early(out: BatchOutcome) -> None:
        seen.append((h.state("flaky", other), len(h.sleeps)))
        assert [m for m, _ in out.replies] == [batch[2]["id"]]

    out = h.applier.apply_group([(0, 1, batch)], on_early_commit=early)
    # the other key was committed before the first backoff was waited out
    assert seen == [({"n": 1, "junk": []}, 0)]
    assert len(h.sleeps) == 2
    assert (out.applied, out.crashed, out.restarts) == (2, 1, 2)  # the crashing key's part
    assert h.state("flaky", key) == {"n": 2, "junk": []}
    [dl] = h.repo.dead_letters()
    assert dl.message_id == batch[1]["id"]


def test_merge_adds_every_field_a_key_filled_and_leaves_the_partition() -> None:
    """_merge walks precomputed field lists: a field of BatchOutcome it did not list would be
    dropped from every batch's outcome. Every field but the partition is filled here."""
    from dataclasses import fields

    from keyq.applier import _merge

    part = BatchOutcome(3)
    for f in fields(BatchOutcome):
        value = getattr(part, f.name)
        if f.name == "partition":
            continue
        if isinstance(value, list):
            value.append(f.name)
        elif isinstance(value, dict):
            value["e"] = 2
        else:
            setattr(part, f.name, 5)
    into = BatchOutcome(1)
    into.applied, into.restarts_by_entity = 1, {"e": 1}
    into.messages.append("first")  # type: ignore[arg-type]
    _merge(into, part)
    for f in fields(BatchOutcome):
        got = getattr(into, f.name)
        if f.name == "partition":
            assert got == 1
        elif f.name == "applied":
            assert got == 6
        elif f.name == "restarts_by_entity":
            assert got == {"e": 3}
        elif f.name == "messages":
            assert got == ["first", "messages"]
        elif isinstance(got, list):
            assert got == [f.name], f.name
        elif isinstance(got, dict):
            assert got == {"e": 2}, f.name
        else:
            assert got == 5, f.name
