"""One exception hierarchy for keyq: every error a user can catch derives from KeyqError.

Errors from redis-py, SQLAlchemy and Celery are converted at the edge (``raise ... from e``)
so callers never need to import those libraries to handle a keyq failure.
"""

from __future__ import annotations

from typing import Any


class KeyqError(Exception):
    """Base class of every keyq error."""


# --- configuration -------------------------------------------------------------------------


class ConfigurationError(KeyqError):
    """A setting is missing, malformed or contradicts another one."""


class EntityDefinitionError(ConfigurationError):
    """An entity class is declared wrongly (bad name, handler or initial state)."""


# --- validation of producer input and wire messages --------------------------------------


class ValidationError(KeyqError):
    """Input was refused before anything was published."""


class UnknownEntityError(ValidationError):
    """The entity name is not registered (check KEYQ_ENTITY_MODULES)."""


class UnknownOperationError(ValidationError):
    """The entity has no handler registered under that operation name."""


class InvalidKeyError(ValidationError):
    """A key must be a non-empty string of at most the allowed length."""


class InvalidPayloadError(ValidationError):
    """The payload is not JSON-serialisable (NaN, bytes, objects ...)."""


class PayloadTooLargeError(InvalidPayloadError):
    """The encoded payload is larger than KEYQ_MAX_PAYLOAD_BYTES."""


class MalformedMessageError(ValidationError):
    """A message on the wire does not have keyq's envelope shape."""


# --- infrastructure ------------------------------------------------------------------------


class BrokerUnavailableError(KeyqError):
    """The broker (Redis) could not be reached; the message was not published."""


class PartialPublishError(BrokerUnavailableError):
    """send_many published some partitions' messages, then the broker failed: ``published``
    holds the ids that are on the broker (do not send them again), ``unpublished`` the rest."""

    def __init__(self, message: str, published: list[str], unpublished: list[str]) -> None:
        super().__init__(message)
        self.published = published
        self.unpublished = unpublished


class OverloadedError(BrokerUnavailableError):
    """A partition's queue is at KEYQ_MAX_QUEUE_DEPTH: the message was not published (send
    again later, or pass wait= to send/call to wait for room)."""

    def __init__(self, message: str, queue: str = "", depth: int = 0) -> None:
        super().__init__(message)
        self.queue = queue
        self.depth = depth


class NotReplicatedError(BrokerUnavailableError):
    """The primary took the message but fewer than KEYQ_PUBLISH_MIN_REPLICAS replicas confirmed
    it within KEYQ_PUBLISH_REPLICA_TIMEOUT_MS: it may still be applied, or be lost in a failover.
    Send it again with the same idempotency key to be sure: it is applied once either way."""

    def __init__(self, message: str, replicas: int = 0, required: int = 0) -> None:
        super().__init__(message)
        self.replicas = replicas
        self.required = required


class CacheUnavailableError(KeyqError):
    """The Redis used for the registry and cache could not be reached."""


class RepoError(KeyqError):
    """The Repo (SQL database) failed or could not be reached."""


class StaleWriteError(RepoError):
    """A write was refused: the Repo has seen a newer fencing token or version."""


class RepoDataError(RepoError):
    """The database refused the data itself (not an outage): retrying cannot help."""


# --- ownership -----------------------------------------------------------------------------


class OwnershipError(KeyqError):
    """A partition lease is not held by this node (any more)."""


# --- calls and handlers --------------------------------------------------------------------


class HandlerTimeoutError(KeyqError):
    """A handler ran longer than its entity's max_handler_seconds (it is dead-lettered)."""


class CallTimeoutError(KeyqError, TimeoutError):
    """No reply arrived within the timeout; the message may still be applied later."""


class HandlerError(KeyqError):
    """A handler did not produce a reply; carries what the worker reported."""

    def __init__(
        self,
        message: str,
        *,
        entity: str = "",
        key: str = "",
        op: str = "",
        message_id: str = "",
        exc_type: str = "",
    ) -> None:
        super().__init__(message)
        self.entity = entity
        self.key = key
        self.op = op
        self.message_id = message_id
        self.exc_type = exc_type

    def __reduce__(self) -> tuple[Any, ...]:  # keep picklability for tools that copy errors
        return (self.__class__, (str(self),), self.__dict__)


class Rejected(HandlerError):
    """A handler refused the message on purpose; the state is unchanged (see ``keyq.Reject``)."""


class HandlerCrashedError(HandlerError):
    """A handler raised; after the restart policy gave up, the message was dead-lettered."""


class NoHandlerContextError(KeyqError):
    """keyq.context.current() was called outside a running handler."""


class MessageRefusedError(HandlerError):
    """The worker refused a malformed message and dead-lettered it."""


class AlreadyAppliedError(HandlerError):
    """The message (its id, or its idempotency key) was applied before, exactly once; the
    reply of that first application is no longer available to this caller."""
