"""The worker runtime of one process: ownership hooks, the batch step, housekeeping.

The broker fetch claims a message of a partition this node serves into the partition's
in-flight list itself, with up to a batch more of that partition (keyq.fetch_claims), and hands
it to ``handle_claimed``; a message the fetch only recorded (KEYQ_FETCH_CLAIM=0, a separate
broker, an ETA) reaches ``handle`` through Celery, which claims it (keyq.mailbox). Either way
the batch also drains what waits in the other partitions this node holds, applies it all with
one commit, and only then writes the cache, the replies and the registry and settles the
in-flight lists. Under a steady stream that last round trip
also takes the next batch (Mailbox.drain_ready), so the worker goes from batch to batch with one
Redis and one database round trip each, without the broker fetch and Celery in between.
``handle`` never raises: whatever fails, each message it took is committed, back at the head of
its queue in order, or dead-lettered.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import redis

from keyq import metrics
from keyq.activations import Activation, ActivationTable
from keyq.applier import Applier, BatchOutcome
from keyq.cache import StateCache
from keyq.celery_app import DISPATCH_TASK, default_queue, make_app
from keyq.connections import redis_client
from keyq.entity import EntityRegistry
from keyq.envelope import Envelope
from keyq.errors import RepoDataError, RepoError, StaleWriteError
from keyq.fetch_claims import ClaimPlan, FetchClaims
from keyq.learned import LearnedGuess
from keyq.mailbox import (
    DEFAULT_QUEUE_TASKS,
    DRAIN_STEP,
    PARTITION_TASKS,
    REROUTED_HEADER,
    Claimed,
    Delivery,
    Lease,
    Mailbox,
    decode,
    decode_document,
    partition_of_queue,
)
from keyq.ownership import OwnershipHooks, PartitionOwnership
from keyq.publisher import Publisher
from keyq.records import DeadLetter
from keyq.registry import NameRegistry
from keyq.reply import REPLY_TTL_MS
from keyq.repo import Repo
from keyq.repo_health import RepoHealth
from keyq.routing import partition_for
from keyq.scripts import script_pipeline
from keyq.settings import Settings
from keyq.supervisor import Supervisor
from keyq.timers import TimerPoller

log = logging.getLogger(__name__)

REDELIVERED_IN_BATCH = 1  # a message delivered this often before may still share a batch
# a worker goes from batch to batch without the broker fetch (the next batch taken in the
# post-commit round trip of the one before) for at most this long, then lets Celery's event loop
# run (ownership ticks, housekeeping, control commands) before its next fetch
FOLLOW_ON_S = 0.05
POISON_PER_BATCH = 32  # unreadable messages dead-lettered with one batch, at most
WATCHDOG_SLACK_S = 5.0  # beyond twice the longest handler limit, before the watchdog acts


@dataclass
class _Batch:
    """The partitions whose in-flight lists one batch filled, and what it read from them."""

    leases: dict[int, Lease] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    raws: dict[int, list[object]] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    rerouted: set[str] = field(default_factory=set)
    alone: Delivery | None = None  # a redelivered message applied on its own


class WorkerRuntime(OwnershipHooks):
    """Everything one keyq worker process holds, wired together."""

    # more writes for each committed batch's post-commit pipeline (the same round trip as its
    # cache, replies and settle): the benchmark's latency samples (keyq.bench.latency_hook)
    post_commit_writers: ClassVar[list[Callable[[Any, BatchOutcome], None]]] = []

    def __init__(
        self,
        settings: Settings,
        node_id: str,
        *,
        static_partitions: tuple[int, ...] | None = None,
        add_queue: Callable[[str], None] = lambda q: None,
        cancel_queue: Callable[[str], None] = lambda q: None,
        settle: Callable[[], bool] = lambda: False,
        stopping: Callable[[], bool] = lambda: False,
        registry: EntityRegistry | None = None,
        repo: Repo | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.entities = registry or EntityRegistry.from_modules(settings.entity_modules)
        # a worker's own round trips block at once: its CPU is what drains the queues, and
        # polling for its replies cost more of it than it saved (keyq.reply_spin)
        timeouts = settings.timeouts.without_reply_spin()
        self.redis = redis_client(settings.redis_url, timeouts)
        self.broker = (
            self.redis
            if settings.broker_url == settings.redis_url
            else redis_client(settings.broker_url, timeouts)
        )
        # no pre-ping: a failed batch is retried anyway, on a fresh connection
        self.repo = repo or Repo(settings.database_url, pre_ping=False, timeouts=settings.timeouts)
        self.cache = StateCache(self.redis, settings)
        self.names = NameRegistry(self.redis, settings)
        self.mailbox = Mailbox(self.broker, settings)
        self.activations = ActivationTable(settings.max_activations, settings.idle_timeout_s)
        self.supervisor = Supervisor()
        self.applier = Applier(
            settings, self.entities, self.repo, self.activations, self.supervisor
        )
        self.applier.on_progress = self._progress
        self.repo_health = RepoHealth(settings.repo_handoff_s, self.repo.ping)
        self.applier.repo_health = self.repo_health
        self._batch_pulse: float | None = None  # last progress of the batch running, if any
        self._unserved: set[int] = set()  # claimed partitions no batch has served yet
        # a follow-on drain that finds nothing costs its part of the round trip and a scan of
        # the held queues: whether they pay is learned (a sparse stream never pays it back)
        self._follow_guess = LearnedGuess()
        self.watchdog_limit_s = watchdog_limit(settings, self.entities)
        # the broker fetch claims its messages itself (keyq.fetch_claims): the lease it checks
        # must be on the broker's server
        self.fetch_claims: FetchClaims | None = None
        if settings.fetch_claim and self.broker is self.redis:
            self.fetch_claims = FetchClaims(
                settings,
                self.handle_claimed,
                self._give_back_claimed,
                self._claim_lost,
                room=max(0, settings.batch_max - 1),
                poison_room=POISON_PER_BATCH,
                drain_step=DRAIN_STEP,
            )
        self.timers = TimerPoller(self.repo, self._publish_fires)
        self.applier.timer_clock = self.timers.clock.now  # handlers' now: the database's clock
        self._producer: Any = None  # a Celery app (its task protocol), made on first use
        self._publisher: Publisher | None = None
        self._add_queue = add_queue
        self._cancel_queue = cancel_queue
        self._settle = settle
        self._stopping = stopping  # a warm shutdown has begun (SIGTERM): no new batch
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

    def lease(self, partition: int, token: int | None) -> Lease:
        """The lease key and the value it holds while this node owns the partition."""
        value = f"{self.node_id}|{token}" if token is not None else ""
        return self.ownership.leases.lease_key(partition), value

    # --- ownership hooks (consumer loop) ---------------------------------------------------

    def prepare(self, partition: int, token: int) -> None:
        try:
            self.repo.record_fence(partition, token)
            self.repo_health.succeeded()
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
        except RepoError:
            self.repo_health.failed()  # the claim is released; enough of them: step back
            raise
        self._unserved.add(partition)  # its first batch comes before the others' next ones
        self._plan(partition, token)
        restored = self.mailbox.restore(partition)
        if restored:
            log.info(
                "keyq restored %d message(s) to the head of partition %s node=%s",
                restored,
                partition,
                self.node_id,
            )

    def start_consuming(self, partition: int) -> None:
        self._add_queue(self.settings.queue_name(partition))
        metrics.partitions_owned.set(len(self.ownership.held()) + 1)

    def stop_consuming(self, partition: int) -> None:
        if self.fetch_claims is not None:
            self.fetch_claims.drop(self.settings.queue_name(partition))
        self._cancel_queue(self.settings.queue_name(partition))
        metrics.partitions_owned.set(max(0, len(self.ownership.held()) - 1))

    def observe(self, held: dict[int, int]) -> None:
        """Gauges from the heartbeat thread (the consumer loop is busy exactly when they
        matter): restart-ready stamps, and the partition-wide figures this process exports
        while it holds partition 0 (keyq.worker_observer)."""
        from keyq.worker_observer import WorkerObserver

        observer = self.__dict__.get("_observer")
        if observer is None:  # made here: observe() is the one hook that owns it
            observer = self.__dict__["_observer"] = WorkerObserver(
                self.redis, self.broker, self.settings, self.node_id
            )
        observer.observe(held)

    def forget(self, partition: int) -> None:
        self._unserved.discard(partition)
        if self.fetch_claims is not None:
            self.fetch_claims.drop(self.settings.queue_name(partition))
        gone = self.activations.drop_partition(partition)
        for act in gone:
            self._on_passivate(act)
        self._release_names(gone)
        self.timers.forget(partition)

    def settle(self) -> bool:
        return self._settle()

    def healthy(self) -> bool:
        """keyq.repo_health: False while the database has failed for KEYQ_REPO_HANDOFF_S (the
        heartbeat thread probes it meanwhile)."""
        return self.repo_health.probe_if_down()

    def _lost_here(self, partition: int, token: int) -> None:
        """The partition moved on (or its messages cannot be moved now): stop consuming it at
        once, not at the next tick. What sits in its in-flight list or in kombu's unacked
        records stays there for the next owner's restore (or ours, after a new claim)."""
        self.ownership.mark_lost(partition, token)
        self.stop_consuming(partition)

    # --- the claim plans of the broker fetch (keyq.fetch_claims) ---------------------------

    def _plan(self, partition: int, token: int) -> None:
        """The fetch claims this partition's messages under this lease from now on."""
        if self.fetch_claims is not None:
            lease_key, value = self.lease(partition, token)
            self.fetch_claims.put(
                self.settings.queue_name(partition),
                ClaimPlan(
                    token,
                    lease_key,
                    value,
                    self.mailbox.inflight_key(partition),
                    partition in self._unserved,
                ),
            )

    def _served(self, partition: int) -> None:
        """A batch has served the partition: it is no takeover's backlog any more."""
        if partition in self._unserved:
            self._unserved.discard(partition)
            token = self.ownership.token(partition)
            if token is not None and self.fetch_claims is not None:
                plan = self.fetch_claims.plans.get(self.settings.queue_name(partition))
                if plan is not None and plan.token == token:
                    self._plan(partition, token)

    def _give_back_claimed(self, queue: str, plan: ClaimPlan, failed: bool) -> None:
        """The consumer left the queue while a fetch claimed its message (or its delivery
        failed: `failed`, each message's delivery count goes up): the in-flight list back at
        the queue head in order, under the plan's lease (not ours any more: the next owner
        restores it). Never left there while the lease is ours: the next batch would settle
        (delete) it with its own; if Redis cannot take it back now, the partition is given
        up here, and the restore of its next claim brings the messages back. Never raises."""
        partition = partition_of_queue(self.settings, queue)
        if partition is None:
            return
        try:
            self.mailbox.requeue(partition, (plan.lease_key, plan.lease_value), bump=failed)
        except Exception as e:
            log.error(
                "keyq could not return claimed messages partition=%s node=%s error=%s",
                partition, self.node_id, e,
            )
            self._lost_here(partition, plan.token)
            return
        log.info("keyq returned claimed messages to the head of %s node=%s", queue, self.node_id)

    def _claim_lost(self, queue: str, plan: ClaimPlan) -> None:
        """The fetch found the lease not the plan's: the message is back at its head."""
        partition = partition_of_queue(self.settings, queue)
        if partition is not None:
            log.info(
                "keyq returned a message to the head of %s (not owned here) node=%s",
                queue, self.node_id,
            )
            self._lost_here(partition, plan.token)

    # --- the task body ---------------------------------------------------------------------

    def handle(self, queue: str, message: dict[str, Any] | None) -> None:
        """Apply a delivered message of a partition plus what waits behind it, one commit.
        Never raises (Celery would drop the message): see the module docstring."""
        partition = partition_of_queue(self.settings, queue)
        if partition is None:
            self._misrouted(queue, message)
            return
        if not isinstance(message, dict):
            log.error("keyq got no broker message to claim queue=%s node=%s", queue, self.node_id)
            return
        token = self.ownership.token(partition)
        lease = self.lease(partition, token)
        raw = json.dumps(message).encode("utf-8")
        trigger = decode_document(message, raw, PARTITION_TASKS, DISPATCH_TASK)
        alone, others, fresh = self._company(partition, trigger)
        room = 0 if alone else max(0, self.settings.batch_max - len(trigger.envelopes))
        try:
            claimed = self.mailbox.claim_batch(
                partition, lease, message, room, POISON_PER_BATCH, list(others), bool(fresh), raw
            )
        except Exception as e:  # Redis down: the unacked record stays for a restore
            log.error(
                "keyq could not claim a message partition=%s node=%s error=%s", partition,
                self.node_id, e,
            )
            if token is not None:
                self._lost_here(partition, token)
            return
        if claimed.status != 1:
            if token is not None:  # the lease changed under us: the new owner restores
                self._lost_here(partition, token)
            if claimed.status == 0:
                log.info(
                    "keyq returned a message to the head of %s (not owned here) node=%s",
                    queue,
                    self.node_id,
                )
            return
        assert token is not None  # claimed under our lease
        self._serve(partition, token, lease, trigger, claimed, others, fresh, alone)

    def handle_claimed(self, queue: str, raw: bytes, claimed: Claimed, plan: ClaimPlan) -> None:
        """A message that the broker fetch claimed itself (keyq.fetch_claims), with the rest of
        its batch's first step: the same batch as ``handle``'s. Never raises.
        The fetch checked the plan's lease; if this node has claimed the partition again since
        (a new token), its restore has put the claimed messages back at the queue head
        already, and if it has lost it, the next owner's will: either way they are not ours."""
        partition = partition_of_queue(self.settings, queue)
        if partition is None or self.ownership.token(partition) != plan.token:
            log.info(
                "keyq left a claimed message of %s to the restore (lease changed) node=%s",
                queue, self.node_id,
            )
            return
        trigger = self._decode(raw)
        alone, others, fresh = self._company(partition, trigger)
        claimed = Claimed(
            1,
            claimed.drained,
            claimed.poison,
            {p: n for p, n in claimed.waiting.items() if p in others},
            claimed.share,
        )
        lease = (plan.lease_key, plan.lease_value)
        self._serve(partition, plan.token, lease, trigger, claimed, others, fresh, alone)

    def _company(
        self, partition: int, trigger: Delivery
    ) -> tuple[bool, dict[int, int], set[int]]:
        """Who a batch begun by `trigger` may take along: whether it is applied alone (it was
        delivered more than once before, so a poison pill stays alone; once before, a
        takeover's in-flight batch, still goes with others: see drain.lua), the other served
        partitions and their tokens, and those of them just claimed and not served yet (a
        takeover's backlog: the batch shares its room with them, so every one is served)."""
        alone = trigger.deliveries > REDELIVERED_IN_BATCH
        serving = {} if alone else self.ownership.serving()
        others = {p: t for p, t in serving.items() if p != partition}
        return alone, others, self._unserved & set(others)

    def _serve(
        self,
        partition: int,
        token: int,
        lease: Lease,
        trigger: Delivery,
        claimed: Claimed,
        others: dict[int, int],
        fresh: set[int],
        alone: bool,
    ) -> None:
        """The batch whose first step claimed `trigger` (and what `claimed` says), then batch
        after batch under a steady stream; whatever fails is abandoned, never raised."""
        batch = _Batch()
        batch.leases[partition] = lease
        batch.tokens[partition] = token
        if alone:
            batch.alone = trigger
        self._progress()
        began = time.monotonic()
        try:
            follow = self._run(partition, trigger, claimed, others, fresh, batch, began)
            while follow is not None:  # a steady stream: batch after batch, no fetch between
                batch, follow = follow, None
                self._progress()
                follow = self._commit(batch, self._follow_on(batch, began), start="follow")
        except RepoDataError as e:
            if batch.alone is None or not self._dead_letter_alone(partition, batch, e):
                self._abandon(batch, e)
        except Exception as e:
            self._abandon(batch, e)
        finally:
            self._batch_pulse = None

    def _progress(self) -> None:
        self._batch_pulse = time.monotonic()

    def pulse(self) -> dict[str, object]:
        """For `keyq status`: how long the batch in hand has gone without progress (None:
        idle), and the watchdog's limit."""
        pulse = self._batch_pulse
        quiet = None if pulse is None else round(time.monotonic() - pulse, 2)
        return {"batch_quiet_s": quiet, "watchdog_limit_s": self.watchdog_limit_s}

    def stalled(self) -> str | None:
        """The progress watchdog (the heartbeat thread asks): a batch that has not moved on for
        longer than any handler may run is stuck where the handler time limit cannot reach
        (outside Python, a signal masked); the node must give up its leases."""
        pulse = self._batch_pulse
        if pulse is None:
            return None
        quiet = time.monotonic() - pulse
        if quiet <= self.watchdog_limit_s:
            return None
        return f"no progress for {quiet:.1f}s (limit {self.watchdog_limit_s:g}s)"

    def _run(
        self,
        partition: int,
        trigger: Delivery,
        claimed: Claimed,
        others: dict[int, int],
        fresh: set[int],
        batch: _Batch,
        began: float,
    ) -> _Batch | None:
        """The batch after its first step (Mailbox.claim_batch): what it took, then more of a
        long queue, then what waits on the other partitions held here; one commit. Returns the
        next batch when its post-commit round trip took one (see _follow_on)."""
        self._served(partition)
        self._take(partition, [trigger], batch)
        self._take(partition, [self._decode(m) for m in claimed.drained], batch)
        if claimed.share > len(claimed.drained) == DRAIN_STEP:  # a long queue: drain on
            more = self.mailbox.drain(
                partition, batch.leases[partition], claimed.share - DRAIN_STEP
            )
            if more is None:
                self._lost_here(partition, batch.tokens[partition])
                return None
            self._take(partition, [self._decode(m) for m in more], batch)
        self._take(partition, [self._decode(m) for m in claimed.poison], batch)
        if others:
            self._drain_others(batch, claimed.waiting, others, fresh)
        return self._commit(batch, self._follow_on(batch, began))

    def _follow_on(self, batch: _Batch, began: float) -> dict[int, int] | None:
        """The partitions served here (and their tokens; never one given up since its last
        claim, see PartitionOwnership.serving) whose waiting messages the batch's post-commit
        round trip may take as the next batch, or None: it may when KEYQ_FOLLOW_ON is on, no
        shutdown has begun (the batch in flight is the last), Redis is also the broker (one
        pipeline settles and drains), the batch is no redelivered message applied alone, no
        partition just taken over waits for the broker fetch's fair shares, the worker has
        not gone FOLLOW_ON_S without returning to Celery's event loop, and such drains have
        been finding messages (keyq.learned)."""
        if not self.settings.follow_on or self._stopping():  # KEYQ_FOLLOW_ON=0, or SIGTERM
            return None
        if batch.alone is not None or self._unserved or self.broker is not self.redis:
            return None
        if time.monotonic() - began > FOLLOW_ON_S:
            return None
        if not self._follow_guess.ask():
            return None
        return self.ownership.serving() or None

    def _decode(self, raw: bytes) -> Delivery:
        """A raw message of a queue, in-flight or poison list. A poison-list message that reads
        well here (Lua's JSON decoder refused an escape that Python accepts) is applied like any
        other: its envelopes are checked one by one."""
        return decode(raw, PARTITION_TASKS, DISPATCH_TASK)

    def _take(self, partition: int, deliveries: Sequence[Delivery], batch: _Batch) -> None:
        """Sort what came off a partition's queue: envelopes to apply, or dead letters."""
        raws = batch.raws.setdefault(partition, [])
        for d in deliveries:
            if d.problem is not None:
                batch.dead.append(
                    _broker_dead_letter(
                        partition, d, "undecodable", f"undecodable broker message: {d.problem}"
                    )
                )
            elif d.deliveries >= self.settings.max_deliveries:
                batch.dead.append(
                    _broker_dead_letter(
                        partition,
                        d,
                        "max-deliveries",
                        f"delivered {d.deliveries} times without being applied (the process "
                        f"died or the batch failed each time; KEYQ_MAX_DELIVERIES="
                        f"{self.settings.max_deliveries})",
                    )
                )
            else:
                raws.extend(d.envelopes)
                if d.rerouted:
                    batch.rerouted.update(
                        str(e.get("id")) for e in d.envelopes if isinstance(e, dict)
                    )

    def _drain_others(
        self,
        batch: _Batch,
        waiting: dict[int, int],
        held: dict[int, int],
        fresh: set[int],
    ) -> None:
        """Cross-partition group commit: with room left in the batch, also take what waits in
        the other partitions this node holds (each into its own in-flight list, lease checked;
        all in one round trip), so a light load spread over many partitions costs one commit,
        not one per partition. While partitions just claimed wait (`fresh`: not served yet),
        every waiting partition gets an equal share of the room, those first, so a takeover's
        partitions are all served by one batch; otherwise each fills what room is left, in
        turn (many messages of a key in one batch: one write for them)."""
        room = self.settings.batch_max - sum(len(r) for r in batch.raws.values())
        ours = {p: held[p] for p in waiting if self.ownership.token(p) == held[p]}
        if not ours or room <= 0:
            return
        order = sorted(ours, key=lambda p: p not in fresh)  # fresh ones first, else as found
        share = max(1, room // len(order)) if fresh & set(ours) else room
        wanted: list[tuple[int, Lease, int]] = []
        for p in order:
            if room <= 0:
                break
            n = min(waiting[p], share, room)
            wanted.append((p, self.lease(p, ours[p]), n))
            room -= n
        leases = {p: lease for p, lease, _ in wanted}
        for p, more in self.mailbox.drain_many(wanted).items():
            if more is None:
                self._lost_here(p, ours[p])
                continue
            batch.leases[p] = leases[p]
            batch.tokens[p] = ours[p]
            self._served(p)
            self._take(p, [self._decode(m) for m in more], batch)

    def _commit(
        self, batch: _Batch, follow: dict[int, int] | None = None, start: str = "fetch"
    ) -> _Batch | None:
        """Apply and commit the batch, then its cache, replies and settle in one pipeline;
        with `follow` (held partitions and their tokens) that pipeline also takes the next
        batch from their queues (Mailbox.drain_ready), which is returned."""
        parts = list(batch.leases)
        started = time.perf_counter()
        try:
            outcome = self.applier.apply_group(
                [(p, batch.tokens[p], batch.raws.get(p, [])) for p in parts],
                keep_trying=lambda: self.repo_health.healthy()
                and all(self.ownership.token(p) == batch.tokens[p] for p in parts),
                dead_letters=batch.dead,
                rerouted=frozenset(batch.rerouted),
                on_early_commit=lambda early: self._committed_early(early, batch.leases),
            )
        except StaleWriteError as e:
            metrics.stale_writes.inc()
            log.error("keyq write refused partitions=%s node=%s: %s", parts, self.node_id, e)
            self._put_back(batch, bump=False)  # what is still ours goes back; the rest is restored
            return None
        except RepoDataError:
            raise  # the batch holds data the database refuses: abandon, count, isolate
        except RepoError as e:
            log.error(
                "keyq gave up a batch: lease lost while the database was down "
                "partitions=%s node=%s: %s", parts, self.node_id, e,
            )
            self._put_back(batch, bump=False)
            return None
        self.timers.note(outcome.timer_changes)  # committed: the poller asks for them in time
        metrics.commit_seconds.observe(time.perf_counter() - started)
        metrics.batches.labels(start).inc()
        # one broker: the in-flight lists are settled in the post-commit pipeline, after the
        # replies (one round trip for all of it); else on their own, after it
        together = self.broker is self.redis
        if follow is not None and self._stopping():
            follow = None  # a shutdown began while the batch ran (SIGTERM): it is the last
        drained = self._after_commit(
            outcome, batch.leases, settle=parts if together else (), follow=follow
        )
        try:
            taken = None
            if follow is not None:
                self._follow_guess.learn(bool(drained))
                taken = self._next_batch(drained, follow) if drained else None
            for p in [] if together else parts:
                try:
                    self.mailbox.settle(p, batch.leases[p])
                except Exception as e:  # committed: a restore would only bring back duplicates
                    log.error("keyq could not clear in-flight list partition=%s: %s", p, e)
            self._count(outcome)
        except Exception:
            if drained and follow is not None:
                # the next batch already sits in the in-flight lists, never applied: back to
                # its queue heads as it was, before the caller abandons this batch
                self._put_back(self._held({p: follow[p] for p in drained}), bump=False)
            raise
        return taken

    def _next_batch(
        self, drained: dict[int, list[bytes] | None], held: dict[int, int]
    ) -> _Batch | None:
        """The batch that a post-commit round trip took (Mailbox.drain_ready): each partition's
        whole in-flight list; a partition whose lease is not ours any more is let go."""
        batch = _Batch()
        for p, messages in drained.items():
            if messages is None:
                self._lost_here(p, held[p])
                continue
            batch.leases[p] = self.lease(p, held[p])
            batch.tokens[p] = held[p]
            self._take(p, [self._decode(m) for m in messages], batch)
        return batch if batch.leases else None

    def _committed_early(self, outcome: BatchOutcome, leases: dict[int, Lease]) -> None:
        """The keys of a batch that finished while another backs off are committed: their
        cache, replies and names go out now; the in-flight list is settled with the batch."""
        self.timers.note(outcome.timer_changes)
        self._after_commit(outcome, leases)
        self._count(outcome)

    def _dead_letter_alone(self, partition: int, batch: _Batch, error: RepoDataError) -> bool:
        """The database refused the data of a message applied alone: that message is the
        culprit. Dead-letter it with the database's words now (no need to wait for
        KEYQ_MAX_DELIVERIES); True when done."""
        assert batch.alone is not None
        culprit = batch.alone
        for p in batch.leases:
            self.activations.drop_partition(p)  # effects that never reached a commit
        only = _Batch(leases=dict(batch.leases), tokens=dict(batch.tokens))
        only.dead.append(_broker_dead_letter(partition, culprit, "data", str(error)))
        try:
            self._commit(only)
        except Exception as e:
            log.error("keyq could not dead-letter a refused message partition=%s: %s", partition, e)
            return False
        return True

    def _abandon(self, batch: _Batch, error: Exception) -> None:
        """Something unplanned failed mid-batch: forget every in-memory effect of the batch and
        put its messages back at their queue heads in order, each with its delivery count up
        (from now on each is applied alone; the one that keeps failing ends dead-lettered)."""
        log.error(
            "keyq batch failed, its messages go back to their queue heads partitions=%s "
            "node=%s error=%s: %s",
            list(batch.leases),
            self.node_id,
            type(error).__name__,
            error,
            exc_info=error,
        )
        metrics.batches_abandoned.inc()
        for p in batch.leases:
            self.activations.drop_partition(p)  # effects that never reached a commit
        self._put_back(batch, bump=True)

    def _held(self, tokens: dict[int, int]) -> _Batch:
        """A batch that names partitions (under these tokens) but holds nothing read yet: what
        a put-back needs of in-flight lists the worker never got to apply."""
        return _Batch(leases={p: self.lease(p, t) for p, t in tokens.items()}, tokens=dict(tokens))

    def _put_back(self, batch: _Batch, *, bump: bool) -> None:
        for p, lease in batch.leases.items():
            try:
                moved = self.mailbox.requeue(p, lease, bump=bump)
            except Exception as e:  # Redis down: the in-flight list waits for a restore
                log.error("keyq could not requeue partition=%s node=%s: %s", p, self.node_id, e)
                moved = -1
            if moved < 0:
                self._lost_here(p, batch.tokens[p])

    # --- messages on a queue that is not their partition's ----------------------------------

    def _misrouted(self, queue: str, message: dict[str, Any] | None) -> None:
        """A keyq.dispatch on a queue that is no partition's (the default queue: `celery call`
        without --queue): each envelope moves once to its key's partition; what cannot, or
        arrives misrouted a second time, is dead-lettered. Celery then acks it here."""
        if not isinstance(message, dict):
            log.error("keyq got no broker message to re-route queue=%s", queue)
            return
        raw = json.dumps(message).encode("utf-8")
        delivery = decode_document(message, raw, DEFAULT_QUEUE_TASKS, DISPATCH_TASK)
        dead: list[DeadLetter] = []
        groups: dict[int, list[object]] = {}
        if delivery.problem is not None or delivery.rerouted:
            why = delivery.problem or f"arrived on {queue} again after it was re-routed once"
            dead.append(_broker_dead_letter(-1, delivery, "misrouted", why, message))
        else:
            for env in delivery.envelopes:
                target = self._partition_of(env)
                if target is None:
                    dead.append(
                        _broker_dead_letter(
                            -1, delivery, "misrouted", f"no valid key to route by on {queue}",
                            env,
                        )
                    )
                else:
                    groups.setdefault(target, []).append(env)
        for target, envs in groups.items():
            self._send(target, envs, rerouted=True)
        if dead:
            self.repo.record_dead_letters(dead)
            for dl in dead:
                metrics.dead_letters.labels(dl.reason).inc()
        log.warning(
            "keyq re-routed a message from %s partitions=%s dead_lettered=%d message_id=%s",
            queue, sorted(groups), len(dead), delivery.message_id,
        )

    def _partition_of(self, envelope: object) -> int | None:
        key = envelope.get("key") if isinstance(envelope, dict) else None
        if not isinstance(key, str) or not key:
            return None
        try:
            return partition_for(key, self.settings.partitions)
        except UnicodeEncodeError:
            return None

    def _register_names(
        self, pipe: redis.client.Pipeline, acts: Sequence[Activation], leases: dict[int, Lease]
    ) -> None:
        """Register the activations' names, fenced by the lease each partition was applied
        under: once a partition has moved on, its old owner's late writes are refused."""
        by_partition: dict[int, list[tuple[str, str]]] = {}
        for act in acts:
            if act.partition in leases:
                by_partition.setdefault(act.partition, []).append(act.id)
        for p, names in by_partition.items():
            self.names.register_many(pipe, leases[p], names, self.node_id)

    def _after_commit(
        self,
        outcome: BatchOutcome,
        leases: dict[int, Lease],
        settle: Sequence[int] = (),
        follow: dict[int, int] | None = None,
    ) -> dict[int, list[bytes] | None] | None:
        """Cache, replies, registry and re-routes of a committed batch. None of it may undo the
        commit: a failure here is logged (the reconciler heals the cache; a caller times out).
        With `follow` (held partitions: tokens), the same pipeline then takes the next batch
        (Mailbox.drain_ready), whose messages are returned."""
        read = None
        sent = False
        try:
            for target, envs in _by_partition(outcome.reroutes).items():
                self._send(target, [e.to_wire() for e in envs], rerouted=True)
        except Exception as e:
            log.error("keyq could not re-route %d message(s): %s", len(outcome.reroutes), e)
        try:
            pipe = script_pipeline(self.redis)  # its scripts are not looked up every time
            self.cache.put_many(outcome.cache_entries, pipe=pipe)  # before the replies: a caller
            for message_id, encoded in outcome.replies:  # that reads after its reply sees it
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
            self._register_names(pipe, renew, leases)
            # a key evicted and activated again within this batch keeps its name
            gone = [a.id for a in outcome.evicted if a.id not in self.activations]
            self.names.release_many(pipe, gone, self.node_id)
            for p in settle:
                self.mailbox.settle(p, leases[p], pipe=pipe)
            for write in self.post_commit_writers:
                write(pipe, outcome)
            if follow:  # last: after the settle of the same partitions' in-flight lists
                read = self.mailbox.drain_ready(pipe, follow, self.lease, self.settings.batch_max)
            sent = True
            replies = pipe.execute()
            return None if read is None else read(replies[-1])
        except Exception as e:
            # the state is committed; the reconciler repairs the cache, callers time out
            log.error(
                "keyq post-commit Redis writes failed partition=%s: %s", outcome.partition, e
            )
            if sent and follow:
                # the pipeline may have taken the next batch into the in-flight lists: all of
                # them go back to their queue heads (this batch's messages too, if its settle
                # did not run: the dedupe ledger skips them when they come again)
                self._put_back(self._held(follow), bump=False)
                settle = [p for p in settle if p not in follow]
            for p in settle:  # on their own, then: committed messages must not stay in flight
                try:
                    self.mailbox.settle(p, leases[p])
                except Exception as e2:  # a restore would only bring back duplicates
                    log.error("keyq could not clear in-flight list partition=%s: %s", p, e2)
        return None

    def _count(self, outcome: BatchOutcome) -> None:
        from keyq import outcome_metrics
        from keyq.flower_events import FlowerEvents, events_of

        outcome_metrics.count(outcome)  # per-entity counters (keyq.outcome_metrics)
        for act in outcome.evicted:
            self._on_passivate(act)
        metrics.activations.set(len(self.activations))
        try:  # Celery task events per message for Flower (committed: nothing may raise)
            flower = self.__dict__.get("_flower_events")
            if flower is None:  # made here: _count() is the one hook that owns it
                flower = self.__dict__["_flower_events"] = FlowerEvents(
                    self.settings, self.node_id
                )
            if flower.enabled:  # successes are sampled before their events are built
                flower.emit(events_of(outcome, keep=flower.sample))
        except Exception as e:
            log.warning("keyq could not send task events node=%s error=%s", self.node_id, e)

    # --- housekeeping (consumer loop) ------------------------------------------------------

    def housekeeping(self) -> None:
        """Passivate idle activations, publish due timers and dead-letter refused messages of
        the partitions served here (never one given up since its last claim: its lease may still
        name this node in Redis until the next ownership tick), set gauges."""
        idle = self.activations.idle()
        served = self.ownership.serving()
        kept = [a for a in idle if a.entity_type.instance.always_on]
        if kept:  # always-on keys stay activated and named; only the activation cap evicts them
            idle = [a for a in idle if not a.entity_type.instance.always_on]
            for act in kept:
                self.activations.put(act)
            try:
                pipe = self.redis.pipeline(transaction=False)
                self._register_names(pipe, kept, {p: self.lease(p, t) for p, t in served.items()})
                pipe.execute()
            except redis.RedisError as e:
                log.error("keyq could not renew %d always-on name(s): %s", len(kept), e)
        if idle:
            for act in idle:
                self._on_passivate(act)
            self._release_names(idle)
            metrics.passivations.labels("idle").inc(len(idle))
        metrics.activations.set(len(self.activations))
        if served:
            try:
                self.timers.tick(served)
            except Exception as e:  # the next tick tries again; nothing was marked published
                log.error("keyq timer poll failed node=%s error=%s", self.node_id, e)
            self._dead_letter_poison(served)

    def _dead_letter_poison(self, held: dict[int, int]) -> None:
        """Dead-letter what the fetch refused on held partitions that receive nothing else
        (a busy partition's batches take it along)."""
        try:
            waiting = self.mailbox.poison_waiting(sorted(held))
        except Exception as e:
            log.error("keyq could not look for poison node=%s error=%s", self.node_id, e)
            return
        for partition in waiting:
            token = held[partition]
            batch = _Batch()
            batch.leases[partition] = self.lease(partition, token)
            batch.tokens[partition] = token
            try:
                taken = self.mailbox.take_poison(
                    partition, batch.leases[partition], POISON_PER_BATCH
                )
                if taken is None:
                    continue  # not ours any more
                self._take(partition, [self._decode(m) for m in taken], batch)
                self._commit(batch, start="housekeeping")
            except Exception as e:
                self._abandon(batch, e)
        if 0 in held:  # the default queue has no partition: partition 0's owner cleans it
            self._dead_letter_default_poison(held[0])

    def _dead_letter_default_poison(self, token: int) -> None:
        queue = default_queue(self.settings)
        batch = _Batch()
        batch.leases[0] = self.lease(0, token)
        batch.tokens[0] = token
        try:
            if not self.mailbox.poison_length(queue):
                return
            taken = self.mailbox.take_poison(0, batch.leases[0], POISON_PER_BATCH, queue)
            for raw in taken or []:
                d = decode(raw, DEFAULT_QUEUE_TASKS, DISPATCH_TASK)
                why = d.problem or "refused at fetch"
                batch.dead.append(
                    _broker_dead_letter(-1, d, "undecodable", f"on {queue}: {why}")
                )
            if taken:
                self._commit(batch, start="housekeeping")
        except Exception as e:
            self._abandon(batch, e)

    def _publish_fires(self, envelopes: Sequence[Envelope]) -> None:
        """Publish timer fires of one partition at its queue's tail, as one broker message."""
        self._send(envelopes[0].partition, [e.to_wire() for e in envelopes])

    def _send(self, partition: int, envelopes: list[object], rerouted: bool = False) -> None:
        """Timer fires and re-routes: never refused at KEYQ_MAX_QUEUE_DEPTH (not new load)."""
        if self._publisher is None:
            self._producer = make_app(self.settings, name="keyq-worker")
            self._publisher = Publisher(self.broker, self.settings, self._producer)
        self._publisher.publish_raw(
            partition,
            envelopes,
            None,
            depth_limit=False,
            extra_headers={REROUTED_HEADER: True} if rerouted else None,
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
        flower = self.__dict__.get("_flower_events")
        if flower is not None:
            flower.close()  # what the sending thread still holds goes out first
        if self._producer is not None:
            self._producer.close()
        self.repo.dispose()
        self.redis.close()


def watchdog_limit(settings: Settings, entities: EntityRegistry) -> float:
    """How long a batch may go without progress: twice the longest handler limit, plus slack
    (0 limits mean no handler limit: then twice the worker's default)."""
    limits = [settings.max_handler_seconds] + [
        entities.get(name).instance.supervision(settings.supervision).max_handler_seconds
        for name in entities.names()
    ]
    longest = max((x for x in limits if x > 0), default=settings.max_handler_seconds or 30.0)
    return 2.0 * longest + WATCHDOG_SLACK_S


def _by_partition(envelopes: Sequence[Envelope]) -> dict[int, list[Envelope]]:
    out: dict[int, list[Envelope]] = {}
    for env in envelopes:
        out.setdefault(env.partition, []).append(env)
    return out


def _broker_dead_letter(
    partition: int, d: Delivery, reason: str, problem: str, envelope: object = None
) -> DeadLetter:
    """A dead letter for a broker message (or one envelope of it) that was never applied."""
    doc = envelope if isinstance(envelope, dict) else (
        d.envelopes[0] if len(d.envelopes) == 1 and isinstance(d.envelopes[0], dict) else {}
    )
    return DeadLetter(
        message_id=str(doc.get("id") or d.message_id or ""),
        entity=str(doc.get("entity") or ""),
        key=str(doc.get("key") or ""),
        op=str(doc.get("op") or ""),
        partition=partition,
        envelope=None,
        reason=reason,
        error_type="MalformedMessageError",
        error_message=problem,
        raw=d.raw_b64 if d.raw else None,
        deliveries=d.deliveries,
    )
