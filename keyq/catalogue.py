"""The entity catalogue: what the workers can apply, published in Redis for producers.

A producer used to need the entity code (KEYQ_ENTITY_MODULES) just to validate what it sends.
Each worker publishes, at start, the entities it loaded: their ops, each op's payload JSON
Schema (from a typed handler's annotation; none for an untyped one) and a version (a digest of
the description, so a producer can tell that it changed). It goes into one Redis hash per
deployment, ``<ns>:catalogue``, a field per entity, so workers of a rolling deploy overwrite
only what they describe. A producer built from the catalogue (``load_registry``, or
``client(settings)``) validates entity, op, key and payload exactly as with the code, and
``keyq schema`` prints it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import redis

from keyq.client import Client
from keyq.connections import redis_client
from keyq.entity import JSON, Entity, EntityRegistry, EntityType, HandlerResult
from keyq.errors import CacheUnavailableError, ConfigurationError
from keyq.payloads import PayloadSpec, SchemaSpec
from keyq.settings import Settings

if TYPE_CHECKING:
    from keyq.aio import AsyncClient

log = logging.getLogger(__name__)

CATALOGUE_FORMAT = 1  # the layout of one entity's description (bumped on incompatible change)


def catalogue_key(settings: Settings) -> str:
    return settings.redis_key("catalogue")


def describe_entity(entity_type: EntityType) -> dict[str, Any]:
    """One entity as the catalogue holds it (JSON), with its version digest."""
    ops = {
        op: {"payload_schema": _schema(entity_type.payloads.get(op))}
        for op in sorted(entity_type.ops)
    }
    body = {
        "format": CATALOGUE_FORMAT,
        "entity": entity_type.name,
        "ops": ops,
        "always_on": bool(entity_type.instance.always_on),
    }
    digest = hashlib.blake2b(
        json.dumps(body, sort_keys=True).encode("utf-8"), digest_size=8
    ).hexdigest()
    return {**body, "version": digest}


def _schema(spec: PayloadSpec | None) -> dict[str, Any] | None:
    return None if spec is None else spec.json_schema()


def describe(registry: EntityRegistry) -> dict[str, dict[str, Any]]:
    """Every entity of a registry, by name."""
    return {name: describe_entity(registry.get(name)) for name in registry.names()}


def publish(
    client: redis.Redis, settings: Settings, registry: EntityRegistry, node: str = ""
) -> dict[str, dict[str, Any]]:
    """Write the registry's entities into the deployment's catalogue (one round trip)."""
    entities = describe(registry)
    if not entities:
        return entities
    stamp = {"published_by": node, "published_at": time.time()}
    fields = {name: json.dumps({**doc, **stamp}) for name, doc in entities.items()}
    try:
        client.hset(catalogue_key(settings), mapping=fields)  # type: ignore[arg-type]
    except redis.RedisError as e:
        raise CacheUnavailableError(f"publishing the entity catalogue failed: {e}") from e
    return entities


def publish_at_start(
    client: redis.Redis, settings: Settings, registry: EntityRegistry, node: str
) -> None:
    """The worker's start: publish, and never stop a worker over it (logged)."""
    try:
        entities = publish(client, settings, registry, node)
        log.info("keyq catalogue published node=%s entities=%s", node, ",".join(entities))
    except Exception as e:
        log.error("keyq could not publish the entity catalogue node=%s error=%s", node, e)


def load(client: redis.Redis, settings: Settings) -> dict[str, dict[str, Any]]:
    """The published catalogue by entity name ({} if no worker has published one)."""
    try:
        raw = client.hgetall(catalogue_key(settings))
    except redis.RedisError as e:
        raise CacheUnavailableError(f"reading the entity catalogue failed: {e}") from e
    out: dict[str, dict[str, Any]] = {}
    for name, doc in raw.items():
        entity = name.decode() if isinstance(name, bytes) else str(name)
        try:
            parsed = json.loads(doc)
        except ValueError:
            log.warning("keyq catalogue entry of %s is not JSON; ignored", entity)
            continue
        if isinstance(parsed, dict) and parsed.get("format") == CATALOGUE_FORMAT:
            out[entity] = parsed
    return out


def _not_here(state: JSON, payload: JSON) -> HandlerResult:
    raise RuntimeError("a catalogue entity has no handler code: it only validates producers")


def registry_from(catalogue: Mapping[str, Mapping[str, Any]]) -> EntityRegistry:
    """A producer's registry built from a catalogue: the same checks as with the code (the
    payload of a typed op against its JSON Schema), no handler to run."""
    types = []
    for name, doc in catalogue.items():
        ops = doc.get("ops") or {}
        payloads: dict[str, PayloadSpec] = {
            op: SchemaSpec(spec["payload_schema"], f"{name}.{op}")
            for op, spec in ops.items()
            if isinstance(spec, dict) and isinstance(spec.get("payload_schema"), dict)
        }
        types.append(EntityType(name, Entity(), {op: _not_here for op in ops}, payloads))
    return EntityRegistry.of_types(types)


def load_registry(client: redis.Redis, settings: Settings) -> EntityRegistry:
    """The published catalogue as a registry; ConfigurationError if none was published."""
    catalogue = load(client, settings)
    if not catalogue:
        raise ConfigurationError(
            f"no entity catalogue in Redis under {catalogue_key(settings)!r}: start a worker "
            "(it publishes one) or give the producer KEYQ_ENTITY_MODULES"
        )
    return registry_from(catalogue)


def _registry(settings: Settings) -> EntityRegistry:
    conn = redis_client(settings.redis_url, settings.timeouts)
    try:
        return load_registry(conn, settings)
    finally:
        conn.close()


def client(settings: Settings | None = None) -> Client:
    """A keyq.Client that validates against the published catalogue (no entity code)."""
    settings = settings or Settings.from_env()
    return Client(settings, registry=_registry(settings))


def async_client(settings: Settings | None = None) -> AsyncClient:
    """A keyq.aio.AsyncClient that validates against the published catalogue."""
    from keyq.aio import AsyncClient

    settings = settings or Settings.from_env()
    return AsyncClient(settings, registry=_registry(settings))
