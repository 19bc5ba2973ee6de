"""Redis Lua scripts, kept as .lua files beside the package and registered once per client."""

from __future__ import annotations

import weakref
from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.exceptions import NoScriptError


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


# the script digests each connection pool's server is known to hold (see ScriptPipeline)
_LOADED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


class ScriptPipeline(redis.client.Pipeline):
    """A non-transactional pipeline that asks the server which of its scripts it holds (SCRIPT
    EXISTS, one more round trip) only the first time, not at every execute as redis-py's does.
    A server that lost them (restarted, SCRIPT FLUSH) answers NOSCRIPT: then they are loaded
    and the whole pipeline runs once more, so its commands must bear running twice (keyq's
    post-commit writes do: versioned cache sets, compare-and-delete, a reply read once)."""

    def load_scripts(self) -> None:
        known = _LOADED.setdefault(self.connection_pool, set())
        if not all(s.sha in known for s in self.scripts):
            super().load_scripts()  # type: ignore[no-untyped-call]
            known.update(s.sha for s in self.scripts)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        stack, scripts = list(self.command_stack), set(self.scripts)
        try:
            return list(super().execute(raise_on_error))
        except NoScriptError:
            _LOADED.pop(self.connection_pool, None)
            self.command_stack, self.scripts = stack, scripts
            return list(super().execute(raise_on_error))


def script_pipeline(client: redis.Redis) -> ScriptPipeline:
    """A ScriptPipeline on the client's connection pool (transaction=False)."""
    return ScriptPipeline(client.connection_pool, client.response_callbacks, False, None)
