"""JSON at orjson's speed on a worker's hot path, with the standard library's answers.

A worker reads two JSON documents per broker message (kombu's envelope, then Celery's body) and
writes each batch's states to PostgreSQL and to the cache as JSON: the standard library's
``json`` took about a sixth of a worker's CPU. orjson does the same work in a quarter to a
twentieth of the time, but it does not give the same answers everywhere, so it is used only
where it does:

- ``loads`` (of bytes; text is read by ``json``): orjson reads a number of more than 64 bits
  as a float (silently: a payload's 123456789012345678901234567890 would be applied as
  1.2345678901234568e+29), so a document with a run of 19 digits or more is read by ``json``
  instead; so is anything orjson refuses and ``json`` reads (NaN, Infinity, a lone surrogate
  escape, 1e400). What neither reads raises ``ValueError`` as ``json.loads`` does.
- ``dumps_checked``: compact text for a value known to hold no NaN or infinity (which orjson
  would write as null): a state the handler's output check (``keyq.envelope.STRICT_JSON``)
  accepted, or one read back from the Repo, which stores none. An integer of more than 64
  bits, which orjson refuses, is written by ``json``; keys that are not strings are written
  as ``json`` writes them.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# an integer literal of 19 digits or more may be beyond 64 bits (orjson would read a float):
# digits map to "0", all else to " ", and a run of 19 "0" is looked for (a regular expression
# took 11 us on a 1 KB message, longer than orjson's whole read)
_DIGITS_ONLY = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * 19
_DUMPS_OPTIONS = orjson.OPT_NON_STR_KEYS


def loads(data: bytes | str) -> Any:
    """``json.loads(data)``, faster; the same value for every document."""
    if isinstance(data, bytes) and _LONG_RUN not in data.translate(_DIGITS_ONLY):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # what orjson refuses, json may still read (NaN, lone surrogates, ...)
    return json.loads(data)


def dumps_checked(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"))`` as JSON (the same value once read), faster;
    for values that hold no NaN or infinity (see the module's docstring)."""
    try:
        return orjson.dumps(value, option=_DUMPS_OPTIONS).decode()
    except TypeError:  # an integer beyond 64 bits (orjson.JSONEncodeError is a TypeError)
        return json.dumps(value, separators=(",", ":"))
