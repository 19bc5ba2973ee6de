"""The benchmark's workload: the example counter entity, one `add` per message."""

from __future__ import annotations

ENTITY = "counter"
OP = "add"


def bench_key(i: int) -> str:
    return f"k{i}"
