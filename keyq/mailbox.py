"""The mailbox: keyq's whole conversation with the broker about partition queues.

A partition's messages live in exactly one place at a time, and this module is what moves them:

    queue (Redis list)  --fetch-->  unacked (kombu's hash + index, keyq.transport's atomic fetch)
    unacked  --claim-->  in-flight list (one per partition, guarded by the partition's lease)
    queue    --drain-->  in-flight list (the rest of a batch, also lease-guarded)
    in-flight  --settle-->  gone (after the batch's commit: its effect is in the Repo)
    in-flight / unacked  --requeue / restore-->  back at the queue HEAD, in original order

A message that cannot be applied at all (not JSON, not kombu's format, an unknown encoding,
compression, content type or task, too big) is never handed to Celery: the transport's fetch
moves it to the queue's poison list, and the partition's owner dead-letters it with its raw bytes.

Celery's own ack of a partition message touches nothing in Redis (keyq.transport): the claim
already took the message out of ``unacked``, so an old owner's late ack can never delete a new
owner's record of the same message. Every message put back at the head gets a new delivery tag
for the same reason, and a delivery count in its headers (``keyq-deliveries``): a message that
keeps failing (a poison pill that kills the process, a batch that keeps raising) is applied alone
from its second redelivery on (once redelivered, as after a takeover, it still shares a batch
with others redelivered at most once), and dead-lettered once it reaches ``KEYQ_MAX_DELIVERIES``.
"""

from __future__ import annotations

import base64
import bz2
import json
import lzma
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from keyq import fast_json
from keyq.celery_app import BRPOP_TIMEOUT_S, CACHE_SWEEP_TASK, DISPATCH_TASK, RECONCILE_TASK
from keyq.publisher import uuid4_text
from keyq.scripts import register, register_composed
from keyq.settings import Settings

KOMBU_UNACKED = "unacked"  # kombu's Redis transport: delivered-but-unacked messages (hash) ...
KOMBU_UNACKED_INDEX = "unacked_index"  # ... and their delivery times (sorted set)
KOMBU_UNACKED_MUTEX = "unacked_mutex"  # kombu's lock around its visibility-timeout restore
DELIVERIES_HEADER = "keyq-deliveries"  # earlier deliveries of this message that ended unapplied
REROUTED_HEADER = "keyq-rerouted"  # the message was moved once from a queue that was not its own
POISON_SUFFIX = ":poison"  # beside each queue: messages that cannot be applied, awaiting a DLQ
# A handoff waits this long for a fetch already sent for a cancelled queue to come back
HANDOFF_GRACE_S = BRPOP_TIMEOUT_S + 0.2
DRAIN_STEP = 64  # broker messages taken per drain round trip
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a broker message's body after decompression, at most
MAX_ENVELOPES_PER_MESSAGE = 4096  # envelopes in one broker message, at most
JSON_CONTENT_TYPE = "application/json"
PARTITION_TASKS = (DISPATCH_TASK,)  # what a partition queue may carry
DEFAULT_QUEUE_TASKS = (DISPATCH_TASK, RECONCILE_TASK, CACHE_SWEEP_TASK)  # keyq's default queue
# kombu's compression names -> a bounded decompressor
_DECOMPRESSORS: dict[str, Callable[[], Any]] = {
    "application/x-gzip": lambda: zlib.decompressobj(),
    "zlib": lambda: zlib.decompressobj(),
    "application/x-bz2": bz2.BZ2Decompressor,
    "bzip2": bz2.BZ2Decompressor,
    "application/x-lzma": lzma.LZMADecompressor,
    "lzma": lzma.LZMADecompressor,
}


def partition_of_queue(settings: Settings, queue: str) -> int | None:
    """The partition a queue name belongs to ('<namespace>.p<i>'), or None."""
    prefix = f"{settings.namespace}.p"
    if queue.startswith(prefix) and queue[len(prefix) :].isdigit():
        p = int(queue[len(prefix) :])
        return p if p < settings.partitions else None
    return None


def is_partition_queue(queue: str) -> bool:
    """Any namespace's partition queue (the transport knows no Settings)."""
    head, sep, tail = queue.rpartition(".p")
    return bool(sep and head and tail.isdigit())


def poison_key(queue: str) -> str:
    return queue + POISON_SUFFIX


# --- decoding Celery's message format -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One broker message as the mailbox read it: its envelopes, or why it cannot be applied."""

    raw: bytes
    envelopes: tuple[object, ...] = ()
    task: str | None = None
    message_id: str = ""
    deliveries: int = 0  # earlier deliveries that ended without the message being applied
    rerouted: bool = False
    problem: str | None = None  # set: the message can never be applied (dead-letter it)

    @property
    def raw_b64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")


def _b(value: object) -> bytes:
    """A redis-py reply item as bytes."""
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")


def _as_bytes(raw: bytes | str) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")


def _decompress(body: bytes, method: str, limit: int) -> bytes:
    make = _DECOMPRESSORS.get(method)
    if make is None:
        raise ValueError(f"unknown compression {method!r}")
    out: bytes = make().decompress(body, limit + 1)
    if len(out) > limit:
        raise ValueError(f"body is larger than {limit} bytes once decompressed")
    return out


def read_document(raw: bytes | str) -> dict[str, Any] | None:
    """kombu's JSON document of a message, or None when it is not one."""
    try:
        doc = fast_json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def decode(
    raw: bytes | str, known_tasks: Sequence[str], dispatch_task: str, limit: int = MAX_MESSAGE_BYTES
) -> Delivery:
    """Read a raw broker message; never raises (what cannot be read is said in .problem)."""
    data = _as_bytes(raw)
    doc = read_document(data)
    if doc is None:
        return Delivery(data, problem="not a JSON object (kombu message format)")
    return decode_document(doc, data, known_tasks, dispatch_task, limit)


def decode_document(
    doc: dict[str, Any],
    data: bytes,
    known_tasks: Sequence[str],
    dispatch_task: str,
    limit: int = MAX_MESSAGE_BYTES,
) -> Delivery:
    headers = doc.get("headers")
    props = doc.get("properties")
    if not isinstance(headers, dict) or not isinstance(props, dict):
        return Delivery(data, problem="no headers or properties (kombu message format)")
    task = headers.get("task")
    message_id = headers.get("id") if isinstance(headers.get("id"), str) else ""
    count = headers.get(DELIVERIES_HEADER, 0)
    said = (  # what the message says of itself, kept whatever becomes of it
        data,
        task if isinstance(task, str) else None,
        str(message_id)[:128],
        count if isinstance(count, int) and count >= 0 else 0,
        bool(headers.get(REROUTED_HEADER)),
    )

    def refused(problem: str) -> Delivery:
        raw, task_name, mid, deliveries, rerouted = said
        return Delivery(raw, (), task_name, mid, deliveries, rerouted, problem)

    if not isinstance(props.get("delivery_tag"), str):
        return refused("no delivery tag (kombu message format)")
    if task not in known_tasks:
        return refused(f"unknown task {task!r}")
    if doc.get("content-type") != JSON_CONTENT_TYPE:
        content_type = doc.get("content-type")
        return refused(f"refused content type {content_type!r} (JSON only)")
    body = doc.get("body")
    if not isinstance(body, str):
        return refused("body is not a string")
    encoding = props.get("body_encoding")
    try:
        if encoding == "base64":
            blob = base64.b64decode(body, validate=True)
        elif encoding in (None, "utf-8"):
            blob = body.encode("utf-8", "surrogatepass")
        else:
            return refused(f"unknown body encoding {encoding!r}")
        method = headers.get("compression")
        if method:
            blob = _decompress(blob, str(method), limit)
        elif len(blob) > limit:
            raise ValueError(f"body is larger than {limit} bytes")
        task_body = fast_json.loads(blob)  # Celery's [args, kwargs, embed]
    except (ValueError, TypeError, zlib.error, OSError, lzma.LZMAError, EOFError) as e:
        return refused(f"body cannot be read: {e}")
    raw, task_name, mid, deliveries, rerouted = said
    if task != dispatch_task:
        return Delivery(raw, (), task_name, mid, deliveries, rerouted)
    args = task_body[0] if isinstance(task_body, list) and task_body else None
    if not (isinstance(args, list) and args):
        return refused("keyq.dispatch needs args [[envelope, ...]]")
    envelopes = args[0]
    if not isinstance(envelopes, list):
        envelopes = [envelopes]
    if len(envelopes) > MAX_ENVELOPES_PER_MESSAGE:
        return refused(
            f"{len(envelopes)} envelopes in one message (at most {MAX_ENVELOPES_PER_MESSAGE})"
        )
    return Delivery(raw, tuple(envelopes), task_name, mid, deliveries, rerouted)


def redelivered(raw: bytes | str, bump: bool = True, reroute: bool = False) -> bytes:
    """The message as it goes back on a queue: a new delivery tag (so an old owner's late ack
    cannot touch the new record), its delivery count up by one when bump. Bytes that are not
    kombu's format go back untouched (the fetch sends them to the poison list)."""
    doc = read_document(raw)
    if doc is None or not isinstance(doc.get("properties"), dict):
        return _as_bytes(raw)
    return redelivered_document(doc, bump, reroute)


def redelivered_document(doc: dict[str, Any], bump: bool = True, reroute: bool = False) -> bytes:
    """``redelivered`` of a message already read (kombu's document, its properties a dict);
    the document itself is left as it was."""
    again = {**doc, "properties": {**doc["properties"], "delivery_tag": uuid4_text()}}
    headers = doc.get("headers")
    if isinstance(headers, dict) and (bump or reroute):
        headers = again["headers"] = dict(headers)
        if bump:
            count = headers.get(DELIVERIES_HEADER, 0)
            headers[DELIVERIES_HEADER] = (count if isinstance(count, int) else 0) + 1
        if reroute:
            headers[REROUTED_HEADER] = True
    return json.dumps(again).encode("utf-8")


# --- the Redis side -------------------------------------------------------------------------


Lease = tuple[str, str]  # (lease key, "owner|token"): guards every move of a partition's messages


@dataclass(frozen=True)
class Claimed:
    """What the first step of a batch took (Mailbox.claim_batch), in one round trip."""

    status: int  # as Mailbox.claim: 1 claimed, 0 returned to the queue head, -1 restored
    drained: list[bytes]  # more of the queue, behind the claimed message
    poison: list[bytes]  # what the fetch could not read, to be dead-lettered with the batch
    waiting: dict[int, int]  # other held partitions whose queues hold messages: their lengths
    share: int = 0  # the part of the batch's room this partition's queue may fill


class Mailbox:
    """The broker conversation of one worker process about its partitions."""

    def __init__(self, broker: redis.Redis, settings: Settings) -> None:
        self.broker = broker
        self.settings = settings
        self._claim = register(broker, "claim")
        self._drain = register(broker, "drain")
        self._nonempty = register(broker, "nonempty")
        self._restore = register(broker, "restore")
        self._compare_delete = register(broker, "compare_delete")
        self._claim_batch = register_composed(broker, "claim_batch", "claim", "drain", "nonempty")
        self._drain_many = register_composed(broker, "drain_many", "drain")
        self._drain_ready = register_composed(broker, "drain_ready", "drain")
        # drain_ready's partitions, keys and lease values, built for the last held set given
        self._ready_args: tuple[tuple[tuple[int, int], ...], list[bytes], list[bytes]] | None
        self._ready_args = None

    def queue(self, partition: int) -> str:
        return self.settings.queue_name(partition)

    def inflight_key(self, partition: int) -> str:
        return self.settings.redis_key("inflight", str(partition))

    # --- a batch ----------------------------------------------------------------------------

    def claim(self, partition: int, lease: Lease, message: dict[str, Any]) -> int:
        """Take the delivered message (kombu's decoded document) from ``unacked`` into the
        partition's in-flight list: 1. Not our lease: it goes back to the queue head with a new
        tag: 0. Someone already restored it: -1 (nothing to do)."""
        tag = str((message.get("properties") or {}).get("delivery_tag", ""))
        raw = json.dumps(message).encode("utf-8")
        back = redelivered(raw, bump=False)
        return int(
            self._claim(
                keys=[
                    lease[0],
                    self.inflight_key(partition),
                    KOMBU_UNACKED,
                    KOMBU_UNACKED_INDEX,
                    self.queue(partition),
                ],
                args=[lease[1], tag, raw, back],
            )
        )

    def claim_batch(
        self,
        partition: int,
        lease: Lease,
        message: dict[str, Any],
        room: int,
        poison_room: int,
        others: Sequence[int],
        share: bool = False,
        raw: bytes | None = None,
    ) -> Claimed:
        """claim, then (if claimed) ask which of `others` wait, drain up to `room` of this
        queue (with `share`, only its fair share of it when others wait; 0: the message is
        applied alone) and take up to `poison_room` of the poison list: the steps of a batch's
        start in one script, one round trip. More than one drain step is drained on by
        ``drain``. ``raw``: the message's bytes when the caller has them already."""
        props = message.get("properties")
        tag = str((props or {}).get("delivery_tag", ""))
        raw = json.dumps(message).encode("utf-8") if raw is None else raw
        back = redelivered_document(message, bump=False) if isinstance(props, dict) else raw
        queue = self.queue(partition)
        reply = self._claim_batch(
            keys=[
                lease[0],
                self.inflight_key(partition),
                KOMBU_UNACKED,
                KOMBU_UNACKED_INDEX,
                queue,
                poison_key(queue),
                *(self.queue(p) for p in others),
            ],
            args=[lease[1], tag, raw, back, room, poison_room,
                  DRAIN_STEP, "1" if share else "0"],
        )
        status = int(reply[0])
        if status != 1:
            return Claimed(status, [], [], {})
        _, drained, poison, found, share = reply
        waiting = {
            others[int(i) - 1]: int(n) for i, n in zip(found[::2], found[1::2], strict=True)
        }
        return Claimed(
            1, [_b(m) for m in drained], [_b(m) for m in poison], waiting, int(share)
        )

    def drain_many(
        self, wanted: Sequence[tuple[int, Lease, int]]
    ) -> dict[int, list[bytes] | None]:
        """``drain`` of several partitions, (partition, lease, count) each, in one round trip
        (the counts together are at most a batch); None for a partition whose lease is not
        ours."""
        if not wanted:
            return {}
        keys: list[str] = []
        args: list[object] = []
        for partition, lease, count in wanted:
            keys += [self.queue(partition), self.inflight_key(partition), lease[0]]
            args += [count, lease[1]]
        replies = self._drain_many(keys=keys, args=args)
        return {
            p: None if got == -1 else [_b(m) for m in got]
            for (p, _, _), got in zip(wanted, replies, strict=True)
        }

    def drain_ready(
        self,
        pipe: redis.client.Pipeline,
        held: dict[int, int],
        lease_of: Callable[[int, int], Lease],
        room: int,
    ) -> Callable[[object], dict[int, list[bytes] | None]]:
        """Queue on a post-commit pipeline (after its settle) the next batch's first step: up
        to `room` messages of the held partitions (partition: token), each into its in-flight
        list under its lease (`lease_of`; drain_ready.lua). Returns the reader of the script's
        reply: per partition whose in-flight list holds messages, ALL of them (None: the lease
        is not ours). The script's arguments are built once per held set (this runs after
        every batch)."""
        tokens = tuple(held.items())
        cached = self._ready_args
        if cached is None or cached[0] != tokens:
            keys: list[bytes] = []
            leases: list[bytes] = []
            for partition, token in tokens:
                lease = lease_of(partition, token)
                keys += [
                    self.queue(partition).encode(),
                    self.inflight_key(partition).encode(),
                    lease[0].encode(),
                ]
                leases.append(lease[1].encode())
            cached = self._ready_args = (tokens, keys, leases)
        self._drain_ready(keys=cached[1], args=[room, *cached[2]], client=pipe)

        def read(reply: object) -> dict[int, list[bytes] | None]:
            items = list(reply) if isinstance(reply, list) else []
            return {
                tokens[int(index) - 1][0]: None if got == -1 else [_b(m) for m in got]
                for index, got in zip(items[::2], items[1::2], strict=True)
            }

        return read

    def drain(self, partition: int, lease: Lease, room: int) -> list[bytes] | None:
        """Move up to room more messages from the queue head into the in-flight list, stopping
        before one redelivered more than once (it is applied alone). None: not our lease."""
        out: list[bytes] = []
        while len(out) < room:
            step = min(DRAIN_STEP, room - len(out))
            more = self._drain(
                keys=[self.queue(partition), self.inflight_key(partition), lease[0]],
                args=[step, lease[1]],
            )
            if more is None:
                return None
            out.extend(_b(m) for m in more)
            if len(more) < step:
                break
        return out

    def settle(
        self, partition: int, lease: Lease, pipe: redis.client.Pipeline | None = None
    ) -> bool:
        """The batch is committed: forget its in-flight messages (only under our lease). With
        a pipeline (of the broker's client) it is queued there: True, the reply comes later."""
        keys, args = [lease[0], self.inflight_key(partition)], [lease[1]]
        if pipe is not None:
            self._compare_delete(keys=keys, args=args, client=pipe)
            return True
        return bool(self._compare_delete(keys=keys, args=args))

    def requeue(self, partition: int, lease: Lease, *, bump: bool = True) -> int:
        """The batch failed: its in-flight messages back at the queue head in order, each with
        its delivery count up when bump. -1 when the lease is not ours (the next owner
        restores them)."""
        inflight = self.broker.lrange(self.inflight_key(partition), 0, -1)
        return self._put_back(partition, [], [_b(m) for m in inflight], lease, bump)

    def restore(self, partition: int) -> int:
        """A previous owner's in-flight and unacked messages of this partition back at the
        head, in order, before anything newer (called when its lease was granted to us)."""
        queue = self.queue(partition)
        unacked: list[tuple[bytes, bytes, float]] = []
        for tag, value in self.broker.hgetall(KOMBU_UNACKED).items():
            try:
                payload, _exchange, routing_key = json.loads(value)
            except (ValueError, TypeError):
                continue
            if routing_key == queue:
                unacked.append((_b(tag), json.dumps(payload).encode("utf-8"), 0.0))
        if unacked:
            pipe = self.broker.pipeline(transaction=False)
            for tag, _, _ in unacked:
                pipe.zscore(KOMBU_UNACKED_INDEX, tag)
            scores = pipe.execute()
            unacked = sorted(
                ((t, p, s or 0.0) for (t, p, _), s in zip(unacked, scores, strict=True)),
                key=lambda e: e[2],
            )
        inflight = [_b(m) for m in self.broker.lrange(self.inflight_key(partition), 0, -1)]
        return self._put_back(partition, [(t, p) for t, p, _ in unacked], inflight, None)

    def _put_back(
        self,
        partition: int,
        unacked: list[tuple[bytes, bytes]],
        inflight: list[bytes],
        lease: Lease | None,
        bump: bool = True,
    ) -> int:
        args: list[Any] = [lease[1] if lease else "", len(unacked)]
        for tag, payload in unacked:
            args.extend((tag, redelivered(payload, bump)))
        args.extend(redelivered(m, bump) for m in inflight)
        return int(
            self._restore(
                keys=[
                    self.queue(partition),
                    KOMBU_UNACKED,
                    KOMBU_UNACKED_INDEX,
                    self.inflight_key(partition),
                    lease[0] if lease else self.inflight_key(partition),
                ],
                args=args,
            )
        )

    # --- poison and depth -------------------------------------------------------------------

    def take_poison(
        self, partition: int, lease: Lease, room: int, queue: str | None = None
    ) -> list[bytes] | None:
        """Move what the fetch could not read into the in-flight list, to be dead-lettered with
        the next commit (a crash before it puts them back on the queue: nothing is lost).
        queue: another queue's poison list (the default queue's, taken by partition 0)."""
        source = poison_key(queue or self.queue(partition))
        more = self._drain(
            keys=[source, self.inflight_key(partition), lease[0]],
            args=[room, lease[1], 1],
        )
        return None if more is None else [_b(m) for m in more]

    def poison_length(self, queue: str) -> int:
        return int(self.broker.llen(poison_key(queue)))

    def poison_waiting(self, partitions: Sequence[int]) -> list[int]:
        """Those of the partitions whose poison list holds messages (one round trip)."""
        if not partitions:
            return []
        found = self._nonempty(keys=[poison_key(self.queue(p)) for p in partitions])
        return [partitions[int(i) - 1] for i in found[::2]]



# --- what is on the broker (status, demo, benchmarks, the chaos tool) -------------------------


@dataclass(frozen=True)
class Backlog:
    """This deployment's messages that are not yet applied-and-settled, by where they sit."""

    queued: int  # on partition queues
    inflight: int  # taken by a batch, not yet committed (or awaiting a restore)
    unacked: int  # delivered to a worker, not yet claimed (or awaiting a restore)
    poison: int  # refused at fetch, awaiting their dead letter

    @property
    def total(self) -> int:
        return self.queued + self.inflight + self.unacked + self.poison


def _pending_lists(settings: Settings) -> list[str]:
    queues = [settings.queue_name(p) for p in range(settings.partitions)]
    inflight = [settings.redis_key("inflight", str(p)) for p in range(settings.partitions)]
    return queues + inflight + [poison_key(q) for q in queues]


def unacked_records(broker: redis.Redis, routing_key_prefix: str) -> dict[bytes, bytes]:
    """kombu's unacked records (tag -> record) of the queues whose name starts with the prefix."""
    marker = json.dumps(routing_key_prefix)[:-1].encode()  # '"<prefix>' as stored in a record
    return {
        _b(tag): _b(value)
        for tag, value in broker.hgetall(KOMBU_UNACKED).items()
        if marker in _b(value)
    }


def drop_unacked(broker: redis.Redis, routing_key_prefix: str) -> int:
    """Forget the unacked records of those queues (a benchmark cleaning up after itself)."""
    tags = list(unacked_records(broker, routing_key_prefix))
    if tags:
        broker.hdel(KOMBU_UNACKED, *tags)
        broker.zrem(KOMBU_UNACKED_INDEX, *tags)
    return len(tags)


def backlog(broker: redis.Redis, settings: Settings) -> Backlog:
    lists = _pending_lists(settings)
    pipe = broker.pipeline(transaction=False)
    for key in lists:
        pipe.llen(key)
    lengths = [int(n) for n in pipe.execute()]
    n = settings.partitions
    return Backlog(
        queued=sum(lengths[:n]),
        inflight=sum(lengths[n : 2 * n]),
        unacked=len(unacked_records(broker, f"{settings.namespace}.p")),
        poison=sum(lengths[2 * n :]),
    )


def pending_messages(broker: redis.Redis, settings: Settings) -> list[bytes]:
    """Every message of this deployment not yet applied-and-settled, raw (tools look inside)."""
    out = list(unacked_records(broker, f"{settings.namespace}.p").values())
    for key in _pending_lists(settings):
        out.extend(_b(m) for m in broker.lrange(key, 0, -1))
    return out
