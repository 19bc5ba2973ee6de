"""keyq.dedupe: a key's window of applied message ids, kept as fingerprints (pure)."""

from __future__ import annotations

import json
import uuid

from hypothesis import given
from hypothesis import strategies as st

from keyq.dedupe import LAST_IDS, DedupeWindow, fingerprint


def ids(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


def test_a_window_remembers_the_newest_ids_and_forgets_the_older() -> None:
    window = DedupeWindow()
    applied = ids(300)
    for i in applied:
        assert not window.seen(i)
        window.remember(i, 256)
    assert len(window) == 256
    assert [window.seen(i) for i in applied] == [False] * 44 + [True] * 256
    assert window.last == applied[-LAST_IDS:]


def test_it_survives_its_stored_form_and_a_full_window_is_a_third_of_the_ids_json() -> None:
    window = DedupeWindow()
    applied = ids(256)
    for i in applied:
        window.remember(i, 256)
    stored = json.loads(json.dumps(window.stored()))  # as it crosses the database
    again = DedupeWindow.from_stored(stored)
    assert all(again.seen(i) for i in applied) and not again.seen(uuid.uuid4().hex)
    assert again.last == applied[-LAST_IDS:] and len(again) == 256
    # the old form held the ids themselves: 256 x 32 hex digits, about 9 KB of JSON
    assert len(json.dumps(stored)) < 3200 < 9000 < len(json.dumps(applied))


def test_the_old_form_a_list_of_ids_is_read_and_then_kept_in_the_new_one() -> None:
    old = ids(5)
    window = DedupeWindow.from_stored(old)
    assert all(window.seen(i) for i in old) and window.last == old
    window.remember("next", 256)
    assert DedupeWindow.from_stored(window.stored()).last == [*old, "next"]
    assert window.stored()["v"] == 2


def test_anything_else_reads_as_an_empty_window() -> None:
    for value in (None, 3, "x", {"fp": 7}, {}):
        assert len(DedupeWindow.from_stored(value)) == 0


@given(st.text(min_size=1, max_size=200))
def test_a_fingerprint_is_eight_bytes_and_stable(message_id: str) -> None:
    fp = fingerprint(message_id)
    assert len(fp) == 8 and fp == fingerprint(message_id)
