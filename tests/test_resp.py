"""keyq.resp frames commands as redis-py does, byte for byte (a pure function: no server)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.connection import Connection

from keyq import resp

REDIS_PY = Connection()  # only its packer is used: it never connects


def redis_py(args: list[resp.Arg]) -> bytes:
    return b"".join(REDIS_PY.pack_command(*args))


FETCH = [
    "EVALSHA", "a986fd041" + "0" * 31, 34,
    *(f"bench497492c2.p{i}" for i in range(32)),
    "unacked", "unacked_index", *("1" for _ in range(32)),
]  # fmt: skip
WAIT = ["BRPOP", *(f"kq.p{i}:wake" for i in range(32)), "keyq.tick.0f3a", 1.0]

arguments = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.text(max_size=40).filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t)),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
    ),
    max_size=12,
)


@pytest.mark.parametrize("args", [FETCH, WAIT, ["BRPOP", "q:wake", 0]], ids=["fetch", "wait", "0"])
def test_the_fetch_and_the_wake_wait_are_the_bytes_redis_py_sends(args: list[resp.Arg]) -> None:
    frames = resp.Fragments()
    assert frames.command(args) == redis_py(args)
    assert frames.command(args) == redis_py(args)  # framed before: the same bytes


@given(arguments)
def test_any_arguments_are_framed_as_redis_py_frames_them(rest: list[resp.Arg]) -> None:
    args = ["EVALSHA", *rest]  # redis-py splits a first argument with spaces: a command name
    assert resp.Fragments().command(args) == redis_py(args)
    parts = [resp.encode(a) for a in args]
    assert resp.command(parts) == redis_py(args)


def test_a_full_cache_starts_again_and_still_frames_right() -> None:
    frames = resp.Fragments()
    for i in range(resp.FRAGMENTS_KEPT + 10):
        assert frames.command(["GET", f"key{i}"]) == redis_py(["GET", f"key{i}"])


def test_a_boolean_is_refused_as_redis_py_refuses_it() -> None:
    with pytest.raises(TypeError, match="boolean"):
        resp.Fragments().command(["SET", "k", True])


def test_equal_numbers_of_two_types_are_two_arguments() -> None:
    frames = resp.Fragments()
    for args in (["SET", "k", 0], ["SET", "k", 0.0], ["SET", "k", 1], ["SET", "k", 1.0]):
        assert frames.command(args) == redis_py(args)
    with pytest.raises(TypeError, match="boolean"):
        frames.command(["SET", "k", True])  # after 1: still refused
