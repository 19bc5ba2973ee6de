"""The producer API: send, call, read (and resolve) for (entity, key) pairs.

Everything is validated before anything is published: an unknown entity or operation, a bad
key, a non-JSON or oversize payload raise a typed ValidationError and publish nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import redis

from keyq import metrics
from keyq import reply as replies
from keyq.cache import StateCache
from keyq.celery_app import make_app
from keyq.connections import blocking_pop, redis_client
from keyq.entity import JSON, EntityRegistry
from keyq.envelope import Envelope, check_key, producer_envelope
from keyq.errors import (
    BrokerUnavailableError,
    CacheUnavailableError,
    CallTimeoutError,
    OverloadedError,
    PartialPublishError,
    ValidationError,
)
from keyq.lookup_stats import LookupStats
from keyq.publisher import Publisher
from keyq.registry import NameRegistry, Resolution
from keyq.scripts import register
from keyq.settings import Settings, redact_url

if TYPE_CHECKING:  # only reads that miss the cache need the database (and SQLAlchemy)
    from keyq.repo import Repo

log = logging.getLogger(__name__)


OVERLOAD_RETRY_MIN_S = 0.02  # send(wait=...) on an overloaded partition: first pause ...
OVERLOAD_RETRY_MAX_S = 0.5  # ... doubling up to this


class Client:
    """A producer: thread-safe, cheap to share; create one per process."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        registry: EntityRegistry | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.redis = redis_client(self.settings.redis_url, self.settings.timeouts)
        self.registry = registry or self._entities()
        self.app = make_app(self.settings, name="keyq-producer")
        self.broker = (
            self.redis
            if self.settings.broker_url == self.settings.redis_url
            else redis_client(self.settings.broker_url, self.settings.timeouts)
        )
        self.publisher = Publisher(self.broker, self.settings, self.app)
        self.cache = StateCache(self.redis, self.settings)
        self.names = NameRegistry(self.redis, self.settings)
        self.lookups = LookupStats(self.settings)  # resolve's figures, counted in Redis
        self._live = register(self.redis, "live_members")
        self._repo: Repo | None = None

    def _entities(self) -> EntityRegistry:
        """The entity modules named in the settings, or, with none, the catalogue the workers
        published (a producer that does not import the entity code)."""
        if self.settings.entity_modules:
            return EntityRegistry.from_modules(self.settings.entity_modules)
        from keyq.catalogue import load_registry

        try:
            return load_registry(self.redis, self.settings)
        except redis.RedisError as e:
            raise CacheUnavailableError(
                f"reading the entity catalogue from Redis at "
                f"{redact_url(self.settings.redis_url)} failed: {e}"
            ) from e

    @property
    def repo(self) -> Repo:
        if self._repo is None:  # only reads that miss the cache need the database
            from keyq.repo import Repo

            self._repo = Repo(self.settings.database_url, timeouts=self.settings.timeouts)
        return self._repo

    def close(self) -> None:
        if self.lookups.has_pending:  # the last lookups' latencies and failures
            try:
                pipe = self.redis.pipeline(transaction=False)
                self.lookups.add_to(pipe, lookup=False)
                pipe.execute()
            except redis.RedisError:
                pass  # figures only: closing never fails for them
        self.publisher.close()
        self.redis.close()
        if self.broker is not self.redis:
            self.broker.close()
        if self._repo is not None:
            self._repo.dispose()
        self.app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- building and publishing -----------------------------------------------------------

    def envelope(
        self,
        entity: str,
        key: str,
        op: str,
        payload: JSON = None,
        *,
        reply: bool = False,
        message_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Envelope:
        """Validate and build a message without publishing it."""
        return producer_envelope(
            self.registry,
            self.settings,
            entity,
            key,
            op,
            payload,
            reply=reply,
            message_id=message_id,
            idempotency_key=idempotency_key,
        )

    def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish envelopes of ONE partition as one broker message, in order."""
        if not envelopes:
            return
        partition = envelopes[0].partition
        if any(e.partition != partition for e in envelopes):
            raise ValueError("publish() takes envelopes of one partition; use send_many()")
        self.publisher.publish(envelopes)

    # --- the API ---------------------------------------------------------------------------

    def send(
        self,
        entity: str,
        key: str,
        op: str,
        payload: JSON = None,
        *,
        idempotency_key: str | None = None,
        wait: float = 0.0,
    ) -> str:
        """Enqueue a message for a key; returns its message id once the broker has it.

        With ``idempotency_key`` (a retried request's id) the same (entity, key, K) is applied
        once while its id is in the key's dedupe window (the last KEYQ_DEDUPE_WINDOW ids).
        A partition queue at KEYQ_MAX_QUEUE_DEPTH raises OverloadedError at once, or after
        waiting up to ``wait`` seconds for room."""
        env = self.envelope(entity, key, op, payload, idempotency_key=idempotency_key)
        self._publish_waiting(env, wait)
        return env.id

    def _publish_waiting(self, env: Envelope, wait: float) -> None:
        """Publish one envelope; while its partition is overloaded, retry until wait runs out."""
        deadline = time.monotonic() + wait
        pause = OVERLOAD_RETRY_MIN_S
        while True:
            try:
                self.publisher.publish([env])  # one envelope: one partition, no check needed
                return
            except OverloadedError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                time.sleep(min(pause, remaining))
                pause = min(OVERLOAD_RETRY_MAX_S, pause * 2)

    def send_many(
        self,
        entity: str,
        messages: Iterable[tuple[str, str, JSON] | tuple[str, str, JSON, str | None]],
    ) -> list[str]:
        """Enqueue many (key, op, payload) of one entity: one broker message per partition.

        Per-key order is kept within the call (each partition's messages keep their order)
        and across calls (a call publishes before it returns).
        """
        by_partition: dict[int, list[Envelope]] = {}
        ids: list[str] = []
        for key, op, payload, *idem in messages:  # (key, op, payload[, idempotency_key])
            env = self.envelope(entity, key, op, payload, idempotency_key=(idem or [None])[0])
            by_partition.setdefault(env.partition, []).append(env)
            ids.append(env.id)
        published: set[str] = set()
        for group in by_partition.values():
            for start in range(0, len(group), self.settings.batch_max):
                chunk = group[start : start + self.settings.batch_max]
                try:
                    self.publish(chunk)
                except BrokerUnavailableError as e:
                    if not published:
                        raise
                    unpublished = [i for i in ids if i not in published]
                    raise PartialPublishError(
                        f"{len(published)} of {len(ids)} message(s) were published before the "
                        f"broker failed ({e}); send only the unpublished ones again",
                        published=[i for i in ids if i in published],
                        unpublished=unpublished,
                    ) from e
                published.update(env.id for env in chunk)
        return ids

    def call(
        self,
        entity: str,
        key: str,
        op: str,
        payload: JSON = None,
        timeout: float | None = None,
        *,
        idempotency_key: str | None = None,
        wait: float = 0.0,
    ) -> JSON:
        """Send and wait for the handler's reply; typed errors for refusals and timeouts
        (``wait``: as for send, room on an overloaded partition before the call starts)."""
        timeout = self.settings.call_timeout_s if timeout is None else timeout
        if not timeout > 0:  # BLPOP's 0 means "wait forever"; NaN and negatives make no sense
            raise ValidationError(
                f"call timeout must be a positive number of seconds, got {timeout}"
            )
        env = self.envelope(entity, key, op, payload, reply=True, idempotency_key=idempotency_key)
        reply_key = self.settings.redis_key("reply", env.id)
        self._publish_waiting(env, wait)
        try:
            got = blocking_pop(self.redis, reply_key, timeout, self.settings.timeouts)
        except redis.RedisError as e:
            raise CacheUnavailableError(
                f"waiting for the reply of {env.id} failed, Redis at "
                f"{redact_url(self.settings.redis_url)}: {e}"
            ) from e
        if got is None:
            raise CallTimeoutError(
                f"no reply from {entity}/{key} {op} within {timeout:g}s "
                f"(message {env.id} may still be applied)"
            )
        if idempotency_key is not None:
            self._keep_reply(reply_key, got)
        return replies.decode(got, entity=entity, key=key, op=op, message_id=env.id)

    def _keep_reply(self, reply_key: str, got: bytes) -> None:
        """An idempotent call's reply goes back to the head of its list (for its reply TTL), so
        a retry of the same request (same idempotency key, so same message id) gets the same
        reply, not the worker's "already applied"."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.lpush(reply_key, got)
            pipe.pexpire(reply_key, replies.REPLY_TTL_MS)
            pipe.execute()
        except redis.RedisError as e:  # the caller has its reply; a retry learns less
            log.warning("keyq could not keep the reply of an idempotent call: %s", e)

    def read(self, entity: str, key: str) -> JSON:
        """The key's current state (cache, else Repo, then fill the cache); None if unknown.

        A hit is one Redis round trip (one script: the entry, hit/miss counters, last-read time
        and read count). A miss fills with compare-and-set, so it never overwrites a newer
        version written meanwhile.
        """
        self.registry.get(entity)
        check_key(key, self.settings.max_key_length)
        hit = self.cache.read(entity, key)
        if hit is not None:
            metrics.cache_reads.labels("hit").inc()
            return hit.state
        metrics.cache_reads.labels("miss").inc()
        stored = self.repo.load_one(entity, key)
        if stored is None:
            return None
        self.cache.put(entity, key, stored.version, stored.state)
        return stored.state

    def resolve(self, entity: str, key: str) -> Resolution:
        """Which node holds the key's activation now (or that it is not active).

        Counted in Redis by the lookup's own pipeline (keyq.lookup_stats), for the exporter."""
        self.registry.get(entity)
        started = time.perf_counter()
        failed = False
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self.names.name_key(entity, key))
            taken = self.lookups.add_to(pipe)
            try:
                node_raw = pipe.execute()[0]
            except redis.RedisError:
                self.lookups.give_back(taken)
                raise
            if node_raw is None:
                return Resolution(entity, key, None)
            node = node_raw.decode() if isinstance(node_raw, bytes) else str(node_raw)
            rows = self._live(
                keys=[self.settings.redis_key("members")], args=[self.settings.lease_ttl_ms]
            )
        except redis.RedisError as e:
            failed = True
            metrics.registry_lookup_failures.inc()
            raise CacheUnavailableError(f"registry lookup of {entity}/{key} failed: {e}") from e
        finally:
            elapsed = time.perf_counter() - started
            metrics.registry_lookup_seconds.observe(elapsed)
            self.lookups.done(elapsed, failed)
        ages = {rows[i].decode(): int(rows[i + 1]) for i in range(0, len(rows), 2)}
        if node not in ages:
            return Resolution(entity, key, None)  # its node is gone: a leftover name
        return Resolution(entity, key, node, ages[node])

    def queue_depths(self) -> dict[int, int]:
        pipe = self.redis.pipeline(transaction=False)
        for p in range(self.settings.partitions):
            pipe.llen(self.settings.queue_name(p))
        return dict(enumerate(int(n) for n in pipe.execute()))

    def info(self) -> dict[str, Any]:
        return {"settings": self.settings.safe_summary(), "entities": self.registry.names()}
