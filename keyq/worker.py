"""The worker runtime of one process: ownership hooks, the task body, housekeeping.

Celery delivers one task message of a partition; ``handle`` then drains up to a batch more of
that partition's queue (atomically moved into an in-flight list while the lease is held),
applies them all with one commit, and only then writes the cache, the replies and the registry
and clears the in-flight list. Celery acks the trigger message when ``handle`` returns.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from kombu import compression as kombu_compression

from keyq import metrics
from keyq.activations import Activation, ActivationTable
from keyq.applier import Applier, BatchOutcome
from keyq.cache import StateCache
from keyq.celery_app import DISPATCH_TASK, make_app
from keyq.connections import redis_client
from keyq.entity import EntityRegistry
from keyq.envelope import Envelope
from keyq.errors import OwnershipError, RepoError, StaleWriteError
from keyq.ownership import OwnershipHooks, PartitionOwnership
from keyq.registry import NameRegistry
from keyq.reply import REPLY_TTL_MS
from keyq.repo import Repo
from keyq.scripts import register
from keyq.settings import Settings
from keyq.supervisor import RestartIntensity
from keyq.timers import TimerPoller

log = logging.getLogger(__name__)

FAULT_CRASH_AFTER_COMMIT = "KEYQ_FAULT_CRASH_AFTER_COMMIT"  # tests: die after the Nth commit
# benchmarks only: RPUSH "<partition> <applied_at> <latency_s>" per applied message to this list
BENCH_LATENCY_KEY = "KEYQ_BENCH_LATENCY_KEY"
DRAIN_STEP = 64  # broker messages taken per drain round trip
KOMBU_UNACKED = "unacked"  # kombu's Redis transport: delivered-but-unacked messages
KOMBU_UNACKED_INDEX = "unacked_index"


def partition_of_queue(settings: Settings, queue: str) -> int | None:
    prefix = f"{settings.namespace}.p"
    if queue.startswith(prefix) and queue[len(prefix) :].isdigit():
        return int(queue[len(prefix) :])
    return None


def decode_task_message(raw: bytes | str) -> list[object]:
    """The envelopes inside a raw kombu message of keyq.dispatch (JSON only, never pickle)."""
    msg = json.loads(raw)
    headers = msg.get("headers") or {}
    if headers.get("task") != DISPATCH_TASK:
        return [{"error": f"not a {DISPATCH_TASK} message: task={headers.get('task')!r}"}]
    if msg.get("content-type") != "application/json":
        return [{"error": f"refused content type {msg.get('content-type')!r} (JSON only)"}]
    body = msg.get("body", "")
    if (msg.get("properties") or {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    method = headers.get("compression")
    if method:  # as kombu does for a consumed message (task_compression)
        try:
            body = kombu_compression.decompress(body, method)  # type: ignore[no-untyped-call]
        except Exception as e:  # zlib.error, KeyError (unknown method), ...
            raise ValueError(f"cannot decompress ({method}): {e}") from e
    args = json.loads(body)[0]
    envelopes = args[0] if args else []
    return list(envelopes) if isinstance(envelopes, list) else [envelopes]


class WorkerRuntime(OwnershipHooks):
    """Everything one keyq worker process holds, wired together."""

    def __init__(
        self,
        settings: Settings,
        node_id: str,
        *,
        static_partitions: tuple[int, ...] | None = None,
        add_queue: Callable[[str], None] = lambda q: None,
        cancel_queue: Callable[[str], None] = lambda q: None,
        settle: Callable[[], bool] = lambda: False,
        registry: EntityRegistry | None = None,
        repo: Repo | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.entities = registry or EntityRegistry.from_modules(settings.entity_modules)
        self.redis = redis_client(settings.redis_url, settings.timeouts)
        self.broker = (
            self.redis
            if settings.broker_url == settings.redis_url
            else redis_client(settings.broker_url, settings.timeouts)
        )
        # no pre-ping: a failed batch is retried anyway, on a fresh connection
        self.repo = repo or Repo(settings.database_url, pre_ping=False, timeouts=settings.timeouts)
        self.cache = StateCache(self.redis, settings)
        self.names = NameRegistry(self.redis, settings)
        self.activations = ActivationTable(settings.max_activations, settings.idle_timeout_s)
        self.intensity = RestartIntensity()
        self.applier = Applier(settings, self.entities, self.repo, self.activations, self.intensity)
        self.timers = TimerPoller(self.repo, self._publish_fires)
        self._producer: Any = None  # a Celery app to publish timer fires, made on first use
        self._add_queue = add_queue
        self._cancel_queue = cancel_queue
        self._settle = settle
        self._drain = register(self.broker, "drain")
        self._nonempty = register(self.broker, "nonempty")
        self._restore = register(self.broker, "restore")
        self._compare_delete = register(self.broker, "compare_delete")
        self.ownership = PartitionOwnership(
            self.redis,
            settings,
            node_id,
            self,
            static_partitions=static_partitions,
            info={
                "pid": os.getpid(),
                "started": time.time(),
                "static": list(static_partitions) if static_partitions else None,
            },
        )
        # fault injection for the exactly-once tests: exit hard between commit and ack
        self._crash_after = int(os.environ.get(FAULT_CRASH_AFTER_COMMIT, "0") or 0)
        self._bench_latency_key = os.environ.get(BENCH_LATENCY_KEY) or None  # off by default

    # --- keys ------------------------------------------------------------------------------

    def inflight_key(self, partition: int) -> str:
        return self.settings.redis_key("inflight", str(partition))

    def lease_value(self, partition: int, token: int) -> str:
        return f"{self.node_id}|{token}"

    # --- ownership hooks (consumer loop) ---------------------------------------------------

    def prepare(self, partition: int, token: int) -> None:
        try:
            self.repo.record_fence(partition, token)
        except StaleWriteError:
            # Redis lost its fence counter (restart without persistence): lift it above the
            # Repo's token; the ownership tick releases this lease and claims a newer one.
            repo_fence = self.repo.partition_fence(partition)
            fence_key = self.ownership.leases.fence_key(partition)
            current = int(self.redis.get(fence_key) or 0)
            if current < repo_fence:
                self.redis.set(fence_key, repo_fence)
            log.warning(
                "keyq fence counter behind the Repo partition=%s token=%s repo_fence=%s",
                partition, token, repo_fence,
            )
            raise
        restored = self.restore(partition)
        if restored:
            log.info(
                "keyq restored %d message(s) to the head of partition %s node=%s",
                restored,
                partition,
                self.node_id,
            )

    def restore(self, partition: int) -> int:
        """Put the previous owner's unacked and in-flight messages back at the queue head."""
        queue = self.settings.queue_name(partition)
        candidates: list[tuple[Any, dict[str, Any]]] = []
        for tag, value in self.broker.hgetall(KOMBU_UNACKED).items():
            try:
                payload, _exchange, routing_key = json.loads(value)
            except (ValueError, TypeError):
                continue
            if routing_key == queue:
                candidates.append((tag, payload))
        scores: list[float | None] = []
        if candidates:
            pipe = self.broker.pipeline(transaction=False)
            for tag, _ in candidates:
                pipe.zscore(KOMBU_UNACKED_INDEX, tag)
            scores = pipe.execute()
        ordered = sorted(zip(candidates, scores, strict=True), key=lambda cs: cs[1] or 0.0)
        inflight = self.broker.lrange(self.inflight_key(partition), 0, -1)
        args: list[Any] = [len(ordered)]
        for (tag, payload), _score in ordered:
            args.append(tag)
            args.append(json.dumps(payload))
        args.extend(inflight)
        return int(
            self._restore(
                keys=[queue, KOMBU_UNACKED, KOMBU_UNACKED_INDEX, self.inflight_key(partition)],
                args=args,
            )
        )

    def start_consuming(self, partition: int) -> None:
        self._add_queue(self.settings.queue_name(partition))
        metrics.partitions_owned.set(len(self.ownership.held()) + 1)

    def stop_consuming(self, partition: int) -> None:
        self._cancel_queue(self.settings.queue_name(partition))
        metrics.partitions_owned.set(max(0, len(self.ownership.held()) - 1))

    def observe(self, held: dict[int, int]) -> None:
        """Mailbox depth: the queue length of every partition held, from the heartbeat thread
        (the consumer loop is busy exactly when the depth matters)."""
        if not held:
            return
        parts = sorted(held)
        pipe = self.broker.pipeline(transaction=False)
        for p in parts:
            pipe.llen(self.settings.queue_name(p))
        for p, depth in zip(parts, pipe.execute(), strict=True):
            metrics.mailbox_depth.labels(str(p)).set(int(depth))

    def forget(self, partition: int) -> None:
        with contextlib.suppress(KeyError):
            metrics.mailbox_depth.remove(str(partition))
        gone = self.activations.drop_partition(partition)
        for act in gone:
            self._on_passivate(act)
        self._release_names(gone)
        self.timers.forget(partition)

    def settle(self) -> bool:
        return self._settle()

    def _lost_here(self, partition: int, queue: str, raw_message: dict[str, Any] | None) -> None:
        """The partition moved on under this batch: stop consuming it now (not at the next
        tick) and put the trigger message back at the head, since it may be acked before the
        new owner's restore looks for it (a copy it did restore is skipped as a duplicate)."""
        self.ownership.mark_lost(partition)
        self.stop_consuming(partition)
        self._return_to_head(queue, raw_message)

    # --- the task body ---------------------------------------------------------------------

    def handle(self, queue: str, envelopes: object, raw_message: dict[str, Any] | None) -> None:
        """Apply a delivered message of a partition plus what waits behind it, one commit."""
        partition = partition_of_queue(self.settings, queue)
        token = self.ownership.token(partition) if partition is not None else None
        if partition is None or token is None:
            self._return_to_head(queue, raw_message)
            return
        raws: list[object] = list(envelopes) if isinstance(envelopes, list) else [envelopes]
        drained = self._drain_more(queue, partition, token, raws)
        if drained < 0:
            self._lost_here(partition, queue, raw_message)
            return
        others = self._drain_others(partition, self.settings.batch_max - len(raws))
        if others and self._apply_with_others(partition, token, raws, drained, others):
            return
        started = time.perf_counter()
        try:
            outcome = self.applier.apply(
                partition, token, raws, keep_trying=lambda: self.ownership.token(partition) == token
            )
        except StaleWriteError as e:
            self._lost_here(partition, queue, raw_message)
            metrics.stale_writes.inc()
            log.error(
                "keyq write refused partition=%s token=%s node=%s: %s",
                partition,
                token,
                self.node_id,
                e,
            )
            return  # the new owner restored these messages; nothing of ours was written
        except RepoError as e:
            log.error(
                "keyq gave up a batch: lease lost while the database was down "
                "partition=%s node=%s: %s",
                partition,
                self.node_id,
                e,
            )
            raise OwnershipError(f"partition {partition} lost during a Repo outage") from e
        self._committed(partition, token, outcome, drained, started)

    def _committed(
        self, partition: int, token: int, outcome: BatchOutcome, drained: int, started: float
    ) -> None:
        """After a commit: record its duration, then cache, replies, registry, in-flight."""
        metrics.commit_seconds.observe(time.perf_counter() - started)
        if self._crash_after and outcome.applied:
            self._crash_after -= 1
            if self._crash_after == 0:
                log.error("keyq fault injection: exiting after commit, before ack")
                os._exit(137)
        self._after_commit(partition, token, outcome, drained)

    def _drain_others(self, partition: int, room: int) -> dict[int, tuple[int, list[object], int]]:
        """Cross-partition group commit: with room left in the batch, also take what waits in
        the other partitions this node holds (each into its own in-flight list, lease checked),
        so a light load spread over many partitions costs one commit, not one per partition.
        Returns partition -> (token, envelopes, broker messages taken)."""
        held = [(p, t) for p, t in self.ownership.held().items() if p != partition]
        if room <= 0 or not held:
            return {}
        found = self._nonempty(keys=[self.settings.queue_name(p) for p, _ in held])
        waiting = [
            (*held[int(i) - 1], int(n)) for i, n in zip(found[::2], found[1::2], strict=True)
        ]
        taken: dict[int, tuple[int, list[object], int]] = {}
        for p, t, n in waiting:
            if room <= 0:
                break
            if self.ownership.token(p) != t:
                continue
            raws: list[object] = []
            more = self._drain(
                keys=[
                    self.settings.queue_name(p),
                    self.inflight_key(p),
                    self.ownership.leases.lease_key(p),
                ],
                args=[min(DRAIN_STEP, room, n), self.lease_value(p, t)],
            )
            for item in more or []:
                try:
                    raws.extend(decode_task_message(item))
                except (ValueError, TypeError, KeyError, IndexError) as e:
                    raws.append({"error": f"undecodable broker message: {e}"})
            if more:
                taken[p] = (t, raws, len(more))
                room -= len(raws)
        return taken

    def _apply_with_others(
        self,
        partition: int,
        token: int,
        raws: list[object],
        drained: int,
        others: dict[int, tuple[int, list[object], int]],
    ) -> bool:
        """Apply this partition's batch with the others' in one commit. On a refused or failed
        commit, put the others' messages back at their queue heads and return False: the
        caller then applies this partition alone, on the usual path."""
        batches = [(partition, token, raws)] + [(p, t, r) for p, (t, r, _) in others.items()]
        started = time.perf_counter()
        try:
            outcome = self.applier.apply_group(
                batches,
                keep_trying=lambda: all(self.ownership.token(p) == t for p, t, _ in batches),
            )
        except (StaleWriteError, RepoError) as e:
            log.warning(
                "keyq cross-partition commit failed, applying partition %s alone node=%s: %s",
                partition,
                self.node_id,
                e,
            )
            for p, (t, _, _) in others.items():
                if self.ownership.token(p) == t:  # a lost partition's new owner restores it
                    self._restore(
                        keys=[
                            self.settings.queue_name(p),
                            KOMBU_UNACKED,
                            KOMBU_UNACKED_INDEX,
                            self.inflight_key(p),
                        ],
                        args=[0, *self.broker.lrange(self.inflight_key(p), 0, -1)],
                    )
            return False
        self._committed(partition, token, outcome, drained, started)
        for p, (t, _, _) in others.items():
            try:
                self._compare_delete(
                    keys=[self.ownership.leases.lease_key(p), self.inflight_key(p)],
                    args=[self.lease_value(p, t)],
                )
            except redis.RedisError as e:
                log.error("keyq could not clear in-flight list partition=%s: %s", p, e)
        return True

    def _drain_more(self, queue: str, partition: int, token: int, raws: list[object]) -> int:
        """Take more messages of the partition until the batch holds batch_max envelopes.

        Broker messages may carry many envelopes (send_many), so drain in small steps and stop
        as soon as the batch is full or the queue is empty. Returns the broker messages taken,
        or -1 when the lease turned out not to be ours.
        """
        drained = 0
        keys = [queue, self.inflight_key(partition), self.ownership.leases.lease_key(partition)]
        while len(raws) < self.settings.batch_max:
            step = min(DRAIN_STEP, self.settings.batch_max - len(raws))
            more = self._drain(keys=keys, args=[step, self.lease_value(partition, token)])
            if more is None:
                return -1  # the lease is not ours any more (what we took, its owner restores)
            for item in more:
                drained += 1
                try:
                    raws.extend(decode_task_message(item))
                except (ValueError, TypeError, KeyError, IndexError) as e:
                    raws.append({"error": f"undecodable broker message: {e}"})
            if not more or len(more) < step:
                break
        return drained

    def _after_commit(
        self, partition: int, token: int, outcome: BatchOutcome, drained: int
    ) -> None:
        committed_at = time.time()
        try:
            pipe = self.redis.pipeline(transaction=False)
            if self._bench_latency_key and outcome.sent:
                pipe.rpush(
                    self._bench_latency_key,
                    *(f"{p} {committed_at:.6f} {committed_at - s:.6f}" for p, s in outcome.sent),
                )
            self.cache.put_many(outcome.cache_entries, pipe=pipe)
            for message_id, encoded in outcome.replies:
                reply_key = self.settings.redis_key("reply", message_id)
                pipe.rpush(reply_key, encoded)
                pipe.pexpire(reply_key, REPLY_TTL_MS)
            now = time.monotonic()
            renew = [
                a
                for a in outcome.touched
                if now - a.name_renewed_at > self.settings.idle_timeout_s / 2
            ]
            for act in renew:
                act.name_renewed_at = now
            self.names.register_many(pipe, [a.id for a in renew], self.node_id)
            # a key evicted and activated again within this batch keeps its name
            gone = [a.id for a in outcome.evicted if a.id not in self.activations]
            self.names.release_many(pipe, gone, self.node_id)
            pipe.execute()
        except redis.RedisError as e:
            # the state is committed; the reconciler repairs the cache, callers time out
            log.error("keyq post-commit Redis writes failed partition=%s: %s", partition, e)
        if drained:
            try:
                self._compare_delete(
                    keys=[self.ownership.leases.lease_key(partition), self.inflight_key(partition)],
                    args=[self.lease_value(partition, token)],
                )
            except redis.RedisError as e:
                log.error("keyq could not clear in-flight list partition=%s: %s", partition, e)
        self._count(outcome)

    def _count(self, outcome: BatchOutcome) -> None:
        n = outcome.applied + outcome.rejected + outcome.crashed
        metrics.batch_size.observe(n)
        for latency in outcome.latencies_s:
            metrics.dispatch_latency.observe(latency)
        if outcome.duplicates:
            metrics.duplicates_skipped.inc(outcome.duplicates)
        for dl in outcome.dead_letters:
            metrics.dead_letters.labels(dl.reason).inc()
        for entity, count in outcome.restarts_by_entity.items():
            metrics.restarts.labels(entity).inc(count)
        for act in outcome.spawned:
            metrics.spawns.labels(act.entity_type.name).inc()
        if outcome.evicted:
            metrics.passivations.labels("evicted").inc(len(outcome.evicted))
            for act in outcome.evicted:
                self._on_passivate(act)
        metrics.activations.set(len(self.activations))
        if outcome.applied:
            metrics.messages_applied.labels("all").inc(outcome.applied)

    def _return_to_head(self, queue: str, raw_message: dict[str, Any] | None) -> None:
        """A message for a partition this node does not hold: back to the head, untouched."""
        if raw_message is None:
            log.error("keyq dropped a message it cannot return queue=%s", queue)
            return
        self.broker.rpush(queue, json.dumps(raw_message))
        log.info(
            "keyq returned a message to the head of %s (not owned here) node=%s",
            queue,
            self.node_id,
        )

    # --- housekeeping (consumer loop) ------------------------------------------------------

    def housekeeping(self) -> None:
        """Passivate idle activations, publish due timers of held partitions, set gauges."""
        idle = self.activations.idle()
        kept = [a for a in idle if a.entity_type.instance.always_on]
        if kept:  # always-on keys stay activated and named; only the activation cap evicts them
            idle = [a for a in idle if not a.entity_type.instance.always_on]
            for act in kept:
                self.activations.put(act)
            try:
                pipe = self.redis.pipeline(transaction=False)
                self.names.register_many(pipe, [a.id for a in kept], self.node_id)
                pipe.execute()
            except redis.RedisError as e:
                log.error("keyq could not renew %d always-on name(s): %s", len(kept), e)
        if idle:
            for act in idle:
                self._on_passivate(act)
            self._release_names(idle)
            metrics.passivations.labels("idle").inc(len(idle))
        metrics.activations.set(len(self.activations))
        held = self.ownership.held()
        if held:
            try:
                self.timers.tick(held)
            except Exception as e:  # the next tick tries again; nothing was marked published
                log.error("keyq timer poll failed node=%s error=%s", self.node_id, e)

    def _publish_fires(self, envelopes: Sequence[Envelope]) -> None:
        """Publish timer fires of one partition at its queue's tail, as one broker message."""
        if self._producer is None:
            self._producer = make_app(self.settings, name="keyq-timers")
        self._producer.send_task(
            DISPATCH_TASK,
            args=[[e.to_wire() for e in envelopes]],
            queue=self.settings.queue_name(envelopes[0].partition),
        )

    def _on_passivate(self, act: Activation) -> None:
        try:
            act.entity_type.instance.on_passivate(act.state)
        except Exception:
            log.exception(
                "keyq on_passivate raised entity=%s key=%s", act.entity_type.name, act.key
            )

    def _release_names(self, acts: list[Activation]) -> None:
        if not acts:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            self.names.release_many(pipe, [a.id for a in acts], self.node_id)
            pipe.execute()
        except redis.RedisError as e:
            log.error("keyq could not release %d name(s): %s", len(acts), e)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
        self.repo.dispose()
        self.redis.close()
