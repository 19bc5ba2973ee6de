"""keyq: per-key stateful workers on Celery (registry, supervisor, repo, cache, reconciler)."""

from keyq.aio import AsyncClient
from keyq.client import Client
from keyq.entity import Entity, EntityRegistry, handler
from keyq.errors import (
    AlreadyAppliedError,
    BrokerUnavailableError,
    CacheUnavailableError,
    CallTimeoutError,
    ConfigurationError,
    EntityDefinitionError,
    HandlerCrashedError,
    HandlerError,
    InvalidKeyError,
    InvalidPayloadError,
    KeyqError,
    MessageRefusedError,
    NoHandlerContextError,
    OverloadedError,
    PartialPublishError,
    PayloadTooLargeError,
    Rejected,
    RepoDataError,
    RepoError,
    StaleWriteError,
    UnknownEntityError,
    UnknownOperationError,
    ValidationError,
)
from keyq.settings import Settings

Reject = Rejected  # what a handler raises to refuse a message without changing state

__all__ = [
    # producing
    "AsyncClient",
    "Client",
    # declaring entities
    "Entity",
    "EntityRegistry",
    "Reject",
    "handler",
    # configuration
    "Settings",
    # errors
    "BrokerUnavailableError",
    "CacheUnavailableError",
    "CallTimeoutError",
    "ConfigurationError",
    "EntityDefinitionError",
    "HandlerCrashedError",
    "HandlerError",
    "InvalidKeyError",
    "InvalidPayloadError",
    "KeyqError",
    "MessageRefusedError",
    "AlreadyAppliedError",
    "NoHandlerContextError",
    "OverloadedError",
    "PartialPublishError",
    "PayloadTooLargeError",
    "Rejected",
    "RepoDataError",
    "RepoError",
    "StaleWriteError",
    "UnknownEntityError",
    "UnknownOperationError",
    "ValidationError",
]
