"""The Repo on PostgreSQL and SQLite: batches commit atomically, stale owners are fenced off,
versions never go backwards, dead letters are kept until purged on purpose."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from keyq.errors import RepoError, StaleWriteError
from keyq.migrate import alembic_config, current_revision
from keyq.repo import DeadLetter, Repo, StateWrite, metadata


@pytest.fixture
def store(database_url: str) -> Iterator[Repo]:
    r = Repo(database_url)
    yield r
    r.dispose()


def write(key: str, state: object, version: int, ids: list[str] | None = None) -> StateWrite:
    return StateWrite("counter", key, state, version, ids if ids is not None else [f"m{version}"])


def dead_letter(
    n: int, *, entity: str = "cart", key: str = "k", reason: str = "crashed"
) -> DeadLetter:
    return DeadLetter(
        message_id=f"msg-{n}",
        entity=entity,
        key=key,
        op="add",
        partition=3,
        envelope={"id": f"msg-{n}", "payload": {"n": n}},
        reason=reason,
        error_type="ValueError",
        error_message=f"boom {n}",
        traceback="Traceback (most recent call last):\n  ...\nValueError: boom",
        attempts=3,
    )


def test_schema_is_at_the_newest_alembic_revision(store: Repo) -> None:
    scripts = ScriptDirectory.from_config(alembic_config(store.engine))
    heads = scripts.get_heads()
    assert len(heads) == 1, f"migrations must form one line, got heads {heads}"
    history = [rev.revision for rev in scripts.walk_revisions()]
    assert history[-1] == "0001"  # the initial schema is the root
    assert current_revision(store.engine) == heads[0]
    store.migrate()  # idempotent on every start
    assert current_revision(store.engine) == heads[0]
    # every table the Repo queries exists with every column it names
    inspector = sa.inspect(store.engine)
    for table in metadata.sorted_tables:
        columns = {c["name"] for c in inspector.get_columns(table.name)}
        assert {c.name for c in table.columns} <= columns, table.name


def test_commit_then_load_returns_state_version_fence_and_ids(store: Repo) -> None:
    store.commit(0, 1, [write("a", {"value": 1, "nested": ["é", None, 2.5]}, 1, ["m1"])])
    store.commit(0, 1, [write("a", {"value": 2}, 2, ["m1", "m2"]), write("b", {"value": 9}, 1)])
    loaded = store.load([("counter", "a"), ("counter", "b"), ("counter", "missing")])
    assert set(loaded) == {("counter", "a"), ("counter", "b")}
    a = loaded[("counter", "a")]
    assert (a.state, a.version, a.fence, a.recent_ids, a.active) == (
        {"value": 2},
        2,
        1,
        ["m1", "m2"],
        True,
    )
    assert store.load_one("counter", "b") is not None
    assert store.load_one("counter", "missing") is None
    assert store.load_one("journal", "a") is None  # keys are per entity
    assert store.count_states() == 2


def test_load_of_many_keys_spans_chunks(store: Repo) -> None:
    store.commit(0, 1, [write(f"k{i}", {"i": i}, 1) for i in range(1200)])
    loaded = store.load([("counter", f"k{i}") for i in range(1200)])
    assert len(loaded) == 1200 and loaded[("counter", "k1199")].state == {"i": 1199}


def test_commit_with_token_older_than_recorded_fence_is_refused_and_changes_nothing(
    store: Repo,
) -> None:
    store.commit(2, 4, [write("a", {"value": 1}, 1)])
    store.record_fence(2, 5)  # a new owner took the partition
    with pytest.raises(StaleWriteError, match="fencing token 4 is older"):
        store.commit(
            2, 4, [write("a", {"value": 666}, 2), write("new", {"v": 1}, 1)], [dead_letter(1)]
        )
    assert store.load_one("counter", "a").state == {"value": 1}  # type: ignore[union-attr]
    assert store.load_one("counter", "new") is None
    assert store.dead_letters() == []
    assert store.partition_fence(2) == 5
    store.commit(2, 5, [write("a", {"value": 2}, 2)])  # the new owner writes fine
    assert store.load_one("counter", "a").fence == 5  # type: ignore[union-attr]


def test_commit_after_a_newer_commit_is_refused(store: Repo) -> None:
    store.commit(1, 7, [write("a", {"value": 1}, 1)])
    with pytest.raises(StaleWriteError):
        store.commit(1, 6, [write("a", {"value": 2}, 2)])
    with pytest.raises(StaleWriteError):
        store.record_fence(1, 6)  # an older grant cannot be recorded either
    assert store.partition_fence(1) == 7
    assert store.load_one("counter", "a").version == 1  # type: ignore[union-attr]


def test_fences_are_per_partition(store: Repo) -> None:
    store.record_fence(0, 100)
    store.commit(1, 1, [write("a", {"v": 1}, 1)])
    assert (store.partition_fence(0), store.partition_fence(1), store.partition_fence(2)) == (
        100,
        1,
        0,
    )


def test_same_token_may_commit_repeatedly(store: Repo) -> None:
    store.record_fence(0, 3)
    for version in range(1, 4):
        store.commit(0, 3, [write("a", {"v": version}, version)])
    assert store.load_one("counter", "a").version == 3  # type: ignore[union-attr]


@pytest.mark.parametrize("older", [1, 2])
def test_version_never_goes_backwards(store: Repo, older: int) -> None:
    store.commit(0, 1, [write("a", {"v": 2}, 2)])
    with pytest.raises(StaleWriteError, match="refused"):
        store.commit(0, 1, [write("b", {"v": 1}, 1), write("a", {"v": "old"}, older)])
    assert store.load_one("counter", "a").state == {"v": 2}  # type: ignore[union-attr]
    assert store.load_one("counter", "b") is None  # the whole batch rolled back


def test_key_written_under_a_newer_token_refuses_an_older_one(store: Repo) -> None:
    # the same key reached through another partition id (e.g. a misconfigured partition count)
    store.commit(0, 9, [write("a", {"v": 1}, 1)])
    with pytest.raises(StaleWriteError):
        store.commit(5, 2, [write("a", {"v": 2}, 2)])
    assert store.load_one("counter", "a").state == {"v": 1}  # type: ignore[union-attr]


def test_empty_commit_is_a_no_op(store: Repo) -> None:
    store.commit(0, 1, [])
    assert store.partition_fence(0) == 0


def test_dead_letters_are_stored_with_their_error_and_listed_by_filter(store: Repo) -> None:
    store.commit(
        3, 1, [], [dead_letter(1), dead_letter(2, key="other"), dead_letter(3, reason="malformed")]
    )
    everything = store.dead_letters()
    assert [d.message_id for d in everything] == ["msg-1", "msg-2", "msg-3"]
    first = everything[0]
    assert first.id is not None and first.created_at is not None
    assert (first.entity, first.key, first.op, first.partition) == ("cart", "k", "add", 3)
    assert first.envelope == {"id": "msg-1", "payload": {"n": 1}}
    assert (first.error_type, first.error_message, first.attempts) == ("ValueError", "boom 1", 3)
    assert first.traceback.startswith("Traceback") and first.reason == "crashed"
    assert [d.message_id for d in store.dead_letters(key="other")] == ["msg-2"]
    assert [d.message_id for d in store.dead_letters(reason="malformed")] == ["msg-3"]
    assert [d.message_id for d in store.dead_letters(entity="cart", key="k")] == ["msg-1", "msg-3"]
    assert store.dead_letters(entity="counter") == []
    assert len(store.dead_letters(limit=2)) == 2
    assert [d.message_id for d in store.dead_letters(ids=[everything[1].id or 0])] == ["msg-2"]


def test_dead_letter_of_a_non_json_envelope_keeps_its_repr(store: Repo) -> None:
    dl = DeadLetter(
        "", "", "", "", 0, "['not', 'a', 'dict']", "malformed", "MalformedMessageError", "x"
    )
    store.commit(0, 1, [], [dl])
    assert store.dead_letters()[0].envelope == "['not', 'a', 'dict']"


def test_purge_without_a_filter_is_refused(store: Repo) -> None:
    store.commit(3, 1, [], [dead_letter(1)])
    with pytest.raises(ValueError, match="purge needs a filter"):
        store.purge_dead_letters()
    assert len(store.dead_letters()) == 1


def test_purge_removes_only_what_matches(store: Repo) -> None:
    store.commit(3, 1, [], [dead_letter(i, key=f"k{i % 2}") for i in range(6)])
    assert store.purge_dead_letters(key="k0") == 3
    assert {d.key for d in store.dead_letters()} == {"k1"}
    keep = store.dead_letters()[0].id or 0
    assert store.purge_dead_letters(ids=[keep]) == 1
    assert store.purge_dead_letters(reason="malformed") == 0
    assert store.purge_dead_letters(everything=True) == 2
    assert store.dead_letters() == []


def test_unreachable_database_raises_repo_error_without_its_password() -> None:
    repo = Repo("postgresql://keyq:topsecret@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(RepoError) as info:
            repo.load_one("counter", "a")
        assert "topsecret" not in str(info.value)
        with pytest.raises(RepoError):
            repo.commit(0, 1, [write("a", {}, 1)])
    finally:
        repo.dispose()


def test_longest_allowed_key_and_unicode_round_trip(store: Repo) -> None:
    key = "🔑" * 1024  # KEYQ_MAX_KEY_LENGTH may be raised up to 1024 characters
    state = {"big": 2**62, "text": "ключ é 🔑", "list": [None, True, 1.5]}
    store.commit(0, 1, [StateWrite("journal", key, state, 1, ["m"])])
    stored = store.load_one("journal", key)
    assert stored is not None and stored.state == state
