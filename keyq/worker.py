"""The worker runtime of one process: ownership hooks, the task body, housekeeping.

Celery delivers one task message of a partition; ``handle`` then drains up to a batch more of
that partition's queue (atomically moved into an in-flight list while the lease is held),
applies them all with one commit, and only then writes the cache, the replies and the registry
and clears the in-flight list. Celery acks the trigger message when ``handle`` returns.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import redis

from keyq import metrics
from keyq.activations import Activation, ActivationTable
from keyq.applier import Applier, BatchOutcome
from keyq.cache import StateCache
from keyq.celery_app import DISPATCH_TASK
from keyq.entity import EntityRegistry
from keyq.errors import OwnershipError, RepoError, StaleWriteError
from keyq.ownership import OwnershipHooks, PartitionOwnership
from keyq.registry import NameRegistry
from keyq.reply import REPLY_TTL_MS
from keyq.repo import Repo
from keyq.scripts import register
from keyq.settings import Settings
from keyq.supervisor import RestartIntensity

log = logging.getLogger(__name__)

FAULT_CRASH_AFTER_COMMIT = "KEYQ_FAULT_CRASH_AFTER_COMMIT"  # tests: die after the Nth commit
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
        registry: EntityRegistry | None = None,
        repo: Repo | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.entities = registry or EntityRegistry.from_modules(settings.entity_modules)
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.broker = (
            self.redis
            if settings.broker_url == settings.redis_url
            else redis.Redis.from_url(settings.broker_url)
        )
        self.repo = repo or Repo(settings.database_url)
        self.cache = StateCache(self.redis, settings)
        self.names = NameRegistry(self.redis, settings)
        self.activations = ActivationTable(settings.max_activations, settings.idle_timeout_s)
        self.intensity = RestartIntensity()
        self.applier = Applier(settings, self.entities, self.repo, self.activations, self.intensity)
        self._add_queue = add_queue
        self._cancel_queue = cancel_queue
        self._drain = register(self.broker, "drain")
        self._restore = register(self.broker, "restore")
        self._compare_delete = register(self.broker, "compare_delete")
        self._compare_delete_cache = register(self.redis, "compare_delete")
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
        self.totals: dict[str, int] = {"applied": 0, "batches": 0, "duplicates": 0}
        # fault injection for the exactly-once tests: exit hard between commit and ack
        self._crash_after = int(os.environ.get(FAULT_CRASH_AFTER_COMMIT, "0") or 0)

    # --- keys ------------------------------------------------------------------------------

    def inflight_key(self, partition: int) -> str:
        return self.settings.redis_key("inflight", str(partition))

    def lease_value(self, partition: int, token: int) -> str:
        return f"{self.node_id}|{token}"

    # --- ownership hooks (consumer loop) ---------------------------------------------------

    def prepare(self, partition: int, token: int) -> None:
        self.repo.record_fence(partition, token)
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

    def forget(self, partition: int) -> None:
        gone = self.activations.drop_partition(partition)
        self._release_names(gone)

    # --- the task body ---------------------------------------------------------------------

    def handle(self, queue: str, envelopes: object, raw_message: dict[str, Any] | None) -> None:
        """Apply a delivered message of a partition plus what waits behind it, one commit."""
        partition = partition_of_queue(self.settings, queue)
        token = self.ownership.token(partition) if partition is not None else None
        if partition is None or token is None:
            self._return_to_head(queue, raw_message)
            return
        raws: list[object] = list(envelopes) if isinstance(envelopes, list) else [envelopes]
        room = self.settings.batch_max - len(raws)
        drained = 0
        if room > 0:
            more = self._drain(
                keys=[
                    queue,
                    self.inflight_key(partition),
                    self.ownership.leases.lease_key(partition),
                ],
                args=[room, self.lease_value(partition, token)],
            )
            for item in more or []:
                drained += 1
                try:
                    raws.extend(decode_task_message(item))
                except (ValueError, TypeError, KeyError, IndexError) as e:
                    raws.append({"error": f"undecodable broker message: {e}"})
        started = time.perf_counter()
        try:
            outcome = self.applier.apply(
                partition, token, raws, keep_trying=lambda: self.ownership.token(partition) == token
            )
        except StaleWriteError as e:
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
        metrics.commit_seconds.observe(time.perf_counter() - started)
        if self._crash_after and outcome.applied:
            self._crash_after -= 1
            if self._crash_after == 0:
                log.error("keyq fault injection: exiting after commit, before ack")
                os._exit(137)
        self._after_commit(partition, token, outcome, drained)

    def _after_commit(
        self, partition: int, token: int, outcome: BatchOutcome, drained: int
    ) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
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
            self.names.release_many(pipe, [a.id for a in outcome.evicted], self.node_id)
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
        self.totals["applied"] += outcome.applied
        self.totals["batches"] += 1
        self.totals["duplicates"] += outcome.duplicates
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
        """Passivate idle activations and publish gauges."""
        idle = self.activations.idle()
        if idle:
            for act in idle:
                self._on_passivate(act)
            self._release_names(idle)
            metrics.passivations.labels("idle").inc(len(idle))
        metrics.activations.set(len(self.activations))

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
        self.repo.dispose()
        self.redis.close()
