"""RESP, Redis's wire protocol, for the commands keyq packs itself (bulk strings only).

redis-py encodes and frames every argument of every command anew: 48 us for the broker
fetch's 69 arguments on the development machine, against 5 us joined from frames made before.
keyq's fetch, wake wait and publish repeat the same few arguments (queue names, script shas)
in a varying order or around a new message, so each argument is framed once (``Fragments``)
and a command is a join of frames.
The bytes are redis-py's own: tests/test_resp.py compares them with its ``pack_command``.
"""

from __future__ import annotations

from collections.abc import Sequence

Arg = bytes | str | int | float
FRAGMENTS_KEPT = 4096  # framed arguments a Fragments keeps (a worker has a few hundred)


def encode(value: Arg) -> bytes:
    """An argument's bytes as redis-py encodes it (numbers by their repr, text as UTF-8)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):  # redis-py refuses booleans too: say what was meant
        raise TypeError("a boolean is no Redis argument: pass 1/0 or a string")
    if isinstance(value, int | float):
        return repr(value).encode()
    return value.encode("utf-8")


def bulk(part: bytes) -> bytes:
    """One bulk string: $<length>CRLF<bytes>CRLF."""
    return b"$%d\r\n%s\r\n" % (len(part), part)


def command(parts: Sequence[bytes]) -> bytes:
    """A command: an array of bulk strings."""
    return b"*%d\r\n" % len(parts) + b"".join(map(bulk, parts))


class Fragments:
    """Commands whose arguments recur, each text argument framed once (numbers are framed each
    time: 0 and 0.0, or 1 and True, are one dictionary key but not one argument)."""

    def __init__(self) -> None:
        self._framed: dict[str | bytes, bytes] = {}

    def command(self, args: Sequence[Arg]) -> bytes:
        framed = self._framed
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            if not isinstance(arg, str | bytes):
                out.append(bulk(encode(arg)))
                continue
            frame = framed.get(arg)
            if frame is None:
                if len(framed) >= FRAGMENTS_KEPT:
                    framed.clear()
                frame = framed[arg] = bulk(encode(arg))
            out.append(frame)
        return b"".join(out)
