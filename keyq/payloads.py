"""Typed payloads: a handler's annotation turned into one validator for producer and worker.

A wrong payload (``{"amount": "ten"}``) used to be found only by the handler, in the worker, and
dead-lettered as a crash. When a handler annotates its payload (or state) with a pydantic model
or a dataclass, keyq builds a ``PayloadSpec`` from it at class definition: the producer validates
with it and publishes the canonical JSON form (``InvalidPayloadError`` before anything reaches
the broker), the worker validates again (a message from elsewhere) and hands the handler the
typed value. Untyped handlers get no spec and see plain JSON, as before.

pydantic (``pip install keyq[typed]``) does the validating; its JSON Schema of each payload is
what workers publish in the catalogue (keyq.catalogue), and ``SchemaSpec`` checks a payload
against such a schema for producers that do not import the entity code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Protocol, get_args

from keyq.errors import EntityDefinitionError, InvalidPayloadError

JSON = Any  # a JSON value (keyq.entity.JSON; repeated here to keep this module a leaf)


class PayloadSpec(Protocol):
    """Validates a payload and says what it looks like."""

    def to_python(self, value: object) -> Any:
        """Validate a JSON value (or an instance) and build the annotated type from it."""

    def to_json(self, value: object) -> JSON:
        """Validate and return the canonical JSON form (what goes on the wire)."""

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of the payload."""


def is_typed(annotation: object) -> bool:
    """Whether an annotation asks for validation: a pydantic model or a dataclass type."""
    if not isinstance(annotation, type):
        return False
    if dataclasses.is_dataclass(annotation):
        return True
    return any(
        c.__module__.startswith("pydantic") and c.__name__ == "BaseModel"
        for c in annotation.__mro__
    )


def spec_for(annotation: object, where: str) -> PayloadSpec | None:
    """The spec of a handler parameter's annotation, or None when it asks for no typing."""
    if not is_typed(annotation):
        return None
    try:
        import pydantic
    except ImportError as e:
        raise EntityDefinitionError(
            f"{where} is annotated with {getattr(annotation, '__name__', annotation)}: typed "
            "payloads are validated by pydantic; install it (pip install 'keyq[typed]')"
        ) from e
    return ModelSpec(annotation, pydantic)


class ModelSpec:
    """A pydantic model or dataclass, validated with pydantic's TypeAdapter."""

    def __init__(self, annotation: Any, pydantic: Any) -> None:
        self.annotation = annotation
        self.name = getattr(annotation, "__name__", str(annotation))
        self._adapter = pydantic.TypeAdapter(annotation)
        self._error = pydantic.ValidationError

    def to_python(self, value: object) -> Any:
        try:
            return self._adapter.validate_python(value)
        except self._error as e:
            raise InvalidPayloadError(f"payload does not match {self.name}: {_summary(e)}") from e

    def to_json(self, value: object) -> JSON:
        return self._adapter.dump_python(self.to_python(value), mode="json")

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = self._adapter.json_schema()
        return schema


def _summary(error: Any) -> str:
    parts = []
    for item in error.errors()[:5]:
        loc = ".".join(str(p) for p in item.get("loc", ())) or "(payload)"
        parts.append(f"{loc}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


def to_jsonable(value: object) -> JSON:
    """A handler's typed return (model or dataclass instance) as JSON; anything else as is."""
    if hasattr(value, "model_dump") and callable(value.model_dump):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        spec = spec_for(type(value), "a handler's returned dataclass")
        return spec.to_json(value) if spec is not None else dataclasses.asdict(value)
    return value


def returns_typed(annotation: object) -> bool:
    """Whether a return annotation like ``tuple[WalletState, int]`` names a typed value."""
    return any(is_typed(a) for a in get_args(annotation))


class SchemaSpec:
    """A payload checked against a JSON Schema from the catalogue (no entity code needed).

    Covers what pydantic emits for models and dataclasses: type, properties, required,
    additionalProperties, items, enum, const, anyOf/oneOf/allOf, $ref into $defs, and the
    numeric and length bounds. Anything else in a schema is not checked here; the worker, which
    has the model, checks it again."""

    def __init__(self, schema: Mapping[str, Any], name: str = "payload") -> None:
        self.schema = dict(schema)
        self.name = name

    def to_python(self, value: object) -> Any:
        problem = _check(self.schema, value, self.schema, "payload")
        if problem is not None:
            raise InvalidPayloadError(f"payload does not match {self.name}: {problem}")
        return value

    def to_json(self, value: object) -> JSON:
        return self.to_python(value)

    def json_schema(self) -> dict[str, Any]:
        return dict(self.schema)


_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _check(schema: Any, value: Any, root: Mapping[str, Any], path: str) -> str | None:
    """The first problem of value against schema, or None."""
    if schema is True or not isinstance(schema, Mapping):
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        problem = _check(target, value, root, path)
        if problem is not None:
            return problem
    for combo in ("anyOf", "oneOf"):
        options = schema.get(combo)
        if (
            isinstance(options, list)
            and options
            and all(_check(s, value, root, path) is not None for s in options)
        ):
            return f"{path}: matches none of the allowed shapes"
    for sub in schema.get("allOf", []) or []:
        problem = _check(sub, value, root, path)
        if problem is not None:
            return problem
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if isinstance(kind, str) else []
    if kinds and not any(_TYPES.get(k, lambda v: True)(value) for k in kinds):
        return f"{path}: expected {' or '.join(kinds)}, got {type(value).__name__}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path}: must be one of {schema['enum']}"
    if "const" in schema and value != schema["const"]:
        return f"{path}: must be {schema['const']!r}"
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        for bound, sign in (
            ("minimum", -1),
            ("maximum", 1),
            ("exclusiveMinimum", 0),
            ("exclusiveMaximum", 2),
        ):
            limit = schema.get(bound)
            if not isinstance(limit, int | float):
                continue
            if (
                (sign == -1 and value < limit)
                or (sign == 1 and value > limit)
                or (sign == 0 and value <= limit)
                or (sign == 2 and value >= limit)
            ):
                return f"{path}: {value} violates {bound} {limit}"
    if isinstance(value, str | list):
        lo, hi = ("minLength", "maxLength") if isinstance(value, str) else ("minItems", "maxItems")
        if isinstance(schema.get(lo), int) and len(value) < schema[lo]:
            return f"{path}: shorter than {schema[lo]}"
        if isinstance(schema.get(hi), int) and len(value) > schema[hi]:
            return f"{path}: longer than {schema[hi]}"
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            problem = _check(schema["items"], item, root, f"{path}[{i}]")
            if problem is not None:
                return problem
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name in schema.get("required", []) or []:
            if name not in value:
                return f"{path}.{name}: field required"
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                problem = _check(props[name], item, root, f"{path}.{name}")
            elif extra is False:
                problem = f"{path}.{name}: extra field not allowed"
            else:
                problem = _check(extra, item, root, f"{path}.{name}")
            if problem is not None:
                return problem
    return None
