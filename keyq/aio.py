"""The asyncio producer: ``AsyncClient`` (send, call, read, resolve, send_many) on redis-py's
asyncio API, for FastAPI and other event-loop applications.

``Client.call`` blocks its thread on a BLPOP; in an event loop that stalls every request. Here a
call awaits a future, and ONE listener task per client waits for every pending reply at once:
a BLPOP over all waiting reply lists plus a private wake list (a new call pushes a token on it,
so the listener re-issues its BLPOP with the new key; a burst of calls costs one token), then
one pipelined LPOP sweep collects the other replies that arrived meanwhile (a group commit
answers many calls together). 1,000 concurrent calls use two Redis connections, not 1,000.

Everything else is the synchronous Client's: the same validation (keyq.envelope.producer_envelope,
typed payloads, idempotency keys) and typed errors, the same message bytes on the broker
(keyq.publisher, from Celery's own task protocol), the same cache and registry scripts.
A cache miss on ``read`` loads from the Repo in a thread (SQLAlchemy is synchronous).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool

from keyq import metrics
from keyq import reply as replies
from keyq.cache import member
from keyq.celery_app import make_app
from keyq.connections import is_sentinel_url, parse_sentinel_url, sentinel_kwargs
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
from keyq.publisher import MessageBuilder, not_replicated, wake_key
from keyq.registry import Resolution
from keyq.scripts import lua_source
from keyq.settings import Settings, redact_url

if TYPE_CHECKING:
    from keyq.repo import Repo

WAKE_TOKEN_TTL_MS = 60_000  # a wake token nobody popped (the listener ended) goes away


ASYNC_CLIENT_NAME = "keyq-aio"  # the name of every connection an AsyncClient opens
DEFAULT_MAX_CONNECTIONS = 16  # publishes in flight share these; more callers wait their turn


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A pool of connections to the Sentinel primary that waits for a free connection."""


def _async_redis(url: str, settings: Settings, max_connections: int = 1) -> aioredis.Redis:
    """A client whose pool never grows past max_connections: 1,000 concurrent sends wait for
    a free connection instead of opening 1,000. A sentinel:// URL gives a client of the
    current primary (each new connection asks the sentinels)."""
    timeouts = settings.timeouts
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": max(timeouts.redis_read_s, settings.call_timeout_s),
        "socket_connect_timeout": timeouts.redis_connect_s,
        "socket_timeout": timeouts.redis_read_s,
        "socket_keepalive": True,
        "client_name": ASYNC_CLIENT_NAME,  # `CLIENT LIST` tells an operator whose they are
    }
    if is_sentinel_url(url):
        target = parse_sentinel_url(url)
        sentinel = AsyncSentinel(  # type: ignore[no-untyped-call, unused-ignore]
            list(target.sentinels), sentinel_kwargs=sentinel_kwargs(timeouts)
        )
        if target.username:
            options["username"] = target.username
        if target.password is not None:
            options["password"] = target.password
        master = settings.sentinel_master
        pool: aioredis.ConnectionPool = _BlockingSentinelPool(  # type: ignore[no-untyped-call]
            master, sentinel, db=target.db, is_master=True, **options
        )
    else:
        pool = aioredis.BlockingConnectionPool.from_url(url, **options)
    client: aioredis.Redis = aioredis.Redis.from_pool(pool)  # closing it closes the pool
    return client


class _ReplyListener:
    """One task that waits for the replies of every pending call of a client."""

    def __init__(self, url: str, settings: Settings, nudge: aioredis.Redis) -> None:
        self._conn = _async_redis(url, settings)  # its own connection: it blocks
        self._nudge_client = nudge
        self._slice_s = settings.timeouts.blocking_slice_s
        self._wake = settings.redis_key("reply-listener", uuid.uuid4().hex)
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._blocked_on: frozenset[str] = frozenset()
        self._nudged = False
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.blpops = 0  # round trips, for tests and curiosity
        self.sweeps = 0

    async def wait(self, reply_key: str, timeout: float) -> bytes | None:
        """The reply pushed on reply_key, or None after timeout seconds."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[reply_key] = future
        try:
            self._start()
            if reply_key not in self._blocked_on and not self._nudged:
                self._nudged = True
                pipe = self._nudge_client.pipeline(transaction=False)
                pipe.lpush(self._wake, 1)
                pipe.ltrim(self._wake, 0, 0)
                pipe.pexpire(self._wake, WAKE_TOKEN_TTL_MS)
                await pipe.execute()
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(reply_key, None)

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="keyq-replies")

    async def _run(self) -> None:
        try:
            while True:
                # answered calls are out at once: a BLPOP on their key would take what comes
                # next there (an idempotent call puts its reply back for a retry)
                keys = [k for k, f in self._waiting.items() if not f.done()]
                if not keys:
                    break
                self._blocked_on = frozenset(keys)
                self._nudged = False
                got = await self._conn.blpop([*keys, self._wake], timeout=self._slice_s)
                self.blpops += 1
                if got is not None:
                    key = got[0].decode() if isinstance(got[0], bytes) else str(got[0])
                    value = got[1]
                    self._deliver(key, value if isinstance(value, bytes) else str(value).encode())
                if len(self._waiting) > 1:
                    await self._sweep()
        except Exception as e:  # Redis gone: every waiting call hears about it
            self.error = e
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(e)
        finally:
            self._blocked_on = frozenset()

    async def _sweep(self) -> None:
        """Collect, in one round trip, the replies that arrived beside the one BLPOP took."""
        keys = [k for k, f in self._waiting.items() if not f.done()]
        if not keys:
            return
        pipe = self._conn.pipeline(transaction=False)
        for key in keys:
            pipe.lpop(key)
        self.sweeps += 1
        for key, value in zip(keys, await pipe.execute(), strict=True):
            if value is not None:
                self._deliver(key, value)

    def _deliver(self, key: str, value: bytes) -> None:
        future = self._waiting.get(key)
        if future is not None and not future.done():
            future.set_result(value)
        # else: the wake token, or a reply whose call has timed out (dropped, as Client does)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._conn.aclose()


def _entities(settings: Settings) -> EntityRegistry:
    """The settings' entity modules, or with none the catalogue the workers published (read
    once, synchronously, at construction)."""
    if settings.entity_modules:
        return EntityRegistry.from_modules(settings.entity_modules)
    from keyq.client import Client

    with Client(settings) as client:
        return client.registry


class AsyncClient:
    """An asyncio producer; create one per process (or per event loop) and share it."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        registry: EntityRegistry | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.registry = registry or _entities(self.settings)
        self._app = make_app(self.settings, name="keyq-producer")  # task protocol only: no I/O
        self._builder = MessageBuilder(self._app)
        self.redis = _async_redis(self.settings.redis_url, self.settings, max_connections)
        self.broker = (
            self.redis
            if self.settings.broker_url == self.settings.redis_url
            else _async_redis(self.settings.broker_url, self.settings, max_connections)
        )
        self._replies = _ReplyListener(self.settings.redis_url, self.settings, self.redis)
        self._cache_read = self.redis.register_script(lua_source("cache_read"))
        self._live = self.redis.register_script(lua_source("live_members"))
        self._lookups = LookupStats(self.settings)  # resolve's figures, counted in Redis
        self._repo: Repo | None = None
        self._sync_cache: Any = None

    async def close(self) -> None:
        if self._lookups.has_pending:  # the last lookups' latencies and failures
            with contextlib.suppress(redis.RedisError, OSError):
                async with self.redis.pipeline(transaction=False) as pipe:
                    self._lookups.add_to(pipe, lookup=False)
                    await pipe.execute()
        await self._replies.close()
        if self.broker is not self.redis:
            await self.broker.aclose()
        await self.redis.aclose()
        if self._repo is not None:
            self._repo.dispose()
        self._app.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- building and publishing -----------------------------------------------------------

    def envelope(
        self,
        entity: str,
        key: str,
        op: str,
        payload: JSON = None,
        *,
        reply: bool = False,
        idempotency_key: str | None = None,
    ) -> Envelope:
        """Validate and build a message without publishing it (as Client.envelope)."""
        return producer_envelope(
            self.registry,
            self.settings,
            entity,
            key,
            op,
            payload,
            reply=reply,
            idempotency_key=idempotency_key,
        )

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish envelopes of ONE partition as one broker message, in order."""
        if not envelopes:
            return
        partition = envelopes[0].partition
        if any(e.partition != partition for e in envelopes):
            raise ValueError("publish() takes envelopes of one partition; use send_many()")
        queue = self.settings.queue_name(partition)
        wires = [e.to_wire() for e in envelopes]
        message = self._builder.message(
            wires, queue, envelopes[0].id if len(envelopes) == 1 else None
        )
        queue_key, wake, payload = queue, wake_key(queue), json.dumps(message)
        limit = self.settings.max_queue_depth
        replicas = self.settings.publish_min_replicas
        acked = 0
        try:
            if replicas:
                # the script and WAIT in one pipeline: one connection, so WAIT counts this
                # publish's write (on another connection it would wait for nothing of ours)
                timeout_ms = self.settings.publish_replica_timeout_ms
                async with self.broker.pipeline(transaction=False) as pipe:
                    pipe.eval(lua_source("publish"), 2, queue_key, wake, payload, limit)
                    pipe.execute_command("WAIT", replicas, timeout_ms)
                    pushed_raw, acked_raw = await pipe.execute()
                pushed, acked = int(pushed_raw), int(acked_raw)
            else:
                pushed = int(
                    await self.broker.eval(
                        lua_source("publish"), 2, queue_key, wake, payload, limit
                    )
                )
        except (redis.RedisError, OSError) as e:
            raise BrokerUnavailableError(
                f"could not publish {len(envelopes)} message(s) to partition {partition}: {e}"
            ) from e
        if replicas and pushed >= 0 and acked < replicas:
            raise not_replicated(queue, acked, replicas, self.settings.publish_replica_timeout_ms)
        if pushed < 0:
            raise OverloadedError(
                f"partition queue {queue} holds {-1 - pushed} messages (KEYQ_MAX_QUEUE_DEPTH="
                f"{limit}): the workers are behind; the message was not published",
                queue=queue,
                depth=-1 - pushed,
            )

    # --- the API ---------------------------------------------------------------------------

    async def send(
        self,
        entity: str,
        key: str,
        op: str,
        payload: JSON = None,
        *,
        idempotency_key: str | None = None,
    ) -> str:
        """Enqueue a message; returns its id once the broker has it (see Client.send)."""
        env = self.envelope(entity, key, op, payload, idempotency_key=idempotency_key)
        await self.publish([env])
        return env.id

    async def send_many(
        self,
        entity: str,
        messages: Iterable[tuple[str, str, JSON] | tuple[str, str, JSON, str | None]],
    ) -> list[str]:
        """Enqueue many (key, op, payload[, idempotency_key]) of one entity: one broker message
        per partition (per batch), per-key order kept; PartialPublishError as Client's."""
        by_partition: dict[int, list[Envelope]] = {}
        ids: list[str] = []
        for key, op, payload, *idem in messages:
            env = self.envelope(entity, key, op, payload, idempotency_key=(idem or [None])[0])
            by_partition.setdefault(env.partition, []).append(env)
            ids.append(env.id)
        published: set[str] = set()
        for group in by_partition.values():
            for start in range(0, len(group), self.settings.batch_max):
                chunk = group[start : start + self.settings.batch_max]
                try:
                    await self.publish(chunk)
                except BrokerUnavailableError as e:
                    if not published:
                        raise
                    raise PartialPublishError(
                        f"{len(published)} of {len(ids)} message(s) were published before the "
                        f"broker failed ({e}); send only the unpublished ones again",
                        published=[i for i in ids if i in published],
                        unpublished=[i for i in ids if i not in published],
                    ) from e
                published.update(env.id for env in chunk)
        return ids

    async def call(
        self,
        entity: str,
        key: str,
        op: str,
        payload: JSON = None,
        timeout: float | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> JSON:
        """Send and await the handler's reply (Rejected, HandlerCrashedError, CallTimeoutError
        ... as Client.call); the event loop runs on meanwhile."""
        timeout = self.settings.call_timeout_s if timeout is None else timeout
        if not timeout > 0:
            raise ValidationError(
                f"call timeout must be a positive number of seconds, got {timeout}"
            )
        env = self.envelope(entity, key, op, payload, reply=True, idempotency_key=idempotency_key)
        reply_key = self.settings.redis_key("reply", env.id)
        waiter = asyncio.ensure_future(self._replies.wait(reply_key, timeout))
        try:
            await self.publish([env])
        except BaseException:
            waiter.cancel()
            raise
        try:
            got = await waiter
        except (redis.RedisError, OSError) as e:
            raise CacheUnavailableError(
                f"waiting for the reply of {env.id} failed, Redis at "
                f"{redact_url(self.settings.redis_url)}: {e}"
            ) from e
        if got is None:
            raise CallTimeoutError(
                f"no reply from {entity}/{key} {op} within {timeout:g}s "
                f"(message {env.id} may still be applied)"
            )
        if idempotency_key is not None:  # as Client.call: a retry gets this same reply
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.lpush(reply_key, got)
                pipe.pexpire(reply_key, replies.REPLY_TTL_MS)
                await pipe.execute()
            except (redis.RedisError, OSError):
                pass  # the caller has its reply; a retry is told "already applied"
        return replies.decode(got, entity=entity, key=key, op=op, message_id=env.id)

    async def read(self, entity: str, key: str) -> JSON:
        """The key's current state: cache (one script, as Client.read), else Repo in a thread
        and fill the cache (compare-and-set by version); None if unknown."""
        self.registry.get(entity)
        check_key(key, self.settings.max_key_length)
        m = member(entity, key)
        prefix = self.settings.redis_key("c") + ":"
        try:
            got = await self._cache_read(
                keys=[
                    prefix + m,
                    self.settings.redis_key("cache", "recency"),
                    self.settings.redis_key("cache", "reads"),
                    self.settings.redis_key("stats", "cache"),
                ],
                args=[m],
            )
        except redis.RedisError as e:
            raise CacheUnavailableError(f"cache read of {entity}/{key} failed: {e}") from e
        if got:
            metrics.cache_reads.labels("hit").inc()
            return json.loads(got[1])
        metrics.cache_reads.labels("miss").inc()
        return await asyncio.to_thread(self._load_and_fill, entity, key)

    def _load_and_fill(self, entity: str, key: str) -> JSON:
        from keyq.cache import StateCache
        from keyq.connections import redis_client
        from keyq.repo import Repo

        if self._repo is None:
            self._repo = Repo(self.settings.database_url, timeouts=self.settings.timeouts)
            self._sync_cache = StateCache(
                redis_client(self.settings.redis_url, self.settings.timeouts), self.settings
            )
        stored = self._repo.load_one(entity, key)
        if stored is None:
            return None
        self._sync_cache.put(entity, key, stored.version, stored.state)
        return stored.state

    async def resolve(self, entity: str, key: str) -> Resolution:
        """Which node holds the key's activation now (or that it is not active)."""
        self.registry.get(entity)
        started = time.perf_counter()
        failed = False
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(self.settings.redis_key("n", entity, key))
                taken = self._lookups.add_to(pipe)  # counted in Redis (keyq.lookup_stats)
                try:
                    raw = (await pipe.execute())[0]
                except redis.RedisError:
                    self._lookups.give_back(taken)
                    raise
            if raw is None:
                return Resolution(entity, key, None)
            node = raw.decode() if isinstance(raw, bytes) else str(raw)
            rows = await self._live(
                keys=[self.settings.redis_key("members")], args=[self.settings.lease_ttl_ms]
            )
        except redis.RedisError as e:
            failed = True
            metrics.registry_lookup_failures.inc()
            raise CacheUnavailableError(f"registry lookup of {entity}/{key} failed: {e}") from e
        finally:
            elapsed = time.perf_counter() - started
            metrics.registry_lookup_seconds.observe(elapsed)
            self._lookups.done(elapsed, failed)
        ages = {rows[i].decode(): int(rows[i + 1]) for i in range(0, len(rows), 2)}
        if node not in ages:
            return Resolution(entity, key, None)
        return Resolution(entity, key, node, ages[node])

    @property
    def listener_round_trips(self) -> int:
        """BLPOPs and sweeps the shared reply listener has made (each one connection)."""
        return self._replies.blpops + self._replies.sweeps
