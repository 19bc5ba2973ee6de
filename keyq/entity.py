"""The Entity API: a per-key state machine declared as a class with named handlers.

A handler turns (state, payload) into (new_state, reply). Only methods decorated with
``@handler`` can be invoked from a message. Definitions are checked when the class is created,
so a mistake fails at import time with a hint, not at the first message.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from keyq.errors import EntityDefinitionError, UnknownEntityError, UnknownOperationError

JSON = Any  # a JSON value: dict, list, str, int, float, bool or None
HandlerResult = tuple[JSON, JSON]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_HANDLER_ATTR = "__keyq_handler__"
RESERVED_OP_PREFIX = "keyq."  # system messages (e.g. keyq.activate); never a user handler
_declared: list[type[Entity]] = []  # every Entity subclass, in declaration order

F = TypeVar("F", bound=Callable[..., Any])


def handler(name: str | Callable[..., Any] | None = None) -> Any:
    """Mark a method as the handler of an operation: ``@handler`` or ``@handler("op")``."""

    def mark(fn: F, op: str) -> F:
        if not isinstance(op, str) or not _NAME_RE.match(op):
            raise EntityDefinitionError(
                f"handler name {op!r} of {fn.__qualname__} must match {_NAME_RE.pattern}"
            )
        if op.startswith(RESERVED_OP_PREFIX):
            raise EntityDefinitionError(
                f"handler name {op!r} of {fn.__qualname__}: ops starting with "
                f"{RESERVED_OP_PREFIX!r} are reserved for keyq's system messages; rename it"
            )
        setattr(fn, _HANDLER_ATTR, op)
        return fn

    if callable(name):
        return mark(name, name.__name__)

    def decorator(fn: F) -> F:
        return mark(fn, fn.__name__ if name is None else name)

    return decorator


@dataclass(frozen=True)
class RestartPolicy:
    """Restart intensity of one entity type: at most max_restarts within within_seconds."""

    max_restarts: int
    within_seconds: float


class Entity:
    """Subclass this to declare an entity type.

    Class attributes:
      name           the entity type's name on the wire (lowercase, e.g. "cart")
      initial_state  the JSON state a key starts with
      max_restarts, within_seconds   restart intensity (None: the worker's defaults)
      always_on      the reconciler keeps such keys activated (device twins with timers)
    """

    name: ClassVar[str]
    initial_state: ClassVar[JSON] = None
    max_restarts: ClassVar[int | None] = None
    within_seconds: ClassVar[float | None] = None
    always_on: ClassVar[bool] = False
    handlers: ClassVar[dict[str, str]]  # op name -> method name, filled at class creation

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            raise EntityDefinitionError(
                f'{cls.__qualname__} needs a class attribute `name = "..."`'
            )
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise EntityDefinitionError(
                f"entity name {name!r} of {cls.__qualname__} must match {_NAME_RE.pattern}"
            )
        try:
            json.dumps(cls.initial_state, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise EntityDefinitionError(f"initial_state of entity {name!r} is not JSON: {e}") from e
        ops: dict[str, str] = {}
        for attr, value in inspect.getmembers(cls, inspect.isfunction):
            op = getattr(value, _HANDLER_ATTR, None)
            if op is None:
                continue
            if op in ops:
                raise EntityDefinitionError(
                    f"entity {name!r} declares handler {op!r} twice ({ops[op]} and {attr})"
                )
            params = list(inspect.signature(value).parameters)
            if len(params) != 3:
                raise EntityDefinitionError(
                    f"handler {name}.{op} must take (self, state, payload), got {params}"
                )
            ops[op] = attr
        if not ops:
            raise EntityDefinitionError(
                f"entity {name!r} has no handlers: decorate methods with @keyq.handler"
            )
        cls.handlers = ops
        _declared.append(cls)

    def initial(self) -> JSON:
        """A fresh copy of the initial state (so handlers may mutate what they get)."""
        return copy.deepcopy(self.initial_state)

    def on_activate(self, state: JSON) -> JSON:
        """Called when a key is activated with its loaded state; returns the state to use."""
        return state

    def on_passivate(self, state: JSON) -> None:
        """Called when an idle key is dropped from memory (its state is already durable)."""

    def restart_policy(self, default: RestartPolicy) -> RestartPolicy:
        return RestartPolicy(
            self.max_restarts if self.max_restarts is not None else default.max_restarts,
            self.within_seconds if self.within_seconds is not None else default.within_seconds,
        )


@dataclass(frozen=True)
class EntityType:
    """One registered entity: its singleton instance and the bound handler of each op."""

    name: str
    instance: Entity
    ops: dict[str, Callable[[JSON, JSON], HandlerResult]]

    def handler_for(self, op: str) -> Callable[[JSON, JSON], HandlerResult]:
        try:
            return self.ops[op]
        except KeyError:
            known = ", ".join(sorted(self.ops))
            raise UnknownOperationError(
                f"entity {self.name!r} has no operation {op!r}; known: {known}"
            ) from None


class EntityRegistry:
    """The entity types a producer may address and a worker may apply."""

    def __init__(self, classes: Iterable[type[Entity]]) -> None:
        self._types: dict[str, EntityType] = {}
        for cls in classes:
            if cls.name in self._types:
                other = type(self._types[cls.name].instance)
                if other is cls:
                    continue
                raise EntityDefinitionError(
                    f"entity name {cls.name!r} is declared twice: {other.__module__}."
                    f"{other.__qualname__} and {cls.__module__}.{cls.__qualname__}"
                )
            instance = cls()
            ops = {op: getattr(instance, attr) for op, attr in cls.handlers.items()}
            self._types[cls.name] = EntityType(cls.name, instance, ops)

    @classmethod
    def from_modules(cls, modules: Iterable[str]) -> EntityRegistry:
        """Import the modules and register every Entity subclass declared in them."""
        wanted: list[str] = []
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise EntityDefinitionError(
                    f"cannot import entity module {module!r} (KEYQ_ENTITY_MODULES): {e}"
                ) from e
            wanted.append(module)

        def selected(c: type[Entity]) -> bool:
            return any(c.__module__ == m or c.__module__.startswith(m + ".") for m in wanted)

        return cls(c for c in _declared if selected(c))

    def get(self, name: str) -> EntityType:
        try:
            return self._types[name]
        except KeyError:
            known = ", ".join(sorted(self._types)) or "none"
            raise UnknownEntityError(
                f"unknown entity {name!r}; registered: {known} (see KEYQ_ENTITY_MODULES)"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._types)

    def __contains__(self, name: object) -> bool:
        return name in self._types
