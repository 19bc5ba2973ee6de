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
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from keyq.errors import (
    EntityDefinitionError,
    InvalidPayloadError,
    MalformedMessageError,
    UnknownEntityError,
    UnknownOperationError,
)
from keyq.payloads import PayloadSpec, returns_typed, spec_for, to_jsonable
from keyq.supervisor import SupervisionPolicy

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
      max_restarts, within_seconds   restart intensity per key (None: the worker's defaults)
      backoff_min_s, backoff_max_s   waits between restarts (None: the worker's defaults)
      max_handler_seconds            a handler running longer is stopped and its message
                                     dead-lettered (None: the worker's default; 0: no limit)
      always_on      the reconciler keeps such keys activated (device twins with timers)
    """

    name: ClassVar[str]
    initial_state: ClassVar[JSON] = None
    max_restarts: ClassVar[int | None] = None
    within_seconds: ClassVar[float | None] = None
    backoff_min_s: ClassVar[float | None] = None
    backoff_max_s: ClassVar[float | None] = None
    max_handler_seconds: ClassVar[float | None] = None
    always_on: ClassVar[bool] = False
    handlers: ClassVar[dict[str, str]]  # op name -> method name, filled at class creation
    # op name -> validator of its payload / state, from the handler's annotations (typed ops)
    payload_specs: ClassVar[dict[str, PayloadSpec]]
    state_specs: ClassVar[dict[str, PayloadSpec]]
    typed_returns: ClassVar[frozenset[str]]  # ops whose handler may return models

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
        if "initial_state" in cls.__dict__:  # a model instance is stored as its JSON form
            cls.initial_state = to_jsonable(cls.initial_state)
        try:
            json.dumps(cls.initial_state, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise EntityDefinitionError(f"initial_state of entity {name!r} is not JSON: {e}") from e
        ops: dict[str, str] = {}
        payload_specs: dict[str, PayloadSpec] = {}
        state_specs: dict[str, PayloadSpec] = {}
        typed_returns: set[str] = set()
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
            hints = _hints(value)
            where = f"handler {name}.{op}"
            for param, specs in ((params[2], payload_specs), (params[1], state_specs)):
                spec = spec_for(hints.get(param), f"{where} ({param})")
                if spec is not None:
                    specs[op] = spec
            if returns_typed(hints.get("return")):
                typed_returns.add(op)
        if not ops:
            raise EntityDefinitionError(
                f"entity {name!r} has no handlers: decorate methods with @keyq.handler"
            )
        cls.handlers = ops
        cls.payload_specs = payload_specs
        cls.state_specs = state_specs
        cls.typed_returns = frozenset(typed_returns)
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

    def supervision(self, default: SupervisionPolicy) -> SupervisionPolicy:
        """The worker's supervision defaults with this entity's overrides applied."""
        restart = self.restart_policy(RestartPolicy(default.max_restarts, default.within_seconds))

        def pick(value: float | None, fallback: float) -> float:
            return fallback if value is None else float(value)

        return SupervisionPolicy(
            max_restarts=restart.max_restarts,
            within_seconds=restart.within_seconds,
            backoff_min_s=pick(self.backoff_min_s, default.backoff_min_s),
            backoff_max_s=pick(self.backoff_max_s, default.backoff_max_s),
            max_handler_seconds=pick(self.max_handler_seconds, default.max_handler_seconds),
        )


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """A handler's resolved annotations; {} when they cannot be resolved (then it is untyped,
    as before typed payloads existed: annotations were never required to resolve)."""
    try:
        return typing.get_type_hints(fn)
    except Exception:
        return {}


def _typed_handler(
    fn: Callable[[Any, Any], Any], payload: PayloadSpec | None, state: PayloadSpec | None
) -> Callable[[JSON, JSON], HandlerResult]:
    """The handler as the worker calls it, with JSON in and out: the payload (and state) are
    validated and built into their annotated types; a returned model becomes JSON."""

    def run(state_json: JSON, payload_json: JSON) -> HandlerResult:
        out = fn(
            state_json if state is None else state.to_python(state_json),
            payload_json if payload is None else payload.to_python(payload_json),
        )
        if isinstance(out, tuple) and len(out) == 2:
            return to_jsonable(out[0]), to_jsonable(out[1])
        return typing.cast(HandlerResult, out)  # the applier reports the wrong shape

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    return run


@dataclass(frozen=True)
class EntityType:
    """One registered entity: its singleton instance and the bound handler of each op.

    ``payloads`` holds the validator of each typed op (from annotations, or from a published
    catalogue's JSON Schema for producers without the entity code)."""

    name: str
    instance: Entity
    ops: dict[str, Callable[[JSON, JSON], HandlerResult]]
    payloads: Mapping[str, PayloadSpec] = field(default_factory=dict)

    def prepare_payload(self, op: str, payload: JSON) -> JSON:
        """A producer's payload, validated against its op's type and in canonical JSON form
        (InvalidPayloadError otherwise); an untyped op's payload as it is."""
        spec = self.payloads.get(op)
        return payload if spec is None else spec.to_json(payload)

    def check_wire_payload(self, op: str, payload: JSON) -> None:
        """A worker's check of a payload from the wire: MalformedMessageError if it does not
        match the op's type (dead-lettered as malformed, never run as a crash)."""
        spec = self.payloads.get(op)
        if spec is not None:
            try:
                spec.to_python(payload)
            except InvalidPayloadError as e:
                raise MalformedMessageError(f"{self.name}.{op}: {e}") from e

    def handler_for(self, op: str) -> Callable[[JSON, JSON], HandlerResult]:
        try:
            return self.ops[op]
        except KeyError:
            known = ", ".join(sorted(self.ops))
            raise UnknownOperationError(
                f"entity {self.name!r} has no operation {op!r}; known: {known}"
            ) from None


def _bound_handler(instance: Entity, op: str) -> Callable[[JSON, JSON], HandlerResult]:
    cls = type(instance)
    fn: Callable[[JSON, JSON], HandlerResult] = getattr(instance, cls.handlers[op])
    payload, state = cls.payload_specs.get(op), cls.state_specs.get(op)
    if payload is None and state is None and op not in cls.typed_returns:
        return fn  # untyped: called exactly as before
    return _typed_handler(fn, payload, state)


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
            ops = {op: _bound_handler(instance, op) for op in cls.handlers}
            self._types[cls.name] = EntityType(cls.name, instance, ops, dict(cls.payload_specs))

    @classmethod
    def of_types(cls, types: Iterable[EntityType]) -> EntityRegistry:
        """A registry of ready-made entity types (e.g. from a published catalogue)."""
        registry = cls(())
        for entity_type in types:
            registry._types[entity_type.name] = entity_type
        return registry

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
