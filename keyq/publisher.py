"""The one way keyq puts a keyq.dispatch message on a partition queue.

Used by the Client, the AsyncClient, the worker (timer fires, re-routes) and the reconciler. It
writes Celery's own message format, exactly what ``app.send_task(...)`` writes through keyq's
transport (protocol 2 headers from Celery's ``as_task_v2``, kombu's base64 body and properties),
so Flower, ``celery inspect`` and any Celery worker still read it, and it does so in ONE Redis
round trip: a Lua script pushes the message and its wake token, refusing it when the queue is at
KEYQ_MAX_QUEUE_DEPTH.

Celery's ``send_task`` spends most of a send in work keyq does not need per message: a
``saferepr`` of the arguments for the headers, a redis-py pipeline object with its response
callbacks, kombu's message assembly. Here the headers and properties are built once per thread
from Celery's own ``as_task_v2`` and only the per-message fields are filled in; the arguments'
display form (``argsrepr``, what Flower shows) is a short summary, "entity/key op" and a count.
The Redis command around the message is packed once per queue, and ids come from a per-thread
pool of the OS's random bytes: what is left per send is the message's own fields and one write.
Retries (a lost connection, three tries) and typed errors live here, in one place.

Durable publish (KEYQ_PUBLISH_MIN_REPLICAS=N): Redis replicates asynchronously, so a primary
that dies right after answering can take the last messages with it when Sentinel promotes a
replica. With N > 0 the script is followed by ``WAIT N timeout`` in the same write to the same
connection (WAIT counts that connection's writes), and a send returns only once N replicas hold
the message; fewer within KEYQ_PUBLISH_REPLICA_TIMEOUT_MS raises NotReplicatedError.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii
from typing import Any

import redis

from keyq import resp
from keyq.celery_app import DISPATCH_TASK
from keyq.envelope import Envelope, random_id
from keyq.errors import BrokerUnavailableError, NotReplicatedError, OverloadedError
from keyq.scripts import lua_source, register
from keyq.settings import Settings, redact_url

WAKE_SUFFIX = ":wake"  # beside each queue: the one-token list that wakes idle consumers
PUBLISH_TRIES = 3  # a send is tried this often while the broker connection fails ...
PUBLISH_RETRY_S = (0.1, 0.3)  # ... waiting this long between tries
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}  # Celery's 3rd arg
COMMAND_CACHE_SIZE = 4096  # packed command heads kept per publisher (one per queue and limit)

# The body Celery writes, json.dumps([[wires], {}, EMBED]), around the encoded wires: json.dumps
# is compositional, so only the wires are encoded per message
_BODY_HEAD = "[["
_BODY_TAIL = "], {}, " + json.dumps(EMBED) + "]"
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}  # RFC 4122 variant digit


def uuid4_text() -> str:
    """str(uuid.uuid4())'s text (version 4, RFC 4122 variant, 122 random bits) without building a
    UUID object, for Celery's task ids and kombu's delivery tags (the key of a message in the
    unacked hash, so unique per message)."""
    h = random_id()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


def wake_key(queue: str) -> str:
    return queue + WAKE_SUFFIX


def argsrepr(wires: Sequence[object]) -> str:
    """What Flower and `celery inspect` show as the task's arguments."""
    first = wires[0] if wires and isinstance(wires[0], dict) else {}
    more = f" (+{len(wires) - 1} more)" if len(wires) > 1 else ""
    return f"{first.get('entity')}/{first.get('key')} {first.get('op')}{more}"


class MessageBuilder:
    """Celery protocol 2 messages of keyq.dispatch, from a template made by Celery itself."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._local = threading.local()

    def _template(self) -> tuple[dict[str, Any], dict[str, Any]]:
        cached: tuple[dict[str, Any], dict[str, Any]] | None = getattr(self._local, "t", None)
        if cached is None:
            headers, properties, _body, _sent = self._app.amqp.as_task_v2(
                "template",
                DISPATCH_TASK,
                args=[[]],
                kwargs={},
                origin=f"gen{os.getpid()}@{socket.gethostname()}",
                ignore_result=None,  # what send_task passes when the caller gives none
                argsrepr="",
                kwargsrepr="{}",
            )
            properties = {
                **properties,
                "reply_to": str(properties.get("reply_to") or self._app.thread_oid),
                "delivery_mode": 2,
                "priority": 0,
                "body_encoding": "base64",
            }
            cached = (headers, properties)
            self._local.t = cached
        return cached

    def text(
        self,
        wires: Sequence[object],
        queue: str,
        task_id: str | None = None,
        extra_headers: dict[str, Any] | None = None,
    ) -> str:
        """The same message as ``message``, as the JSON text that goes on the queue."""
        encoded: _Encoded | None = getattr(self._local, "encoded", None)
        if encoded is None:
            encoded = _Encoded(*self._template())
            self._local.encoded = encoded
        body = _BODY_HEAD + json.dumps(wires if isinstance(wires, list) else list(wires))
        body_b64 = binascii.b2a_base64((body + _BODY_TAIL).encode("utf-8"), newline=False)
        extra = json.dumps(extra_headers)[1:-1] + ", " if extra_headers else ""
        return encoded.text(
            body_b64.decode("ascii"),
            task_id or uuid4_text(),
            argsrepr(wires),
            queue,
            uuid4_text(),
            extra,
        )

    def message(
        self,
        wires: Sequence[object],
        queue: str,
        task_id: str | None = None,
        extra_headers: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """kombu's Redis message (a JSON object) of one keyq.dispatch carrying envelopes
        (their wire form)."""
        headers, properties = self._template()
        task_id = task_id or uuid4_text()
        body = json.dumps([[list(wires)], {}, EMBED])
        return {
            "body": base64.b64encode(body.encode("utf-8")).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                **headers,
                "id": task_id,
                "root_id": task_id,
                "argsrepr": argsrepr(wires),
                **(extra_headers or {}),
            },
            "properties": {
                **properties,
                "correlation_id": task_id,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "delivery_tag": uuid4_text(),
            },
        }


_PER_MESSAGE_HEADERS = ("id", "root_id", "argsrepr")
_PER_MESSAGE_PROPERTIES = ("correlation_id", "delivery_info", "delivery_tag")


class _Encoded:
    """The JSON text of a message with its per-message fields left open: encoding only those
    per send is most of what separates keyq's producer from Celery's."""

    def __init__(self, headers: dict[str, Any], properties: dict[str, Any]) -> None:
        rest_h = {k: v for k, v in headers.items() if k not in _PER_MESSAGE_HEADERS}
        rest_p = {k: v for k, v in properties.items() if k not in _PER_MESSAGE_PROPERTIES}
        self.headers_tail = json.dumps(rest_h)[1:]  # '"lang": ..., ...}' (never empty here)
        self.properties_tail = json.dumps(rest_p)[1:]

    def text(
        self, body_b64: str, task_id: str, shown: str, queue: str, tag: str, extra: str
    ) -> str:
        tid = encode_basestring_ascii(task_id)  # json.dumps of a str, without its dispatch
        return (
            f'{{"body": "{body_b64}", "content-encoding": "utf-8", '
            f'"content-type": "application/json", '
            f'"headers": {{"id": {tid}, "root_id": {tid}, '
            f'"argsrepr": {encode_basestring_ascii(shown)}, '
            f"{extra}{self.headers_tail}, "
            f'"properties": {{"correlation_id": {tid}, '
            f'"delivery_info": {{"exchange": "", '
            f'"routing_key": {encode_basestring_ascii(queue)}}}, '
            f'"delivery_tag": "{tag}", {self.properties_tail}}}'
        )


class Publisher:
    """Publishes envelopes of one partition as one broker message, in one round trip."""

    def __init__(self, broker: redis.Redis, settings: Settings, app: Any) -> None:
        self.broker = broker
        self.settings = settings
        self.builder = MessageBuilder(app)
        self._script = register(broker, "publish")  # loads the script (its sha is used below)
        self._sha = self._script.sha.encode() if self._script.sha else b""
        self._local = threading.local()  # one broker connection per producing thread
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        # (script sha, queue, depth limit) -> the packed command around its message
        self._commands: dict[tuple[bytes, str, int], tuple[bytes, bytes]] = {}

    def publish(
        self,
        envelopes: Sequence[Envelope],
        *,
        depth_limit: bool = True,
        extra_headers: dict[str, Any] | None = None,
    ) -> None:
        """BrokerUnavailableError when the broker cannot be reached, OverloadedError when the
        partition is at KEYQ_MAX_QUEUE_DEPTH (depth_limit=False: a worker's own publishes)."""
        if not envelopes:
            return
        first = envelopes[0]
        if len(envelopes) == 1:  # a send: its message carries the envelope's id as task id
            self.publish_raw(
                first.partition, [first.to_wire()], first.id, depth_limit, extra_headers
            )
            return
        partition = first.partition
        if any(e.partition != partition for e in envelopes):
            raise ValueError("publish() takes envelopes of one partition; use send_many()")
        wires = [e.to_wire() for e in envelopes]
        self.publish_raw(partition, wires, None, depth_limit, extra_headers)

    def publish_raw(
        self,
        partition: int,
        wires: Sequence[object],
        task_id: str | None = None,
        depth_limit: bool = True,
        extra_headers: dict[str, Any] | None = None,
    ) -> None:
        """Envelopes in their wire form (a worker moving what another producer sent)."""
        queue = self.settings.queue_name(partition)
        limit = self.settings.max_queue_depth if depth_limit else 0
        payload = self.builder.text(wires, queue, task_id, extra_headers)
        pushed = self._push_with_retries(queue, payload, limit, len(wires), partition)
        if pushed < 0:
            raise overloaded(queue, -1 - pushed, limit)

    def _push_with_retries(
        self, queue: str, payload: str, limit: int, count: int, partition: int
    ) -> int:
        for attempt in range(PUBLISH_TRIES):
            try:
                return self._push(queue, payload, limit)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                self._drop_connection()
                if attempt + 1 >= PUBLISH_TRIES:
                    raise BrokerUnavailableError(
                        f"could not publish {count} message(s) to partition {partition}, "
                        f"broker at {redact_url(self.settings.broker_url)}: {e}"
                    ) from e
                time.sleep(PUBLISH_RETRY_S[min(attempt, len(PUBLISH_RETRY_S) - 1)])
            except redis.RedisError as e:
                raise BrokerUnavailableError(
                    f"could not publish {count} message(s) to partition {partition}: {e}"
                ) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _push(self, queue: str, payload: str, limit: int, loaded: bool = False) -> int:
        """EVALSHA of the publish script on this thread's own connection, packed by hand: the
        generic command path of redis-py costs more CPU than the round trip itself. With
        KEYQ_PUBLISH_MIN_REPLICAS, a WAIT in the same write (NotReplicatedError if short)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.broker.connection_pool.make_connection()
            # connect() before the first write: a Sentinel connection asks the sentinels for
            # the primary there (writing first would connect to its default, localhost:6379)
            conn.connect()  # type: ignore[no-untyped-call]
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        if not self._sha:
            self._sha = self.broker.script_load(lua_source("publish")).encode()
        replicas = self.settings.publish_min_replicas
        head, tail = self._command(queue, limit)
        message = payload.encode("utf-8", "surrogatepass")
        command = b"%s$%d\r\n%s%s" % (head, len(message), message, tail)
        conn.send_packed_command([command], check_health=False)
        try:
            pushed = int(conn.read_response())
        except redis.exceptions.NoScriptError:  # Redis restarted, failed over or flushed scripts
            if replicas:
                conn.read_response()  # the WAIT's answer: nothing of ours to wait for
            if loaded:
                raise
            self._sha = self.broker.script_load(lua_source("publish")).encode()
            return self._push(queue, payload, limit, loaded=True)
        if replicas:
            acked = int(conn.read_response())
            if pushed >= 0 and acked < replicas:
                raise not_replicated(
                    queue, acked, replicas, self.settings.publish_replica_timeout_ms
                )
        return pushed

    def _command(self, queue: str, limit: int) -> tuple[bytes, bytes]:
        """The RESP bytes of EVALSHA publish (and WAIT) before and after the message's own bulk
        string: per queue and limit they never change, so they are packed once."""
        cache_key = (self._sha, queue, limit)
        parts = self._commands.get(cache_key)
        if parts is None:
            arguments = (b"EVALSHA", self._sha, b"2", queue.encode(), wake_key(queue).encode())
            head = b"*7\r\n" + b"".join(map(resp.bulk, arguments))  # then the message, the limit
            tail = b"\r\n" + resp.bulk(str(limit).encode())  # the message's own bulk string ends
            replicas = self.settings.publish_min_replicas
            if replicas:
                timeout_ms = self.settings.publish_replica_timeout_ms
                tail += resp.command((b"WAIT", str(replicas).encode(), str(timeout_ms).encode()))
            if len(self._commands) >= COMMAND_CACHE_SIZE:
                self._commands.clear()
            parts = self._commands[cache_key] = (head, tail)
        return parts

    def _drop_connection(self) -> None:
        """Close this thread's connection; the next push opens (and connects) a new one."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.disconnect()
            self._local.conn = None
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.disconnect()
            self._connections.clear()


def not_replicated(queue: str, acked: int, required: int, timeout_ms: int) -> NotReplicatedError:
    """What a durable publish raises when WAIT counted fewer replicas than required."""
    return NotReplicatedError(
        f"the message on {queue} reached the primary but {acked} of the {required} "
        f"replica(s) KEYQ_PUBLISH_MIN_REPLICAS asks for confirmed it within "
        f"{timeout_ms} ms: it may be applied, or lost in a failover; "
        "send it again with the same idempotency key",
        replicas=acked,
        required=required,
    )


def overloaded(queue: str, depth: int, limit: int) -> OverloadedError:
    return OverloadedError(
        f"partition queue {queue} holds {depth} messages (KEYQ_MAX_QUEUE_DEPTH={limit}): "
        "the workers are behind; the message was not published",
        queue=queue,
        depth=depth,
    )
