"""Redis Lua scripts, kept as .lua files beside the package and registered once per client."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import redis


@cache
def lua_source(name: str) -> str:
    return resources.files("keyq").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def register(client: redis.Redis, name: str) -> Any:
    """A callable Script (EVALSHA with automatic EVAL fallback) bound to a client."""
    return client.register_script(lua_source(name))


@cache
def composed_source(name: str, *parts: str) -> str:
    """Script `name` with the scripts `parts` defined before it as local functions of (KEYS,
    ARGV): one round trip runs several steps, each still written (and tested) once."""
    functions = [
        f"local function {part}(KEYS, ARGV)\n{lua_source(part)}\nend" for part in parts
    ]
    return "\n".join([*functions, lua_source(name)])


def register_composed(client: redis.Redis, name: str, *parts: str) -> Any:
    return client.register_script(composed_source(name, *parts))
