# mypy: disable-error-code="no-untyped-call"
# (kombu's Redis transport is untyped; this module is the only one that subclasses it)
"""kombu's Redis transport with the two fixes that keyq's guarantees need.

1. No message in limbo (G3, G6). Stock kombu fetches with BRPOP, which removes the message from
   Redis when the server answers; it is written to the ``unacked`` hash only after the worker has
   read and parsed the reply. A kill -9 in between loses the message for good (measured: about
   one kill in four under load). This transport fetches with a Lua script that pops the message
   AND records it in ``unacked``/``unacked_index`` in one atomic step, so a dead owner's message
   is always found by the next owner's restore. Lua cannot block, so an idle worker waits with
   BRPOP on small "wake" lists that this transport's producers push beside every message (at
   most one token each). A message published without one (plain Celery, another language) is
   found at the next tick: a thread of the channel pushes a token on the channel's own wake
   list every BRPOP_TIMEOUT_S (50 ms). A BRPOP timeout alone would not do: Redis ends blocking
   waits at its own cron tick (``hz`` 10: 100 ms), so a 50 ms timeout took 100 ms.
2. Undeliverable partition messages go back to the HEAD. When a consumer stops consuming a
   queue while a fetch that names it is in flight, stock kombu "requeues the undeliverable
   message" at the TAIL, behind newer messages of the same keys. For keyq's partition queues
   this transport pushes it back at the head (the right end, popped next), with a new tag.
3. Nothing unreadable reaches Celery. A message that kombu or Celery could not decode (not
   JSON, an unknown body encoding, content type, compression or task) used to raise outside
   Celery's task handling and end the worker process, on every node it was restored to. The
   fetch moves such a message to its queue's poison list instead (keyq.mailbox dead-letters it).
4. keyq.mailbox settles partition messages itself (it claims them into the partition's
   in-flight list), so Celery's ack or reject of one touches nothing in Redis; control replies
   (consumed without acks: `celery inspect`, Flower) are never recorded as unacked.

What a message must look like, and what happens to it, is keyq.mailbox's business; this module
only does kombu's part of it.

``SentinelTransport`` is the same on Redis Sentinel (``sentinel://`` broker URLs): kombu's
SentinelChannel finds the primary through the sentinels, keyq's Channel does the fetching and
publishing above it. After a failover the rebuilt channel asks the sentinels again, and the
fetch script is loaded again on the promoted replica (NOSCRIPT is handled as after a restart).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from queue import Empty
from time import monotonic
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import NoScriptError

from keyq import resp
from keyq.celery_app import BRPOP_TIMEOUT_S, DISPATCH_TASK, TICK_OPTION
from keyq.connections import SENTINEL_DEFAULT_PORT
from keyq.fetch_claims import ClaimPlan, FetchClaims
from keyq.learned import LearnedGuess
from keyq.mailbox import (
    DEFAULT_QUEUE_TASKS,
    PARTITION_TASKS,
    decode_document,
    is_partition_queue,
    poison_key,
    redelivered,
)
from keyq.publisher import not_replicated, overloaded
from keyq.scripts import composed_source, lua_source

log = logging.getLogger(__name__)

WAKE_SUFFIX = ":wake"  # beside each queue list: a one-token list that wakes idle consumers
MAX_DEPTH_OPTION = "keyq_max_queue_depth"  # transport option: refuse publishes past this depth
MIN_REPLICAS_OPTION = "keyq_min_replicas"  # ... a partition publish WAITs for this many replicas
REPLICA_TIMEOUT_OPTION = "keyq_replica_timeout_ms"  # ... for at most this long


def wake_key(queue_key: str) -> str:
    return queue_key + WAKE_SUFFIX


class QoS(kombu_redis.QoS):
    """kombu's QoS without its second write of what the atomic fetch already recorded, and
    without any Redis write for the ack of a partition message (keyq.mailbox settled it)."""

    def _settled_by_mailbox(self, delivery_tag: str) -> bool:
        message = self._delivered.get(delivery_tag)
        info = getattr(message, "delivery_info", None) or {}
        return is_partition_queue(str(info.get("routing_key") or ""))

    def ack(self, delivery_tag: str) -> None:
        if self._settled_by_mailbox(delivery_tag):
            virtual.QoS.ack(self, delivery_tag)  # in-memory bookkeeping only
            return
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if self._settled_by_mailbox(delivery_tag):
            virtual.QoS.ack(self, delivery_tag)  # never to the tail: the mailbox decides
            return
        super().reject(delivery_tag, requeue=requeue)

    def append(self, message: Any, delivery_tag: str) -> None:
        recorded: set[str] = self.channel._keyq_recorded
        if delivery_tag in recorded:
            recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # in-memory bookkeeping only
            return
        super().append(message, delivery_tag)


TICK_FALLBACK_S = 1.0  # the wake BRPOP's own timeout: the ticker, not Redis, paces the waits
PACKED_COMMANDS = 256  # packed fetch and wait commands a channel keeps (one per queue order)
TICK_TTL_MS = 2000  # a dead channel's tick list goes away by itself
TICK_ABANDONED_S = 5.0  # a ticker whose channel has not waited this long ends


class _Ticker:
    """Pushes a token on a channel's own wake list every `period` seconds, on its own
    connection, so an idle consumer looks at its queues that often whatever Redis's hz. It
    ends by itself once the channel has not waited for TICK_ABANDONED_S (a channel dropped
    without close()); the channel starts a new one at its next wait."""

    def __init__(self, pool: Any, key: str, period: float) -> None:
        self.key = key
        self._client = redis.Redis(connection_pool=pool)
        self._period = period
        self._stop = threading.Event()
        self.last_wait = monotonic()  # the channel's last wake wait (set by it)
        self._thread = threading.Thread(target=self._run, name="keyq-wake-tick", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            if monotonic() - self.last_wait > TICK_ABANDONED_S:
                break
            try:
                pipe = self._client.pipeline(transaction=False)
                pipe.lpush(self.key, 1)
                pipe.ltrim(self.key, 0, 0)
                pipe.pexpire(self.key, TICK_TTL_MS)
                pipe.execute()
            except redis.RedisError:  # the broker is away: the consumer's own wait falls back
                self._stop.wait(TICK_FALLBACK_S)
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self._client.delete(self.key)

    def stop(self) -> None:
        self._stop.set()


class Channel(kombu_redis.Channel):
    """Fetches atomically into ``unacked``; producers leave a wake token beside each message."""

    QoS = QoS

    _keyq_fetch_next = True  # the next poll fetches (True) or waits for a wake token (False)
    _keyq_waiting = False  # the command in flight is the wake BRPOP
    # After a delivery that emptied its queue, fetching again at once pays off only if a message
    # arrived while the batch ran: under a steady stream it mostly has (a wake wait would cost a
    # round trip more), for one caller's sequential calls never (the fetch finds nothing). So
    # the consumer learns which (keyq.learned), else waits for a wake token.
    _keyq_speculating = False  # the fetch in flight was sent on that guess
    _keyq_guess: LearnedGuess | None = None  # made with the first delivery that emptied a queue
    _keyq_sha: str | None = None
    _keyq_publish: Any = None  # the publish script, registered on first use
    _keyq_ticker: _Ticker | None = None  # started with the first wait
    # a worker's claim plans (keyq.fetch_claims): its partitions' messages are claimed by the
    # fetch itself and handed to it directly; None (producers, `celery inspect`): none
    keyq_claims: FetchClaims | None = None
    _keyq_sent_plans: dict[str, ClaimPlan] = {}  # the plans the fetch in flight was sent with

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._keyq_recorded: set[str] = set()  # tags fetch.lua already wrote to ``unacked``
        self._keyq_noack: set[str] = set()  # queues consumed without acks (control replies)
        self._keyq_packed: dict[tuple[object, ...], Any] = {}  # fetch and wait commands, packed
        self._keyq_frames = resp.Fragments()  # their arguments, each framed once
        super().__init__(*args, **kwargs)
        options = self.connection.client.transport_options or {}
        self._keyq_max_depth = int(options.get(MAX_DEPTH_OPTION, 0) or 0)
        self._keyq_min_replicas = int(options.get(MIN_REPLICAS_OPTION, 0) or 0)
        self._keyq_replica_timeout_ms = int(options.get(REPLICA_TIMEOUT_OPTION, 0) or 0)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        self._keyq_packed.clear()  # a queue's acked flag is in its packed fetch
        if no_ack:
            self._keyq_noack.add(queue)
        else:
            self._keyq_noack.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    # --- producer side ---------------------------------------------------------------------

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        pri = self._get_message_priority(message, reverse=False)
        key = self._q_for_pri(queue, pri)
        batch = kwargs.get("_publish_batch")
        if batch is not None or (self._expires and queue in self._expires):
            super()._put(queue, message, **kwargs)
            if batch is not None:
                batch.add("lpush", wake_key(key), 1)
                batch.add("ltrim", wake_key(key), 0, 0)
            else:
                with self.conn_or_acquire() as client:
                    client.pipeline(transaction=False).lpush(wake_key(key), 1).ltrim(
                        wake_key(key), 0, 0
                    ).execute()
            return
        partition = is_partition_queue(queue)
        limit = self._keyq_max_depth if partition else 0
        if partition and self._keyq_min_replicas:
            self._keyq_put_durable(queue, key, dumps(message), limit)
            return
        with self.conn_or_acquire() as client:
            if self._keyq_publish is None:
                self._keyq_publish = client.register_script(lua_source("publish"))
            # the message first, then the token that wakes; refused at the depth limit
            pushed = int(
                self._keyq_publish(
                    keys=[key, wake_key(key)], args=[dumps(message), limit], client=client
                )
            )
        if pushed < 0:
            raise overloaded(queue, -1 - pushed, limit)

    def _keyq_put_durable(self, queue: str, key: str, payload: str, limit: int) -> None:
        """A keyq.dispatch sent with Celery's send_task (``Client.app``, ``celery call``,
        kombu) under KEYQ_PUBLISH_MIN_REPLICAS: the publish script and WAIT in one pipeline,
        so on one connection (WAIT counts that connection's writes), as keyq.publisher does.
        NotReplicatedError when fewer replicas confirm it in time. Only partition queues:
        beat's maintenance tasks are sent again every period, a lost one costs nothing."""
        replicas = self._keyq_min_replicas
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            pipe.eval(lua_source("publish"), 2, key, wake_key(key), payload, limit)
            pipe.execute_command("WAIT", replicas, self._keyq_replica_timeout_ms)
            pushed, acked = (int(x) for x in pipe.execute())
        if pushed < 0:
            raise overloaded(queue, -1 - pushed, limit)
        if acked < replicas:
            raise not_replicated(queue, acked, replicas, self._keyq_replica_timeout_ms)

    # --- consumer side ---------------------------------------------------------------------

    def _keyq_script(self) -> str:
        if self._keyq_sha is None:
            source = composed_source("fetch", "drain", "nonempty")
            self._keyq_sha = self.client.script_load(source)
        return self._keyq_sha

    def _brpop_start(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        sha: str | None = None
        tick: str | None = None
        if self._keyq_fetch_next:
            sha = self._keyq_script()  # before _in_poll: may use the connection itself
            claims = self.keyq_claims
            ident: tuple[object, ...] = (sha, claims.version if claims else -1, *queues)
        else:
            period = float(self.connection.client.transport_options.get(TICK_OPTION) or 0)
            tick = self._keyq_tick_key(period) if period > 0 else None
            ident = (tick, timeout, *queues)
        # the same few commands go out again and again: each is packed once per order of the
        # queue cycle (70 arguments took a tenth of an idle worker's CPU per message); a
        # delivery moves its queue to the end of the cycle, so the orders are many, and a new
        # one is joined from arguments framed before (keyq.resp), not packed anew
        packed = self._keyq_packed.get(ident)
        if packed is None:
            packed = self._keyq_pack(queues, timeout, sha, tick)
            if len(self._keyq_packed) >= PACKED_COMMANDS:
                self._keyq_packed.clear()
            self._keyq_packed[ident] = packed
        self._keyq_waiting = not self._keyq_fetch_next
        if self.keyq_claims is not None:  # what a claim in its reply was made under
            self._keyq_sent_plans = self.keyq_claims.plans
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        self.client.connection.send_packed_command(packed)

    def _keyq_pack(
        self, queues: list[str], timeout: float | None, sha: str | None, tick: str | None
    ) -> list[bytes]:
        """The fetch script `sha` (or, without one, the BRPOP on the wake lists and the
        channel's tick list) for these queues in this order, packed for the wire."""
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        if sha is not None:
            acked = [
                queue not in self._keyq_noack for _pri in self.priority_steps for queue in queues
            ]
            plan_keys: list[str] = []
            args: list[str | int] = [0, 0, 0, 0, *("1" if a else "0" for a in acked)]
            if self.keyq_claims is not None:
                plan_keys, args = self.keyq_claims.fetch_args(keys, acked)
            command = [
                "EVALSHA",
                sha,
                len(keys) + 2 + len(plan_keys),
                *keys,
                self.unacked_key,
                self.unacked_index_key,
                *plan_keys,
                *args,
            ]
        elif tick is not None:  # a worker's consumer: its ticker paces the looks
            command = ["BRPOP", *(wake_key(k) for k in keys), tick, TICK_FALLBACK_S]
        else:  # a short-lived consumer (control replies): the wait's own timeout
            command = ["BRPOP", *(wake_key(k) for k in keys), timeout or 0]
        if self.global_keyprefix:
            command = self.client._prefix_args(command)
        return [self._keyq_frames.command(command)]

    def _keyq_tick_key(self, period: float) -> str:
        """This channel's own wake list (unprefixed, as the BRPOP's other keys), its ticker
        started on first use."""
        ticker = self._keyq_ticker
        if ticker is None or not ticker.running:
            key = f"keyq.tick.{uuid.uuid4().hex}"
            ticker = _Ticker(self.pool, (self.global_keyprefix or "") + key, period)
            self._keyq_ticker, self._keyq_tick_name = ticker, key
        ticker.last_wait = monotonic()
        return self._keyq_tick_name

    def close(self) -> None:
        if self._keyq_ticker is not None:
            self._keyq_ticker.stop()
        super().close()

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                reply = self.client.parse_response(
                    self.client.connection,
                    "BRPOP" if self._keyq_waiting else "EVALSHA",
                    **options,
                )
            except NoScriptError:
                self._keyq_sha = None  # Redis restarted or flushed its scripts: load again
                self._keyq_fetch_next = True
                raise Empty() from None
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if self._keyq_waiting:
                self._keyq_fetch_next = True  # woken, or timed out: look now either way
                raise Empty()
            if self._keyq_speculating and self._keyq_guess is not None:
                self._keyq_speculating = False
                self._keyq_guess.learn(bool(reply))
            if not reply:
                self._keyq_fetch_next = False
                raise Empty()
            dest, item, recorded, left = reply[:4]
            if not left:  # that queue is empty now: fetch again or wait (see above)
                if self._keyq_guess is None:
                    self._keyq_guess = LearnedGuess()
                self._keyq_fetch_next = self._keyq_speculating = self._keyq_guess.ask()
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            if recorded == 2:  # not kombu's format: now on the poison list
                log.warning("keyq moved an unreadable message to %s", poison_key(dest))
                raise Empty()
            if recorded in (3, 4):
                self._keyq_claimed(dest, item, recorded, reply[4:])
                return bool(recorded == 3)
            payload = loads(bytes_to_str(item))
            tag = _recorded_tag(payload)
            if recorded == 1 and tag is not None:
                if self._keyq_quarantined(dest, payload, item, tag):
                    raise Empty()
                self._keyq_recorded.add(tag)
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()

    def _keyq_claimed(self, queue: str, item: bytes, status: int, steps: list[Any]) -> None:
        """What the fetch claimed (3) goes to the worker, or back to its queue head if this
        consumer has left the queue since the fetch went out (a cancel, a settle before the
        leases are released); 4: the lease was not the plan's (the message is back already)."""
        claims = self.keyq_claims
        plan = self._keyq_sent_plans.get(queue)
        if claims is None or plan is None:  # cannot happen: only a plan makes the fetch claim
            log.error("keyq fetch claimed a message of %s without a claim plan", queue)
            return
        try:
            if status == 4:
                claims.lost(queue, plan)
            elif queue not in self.connection._callbacks:
                claims.give_back(queue, plan, False)
            else:
                claims.deliver(queue, bytes(item), claims.claimed(steps), plan)
        except Exception:
            # never left in the in-flight list while the lease is ours: the batch after the
            # next fetch would settle (delete) them with its own
            # (a delivery that failed: counted, so a message that always fails is
            # dead-lettered after KEYQ_MAX_DELIVERIES instead of coming back for ever)
            log.exception("keyq could not take what the fetch claimed of %s", queue)
            claims.give_back(queue, plan, True)

    def _keyq_quarantined(self, queue: str, payload: Any, item: bytes, tag: str) -> bool:
        """Move a recorded message that Celery could not run to the poison list."""
        tasks = PARTITION_TASKS if is_partition_queue(queue) else DEFAULT_QUEUE_TASKS
        delivery = decode_document(payload, bytes(item), tasks, DISPATCH_TASK)
        if delivery.problem is None:
            return False
        log.warning(
            "keyq moved an unusable message to %s message_id=%s problem=%s",
            poison_key(queue),
            delivery.message_id,
            delivery.problem,
        )
        self.client.eval(
            lua_source("quarantine"),
            3,
            self.unacked_key,
            self.unacked_index_key,
            poison_key(queue),
            tag,
            item,
        )
        return True

    def settle_in_flight(self) -> None:
        """Read a fetch still in flight, so its message reaches its consumer or goes back to
        its queue head now; a wake wait in flight holds no message and is left to close()."""
        if self._in_poll and not self._keyq_waiting:
            with contextlib.suppress(Empty):
                self._brpop_read()


def _recorded_tag(payload: Any) -> str | None:
    """The delivery tag of a kombu payload: a JSON object whose properties hold a string."""
    if isinstance(payload, dict):
        props = payload.get("properties")
        if isinstance(props, dict) and isinstance(props.get("delivery_tag"), str):
            return str(props["delivery_tag"])
    return None


class Transport(kombu_redis.Transport):
    """Redis transport: atomic fetch, and undeliverable partition messages back at the head."""

    Channel = Channel
    # kombu reads the wait from this attribute (its "brpop_timeout" transport option is not
    # applied): an idle consumer looks at its queues at least this often
    brpop_timeout = BRPOP_TIMEOUT_S  # type: ignore[assignment]  # kombu declares an int

    def _reject_inbound_message(self, raw_message: Any) -> None:
        props = raw_message.get("properties", {}) if isinstance(raw_message, dict) else {}
        queue = props.get("delivery_info", {}).get("routing_key", "")
        tag = props.get("delivery_tag")
        if not is_partition_queue(queue):
            super()._reject_inbound_message(raw_message)  # to the tail, as kombu does
            return
        for channel in self.channels:
            if channel:
                pipe = channel.client.pipeline(transaction=True)
                pipe.rpush(queue, redelivered(dumps(raw_message), bump=False))
                if tag is not None:  # the fetch recorded it as unacked: it is not any more
                    pipe.hdel(channel.unacked_key, tag)
                    pipe.zrem(channel.unacked_index_key, tag)
                pipe.execute()
                log.info("keyq returned a message to the head of %s (no consumer here now)", queue)
                return
        super()._reject_inbound_message(raw_message)


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """keyq's fetch and publish on a connection pool that follows the Sentinel primary."""


class SentinelTransport(Transport):
    """keyq's transport on Redis Sentinel: ``sentinel://host:port[;sentinel://...]/db`` with
    the ``master_name`` transport option (keyq.connections sets it from KEYQ_SENTINEL_MASTER)."""

    Channel = SentinelChannel
    default_port = SENTINEL_DEFAULT_PORT  # type: ignore[assignment]  # kombu declares None
