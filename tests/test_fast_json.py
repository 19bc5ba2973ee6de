"""keyq.fast_json reads and writes what the standard library's json does, only faster: orjson's
own answers differ for a number beyond 64 bits (it reads a float, or refuses to write it), for
NaN, lone surrogates and keys that are not strings; each of those gives json's answer here."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyq import fast_json

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def same(a: object, b: object) -> bool:
    """Equal, and of the same types all the way down (1 and 1.0 are not the same here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)  # type: ignore[index]
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return a == b


@given(JSON_VALUES)
def test_loads_reads_what_json_reads(value: object) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        data = text.encode("utf-8", "surrogatepass")
        assert same(fast_json.loads(data), json.loads(data))


@given(JSON_VALUES)
def test_dumps_checked_writes_what_json_reads_back_as_the_value(value: object) -> None:
    assert same(json.loads(fast_json.dumps_checked(value)), value)


@pytest.mark.parametrize(
    "data",
    [
        b"123456789012345678901234567890",  # orjson alone: 1.2345678901234568e+29
        b'{"by": -9223372036854775809}',  # one below int64: orjson alone reads a float
        b"[1, NaN, Infinity]",  # orjson refuses, json reads
        b'"\\ud800"',  # a lone surrogate escape: orjson refuses, json reads
        b"1e400",  # json reads inf
    ],
)
def test_loads_gives_json_s_answer_where_orjson_s_differs(data: bytes) -> None:
    got, want = fast_json.loads(data), json.loads(data)
    assert repr(got) == repr(want)


def test_loads_refuses_what_json_refuses() -> None:
    for data in (b"{", b"\xff", b"", b"[1,]"):
        with pytest.raises(ValueError):
            fast_json.loads(data)


def test_dumps_checked_writes_big_integers_and_non_string_keys_as_json_does() -> None:
    assert fast_json.dumps_checked({"n": 2**70}) == '{"n":1180591620717411303424}'
    assert json.loads(fast_json.dumps_checked({1: "a", None: "b", 2.5: "c"})) == {
        "1": "a",
        "null": "b",
        "2.5": "c",
    }
    assert not math.isnan(json.loads(fast_json.dumps_checked([0.1]))[0])
