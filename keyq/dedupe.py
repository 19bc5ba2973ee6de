"""A key's dedupe window: which of its recent messages were applied, kept small.

Exactly-once rests on it (G3): a key remembers the ids of the last KEYQ_DEDUPE_WINDOW (256)
messages it applied, in the same commit as its state, and skips an id it remembers. Every commit
of a key rewrites its window, so its size is paid on every write: 256 ids as a JSON array are
about 9 KB, and a 1-row PostgreSQL commit cost 470 us of server CPU with them against 173 us with
10 ids (measured; the same with TOAST settings changed: it is the size of the value). So the
window is kept as 8-byte fingerprints of the ids (the first 8 bytes of BLAKE2b): 2 KB for 256,
about 3.1 KB stored with the newest ids. Two different ids share a fingerprint with probability
2^-64, so a message is taken for a duplicate it is not with probability at most 256 / 2^64
(about 1.4e-17).

The newest ids are also kept whole (LAST_IDS), for `keyq inspect`. The stored form, in the
state row's JSON column, is ``{"v": 2, "fp": "<base64, oldest first>", "last": [ids]}``; the
older form, a JSON array of the ids, is still read, and a key's next commit writes the new one.
"""

from __future__ import annotations

import base64
import hashlib
from collections import deque
from typing import Any

FINGERPRINT_BYTES = 8
LAST_IDS = 10  # the newest applied ids kept whole (what `keyq inspect` shows)
FORMAT_VERSION = 2


def fingerprint(message_id: str) -> bytes:
    """The 8 bytes a message id is remembered by."""
    return hashlib.blake2b(
        message_id.encode("utf-8", "surrogatepass"), digest_size=FINGERPRINT_BYTES
    ).digest()


class DedupeWindow:
    """The fingerprints of a key's last applied messages, oldest first, and its newest ids."""

    __slots__ = ("_known", "_order", "last")

    def __init__(self, fingerprints: list[bytes] | None = None, last: list[str] | None = None):
        self._order: deque[bytes] = deque(fingerprints or ())
        self._known: set[bytes] = set(self._order)
        self.last: list[str] = list(last or ())[-LAST_IDS:]

    def __len__(self) -> int:
        return len(self._order)

    def seen(self, message_id: str) -> bool:
        return fingerprint(message_id) in self._known

    def remember(self, message_id: str, window: int) -> None:
        """Record an applied id, keeping the newest `window` of them."""
        fp = fingerprint(message_id)
        self._order.append(fp)
        self._known.add(fp)
        while len(self._order) > window:  # (an id is remembered once: seen() came first)
            self._known.discard(self._order.popleft())
        self.last.append(message_id)
        if len(self.last) > LAST_IDS:
            del self.last[0]

    def stored(self) -> dict[str, Any]:
        """The JSON value that the state row holds."""
        return {
            "v": FORMAT_VERSION,
            "fp": base64.b64encode(b"".join(self._order)).decode("ascii"),
            "last": list(self.last),
        }

    @classmethod
    def from_stored(cls, value: object) -> DedupeWindow:
        """Read the stored value: the current form, or the older list of ids. Only keyq
        writes it; anything else reads as an empty window."""
        if isinstance(value, list):
            ids = [i for i in value if isinstance(i, str)]
            return cls([fingerprint(i) for i in ids], ids)
        if isinstance(value, dict) and isinstance(value.get("fp"), str):
            raw = base64.b64decode(value["fp"])
            fps = [
                raw[i : i + FINGERPRINT_BYTES]
                for i in range(0, len(raw) - FINGERPRINT_BYTES + 1, FINGERPRINT_BYTES)
            ]
            last = value.get("last")
            ids = [i for i in last if isinstance(i, str)] if isinstance(last, list) else []
            return cls(fps, ids)
        return cls()
