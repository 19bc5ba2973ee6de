"""The reconciler: a Celery beat task that heals drift between registry, cache and Repo.

One run does, in order, each step bounded by the batch size and its share of the time budget:

(a) release registry names whose owner node no longer heartbeats;
(b) re-activate keys of ``always_on`` entities that the Repo marks active but no live node
    holds, by publishing a ``keyq.activate`` system message on the key's partition (the worker
    loads the key and registers its name; no handler runs, no version is written);
(c) refresh or drop cache entries older (or newer) than the Repo's version of the key;
(d) warm the cache with the most-read keys that are missing from it;
(e) sweep the cache back within KEYQ_CACHE_MAX_KEYS.

Steps that walk a keyspace (names, cache index, always-on keys) keep a cursor in Redis, so
successive runs cover everything however large it is. A Redis lock around each run makes a
second beat (or a manual run beside a beat) harmless: the later run is skipped and says so.
Each run logs one line and records its counts and duration as metrics.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import kombu.exceptions
import redis
import sqlalchemy as sa

from keyq import metrics
from keyq.cache import StateCache
from keyq.cluster import Membership
from keyq.connections import redis_client
from keyq.entity import EntityRegistry
from keyq.envelope import ACTIVATE_OP, Envelope, make_system_envelope
from keyq.errors import BrokerUnavailableError, CacheUnavailableError, RepoError
from keyq.registry import NameRegistry
from keyq.repo import Repo, state_table
from keyq.scripts import register
from keyq.settings import Settings, redact_url
from keyq.sweeper import CacheSweeper

log = logging.getLogger(__name__)

FAULT_RECONCILE_SLEEP = "KEYQ_FAULT_RECONCILE_SLEEP_S"  # tests: hold the lock this long per run
SCAN_STEP = 500  # keys asked of Redis per SCAN/ZSCAN call
ACTIVATION_RETRY_INTERVALS = 3  # a published activation is not repeated for this many intervals

Publish = Callable[[Sequence[Envelope]], None]


@dataclass
class ReconcileReport:
    """What one run did (zeros everywhere on a healthy system)."""

    ran: bool = True
    skipped_reason: str = ""
    names_checked: int = 0
    names_released: int = 0
    always_on_checked: int = 0
    activations_published: int = 0
    cache_checked: int = 0
    cache_refreshed: int = 0
    cache_dropped: int = 0
    warm_checked: int = 0
    warmed: int = 0
    swept: int = 0
    sweep_expired: int = 0
    errors: int = 0
    budget_exhausted: bool = False
    lock_lost: bool = False
    started_at: float = 0.0  # wall clock, for log readers checking that runs never overlap
    finished_at: float = 0.0
    duration_s: float = 0.0

    @property
    def healed(self) -> int:
        """Drifts repaired by this run."""
        return (
            self.names_released
            + self.activations_published
            + self.cache_refreshed
            + self.cache_dropped
            + self.warmed
            + self.swept
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "healed": self.healed}


class Reconciler:
    """One reconcile pass at a time across the deployment (bounded, locked, observable)."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis | None = None,
        *,
        registry: EntityRegistry | None = None,
        repo: Repo | None = None,
        app: Any = None,
        hold: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.client = client or redis_client(settings.redis_url, settings.timeouts)
        self._registry = registry
        self._repo = repo
        self._app = app
        self._own_app = app is None  # made here on first publish, closed by close()
        self._publisher: Any = None  # keyq.publisher.Publisher, made on first publish
        self._hold = hold  # called while the lock is held (tests force a slow run with it)
        self.names = NameRegistry(self.client, settings)
        self.cache = StateCache(self.client, settings)
        self.sweeper = CacheSweeper(self.client, settings)
        self.membership = Membership(self.client, settings)
        self._compare_delete = register(self.client, "compare_delete")
        self._renew = register(self.client, "lease_renew")
        self.lock_key = settings.redis_key("reconcile", "lock")
        self.lock_ms = int(max(settings.reconcile_budget_s * 3, 5.0) * 1000)
        # the steps of the last run that failed, each with its error as a keyq error
        self.step_errors: list[tuple[str, Exception]] = []

    # --- lazily built dependencies ---------------------------------------------------------

    @property
    def registry(self) -> EntityRegistry:
        if self._registry is None:
            self._registry = EntityRegistry.from_modules(self.settings.entity_modules)
        return self._registry

    @property
    def repo(self) -> Repo:
        if self._repo is None:
            self._repo = Repo(self.settings.database_url, timeouts=self.settings.timeouts)
        return self._repo

    def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish system envelopes of one partition as one keyq.dispatch message."""
        from keyq.celery_app import make_app
        from keyq.publisher import Publisher

        if self._app is None:
            self._app = make_app(self.settings, name="keyq-reconciler")
        if self._publisher is None:
            broker = (
                self.client
                if self.settings.broker_url == self.settings.redis_url
                else redis_client(self.settings.broker_url, self.settings.timeouts)
            )
            self._publisher = Publisher(broker, self.settings, self._app)
        # re-activations are keyq's own housekeeping, not new load: never refused at the limit
        self._publisher.publish(envelopes, depth_limit=False)

    def close(self) -> None:
        if self._repo is not None:
            self._repo.dispose()
        if self._own_app and self._app is not None:
            self._app.close()
        self.client.close()

    # --- the run ---------------------------------------------------------------------------

    def run_once(self) -> ReconcileReport:
        """One bounded pass; skipped (ran=False) while another run holds the lock."""
        token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.step_errors = []
        try:
            locked = self.client.set(self.lock_key, token, nx=True, px=self.lock_ms)
        except redis.RedisError as e:
            raise CacheUnavailableError(
                f"Redis at {redact_url(self.settings.redis_url)} is not answering: {e}"
            ) from e
        if not locked:
            metrics.reconcile_skipped.inc()
            log.info(
                "keyq reconcile skipped reason=locked holder=%r", self.client.get(self.lock_key)
            )
            return ReconcileReport(ran=False, skipped_reason="another reconciler is running")
        started = time.monotonic()
        report = ReconcileReport(started_at=time.time())
        steps = (
            self._release_orphan_names,
            self._activate_always_on,
            self._refresh_stale_cache,
            self._warm_cache,
            self._sweep,
        )
        budget = self.settings.reconcile_budget_s
        try:
            if self._hold is not None:
                self._hold()
            for i, step in enumerate(steps):
                if not self._renew(keys=[self.lock_key], args=[self.lock_ms, token])[0]:
                    report.lock_lost = True  # ran past the lock's TTL: stop, another may run
                    break
                if time.monotonic() - started > budget:
                    report.budget_exhausted = True
                    break
                deadline = started + budget * (i + 1) / len(steps)  # leftovers roll forward
                try:
                    step(report, deadline)
                except Exception as e:  # one failing step (Repo, broker down) stops no other
                    report.errors += 1
                    self._step_failed(step.__name__, e)
        finally:
            report.finished_at = time.time()
            try:
                self._compare_delete(keys=[self.lock_key], args=[token])
            except redis.RedisError as e:  # the lock runs out by itself
                log.warning("keyq reconcile could not release its lock: %s", e)
        report.duration_s = time.monotonic() - started
        self._record(report)
        return report

    def _step_failed(self, step: str, e: Exception) -> None:
        """Keep the step's error (as a keyq error when a server failed) and log it: one line
        for a server that is down, a traceback for anything else."""
        name = step.lstrip("_")
        error: Exception = e
        if isinstance(e, redis.RedisError):
            error = CacheUnavailableError(
                f"step {name}: Redis at {redact_url(self.settings.redis_url)} is not answering: {e}"
            )
        elif isinstance(e, sa.exc.SQLAlchemyError):
            error = RepoError(
                f"step {name}: database at {redact_url(self.settings.database_url)}: {e}"
            )
        elif isinstance(e, kombu.exceptions.OperationalError):
            error = BrokerUnavailableError(
                f"step {name}: broker at {redact_url(self.settings.broker_url)} "
                f"is not answering: {e}"
            )
        if error is not e:
            error.__cause__ = e
        self.step_errors.append((name, error))
        if isinstance(error, CacheUnavailableError | RepoError | BrokerUnavailableError):
            log.error(
                "keyq reconcile step failed step=%s error=%s: %s", step, type(error).__name__, error
            )
        else:
            log.exception("keyq reconcile step failed step=%s", step)

    def _record(self, report: ReconcileReport) -> None:
        metrics.reconcile_runs.inc()
        metrics.reconcile_seconds.observe(report.duration_s)
        for kind, n in (
            ("orphan_name", report.names_released),
            ("always_on_activation", report.activations_published),
            ("stale_cache_refreshed", report.cache_refreshed),
            ("stale_cache_dropped", report.cache_dropped),
            ("cache_warmed", report.warmed),
            ("cache_swept", report.swept),
        ):
            if n:
                metrics.reconcile_healed.labels(kind).inc(n)
        log.info(
            "keyq reconcile names_released=%d activations=%d cache_refreshed=%d "
            "cache_dropped=%d warmed=%d swept=%d checked=%d errors=%d duration_ms=%.1f "
            "budget_hit=%s lock_lost=%s started=%.6f finished=%.6f",
            report.names_released,
            report.activations_published,
            report.cache_refreshed,
            report.cache_dropped,
            report.warmed,
            report.swept,
            report.names_checked
            + report.always_on_checked
            + report.cache_checked
            + report.warm_checked,
            report.errors,
            report.duration_s * 1000,
            report.budget_exhausted,
            report.lock_lost,
            report.started_at,
            report.finished_at,
        )

    def _spent(self, report: ReconcileReport, deadline: float, done: int) -> bool:
        if done >= self.settings.reconcile_batch or time.monotonic() > deadline:
            report.budget_exhausted = True
            return True
        return False

    def _cursor_key(self, name: str) -> str:
        return self.settings.redis_key("reconcile", "cursor", name)

    # --- (a) names of dead nodes -----------------------------------------------------------

    def _release_orphan_names(self, report: ReconcileReport, deadline: float) -> None:
        """Names whose node no longer heartbeats (a crashed worker's leftovers)."""
        live = set(self.membership.live())
        pattern = self.settings.redis_key("n", "*")
        cursor = int(self.client.get(self._cursor_key("names")) or 0)
        suspects: list[tuple[Any, bytes]] = []
        while True:
            cursor, raw_keys = self.client.scan(
                cursor, match=pattern, count=min(SCAN_STEP, self.settings.reconcile_batch)
            )
            if raw_keys:
                pipe = self.client.pipeline(transaction=False)
                for k in raw_keys:
                    pipe.get(k)
                for k, node in zip(raw_keys, pipe.execute(), strict=True):
                    if node is None:
                        continue
                    report.names_checked += 1
                    if node.decode() not in live:
                        suspects.append((k, node))
            if cursor == 0 or self._spent(report, deadline, report.names_checked):
                break
        self.client.set(self._cursor_key("names"), cursor)
        if not suspects:
            return
        live = set(self.membership.live())  # a node that joined meanwhile keeps its names
        for k, node in suspects:
            if node.decode() not in live and self._compare_delete(keys=[k], args=[node]):
                report.names_released += 1

    # --- (b) always-on keys with no activation ---------------------------------------------

    def _activate_always_on(self, report: ReconcileReport, deadline: float) -> None:
        entities = [n for n in self.registry.names() if self.registry.get(n).instance.always_on]
        if not entities:
            return
        raw_after = self.client.get(self._cursor_key("always_on"))
        after = tuple(json.loads(raw_after)) if raw_after else None
        batch = self.settings.reconcile_batch
        t = state_table.c
        query = (
            sa.select(t.entity, t.key)
            .where(t.entity.in_(entities), t.active.is_(True))
            .order_by(t.entity, t.key)
            .limit(batch)
        )
        if after is not None:
            query = query.where(
                (t.entity > after[0]) | ((t.entity == after[0]) & (t.key > after[1]))
            )
        with self.repo.engine.connect() as conn:
            rows = [(r.entity, r.key) for r in conn.execute(query)]
        if len(rows) < batch:
            self.client.delete(self._cursor_key("always_on"))  # wrap around next run
        else:
            self.client.set(self._cursor_key("always_on"), json.dumps(rows[-1]))
        report.always_on_checked += len(rows)
        if not rows:
            return
        live = set(self.membership.live())
        pipe = self.client.pipeline(transaction=False)
        for entity, key in rows:
            pipe.get(self.names.name_key(entity, key))
        holders = pipe.execute()
        orphans = [
            row
            for row, node in zip(rows, holders, strict=True)
            if node is None or node.decode() not in live
        ]
        if not orphans:
            return
        # one activation per key per few intervals, so a down cluster's queues do not fill up
        marker_ms = int(self.settings.reconcile_interval_s * ACTIVATION_RETRY_INTERVALS * 1000)
        pipe = self.client.pipeline(transaction=False)
        for entity, key in orphans:
            pipe.set(
                self.settings.redis_key("reconcile", "activating", entity, key),
                1,
                nx=True,
                px=max(marker_ms, 1000),
            )
        fresh = [row for row, ok in zip(orphans, pipe.execute(), strict=True) if ok]
        by_partition: dict[int, list[Envelope]] = {}
        for entity, key in fresh:
            env = make_system_envelope(
                entity, key, ACTIVATE_OP, partitions=self.settings.partitions
            )
            by_partition.setdefault(env.partition, []).append(env)
        for group in by_partition.values():
            for start in range(0, len(group), self.settings.batch_max):
                self.publish(group[start : start + self.settings.batch_max])
                report.activations_published += len(group[start : start + self.settings.batch_max])

    # --- (c) cache entries that disagree with the Repo -------------------------------------

    def _refresh_stale_cache(self, report: ReconcileReport, deadline: float) -> None:
        cursor = int(self.client.get(self._cursor_key("cache")) or 0)
        pairs: list[tuple[str, str]] = []
        while True:
            cursor, found = self.cache.scan_index(
                cursor, min(SCAN_STEP, self.settings.reconcile_batch)
            )
            pairs.extend(found)
            if cursor == 0 or self._spent(report, deadline, len(pairs)):
                break
        self.client.set(self._cursor_key("cache"), cursor)
        pairs = list(dict.fromkeys(pairs))[: self.settings.reconcile_batch]
        cached = [
            (pair, v)
            for pair, v in zip(pairs, self.cache.versions(pairs), strict=True)
            if v is not None  # expired or swept: nothing to compare
        ]
        report.cache_checked += len(cached)
        if not cached:
            return
        stored = self.repo.load([pair for pair, _ in cached])  # read after the cache: never older
        refresh = []
        for (entity, key), version in cached:
            row = stored.get((entity, key))
            if row is None or row.version < version:
                if self.cache.drop(entity, key, version=version):
                    report.cache_dropped += 1
            elif row.version > version:
                refresh.append((entity, key, row.version, row.state))
        if refresh:
            report.cache_refreshed += self.cache.put_many(refresh)

    # --- (d) the most-read keys, warm before they are asked for ----------------------------

    def _warm_cache(self, report: ReconcileReport, deadline: float) -> None:
        n = min(self.settings.reconcile_batch, self.settings.cache_max_keys)
        hot = [(entity, key) for entity, key, _ in self.cache.most_read(n)]
        report.warm_checked += len(hot)
        missing = [pair for pair, v in zip(hot, self.cache.versions(hot), strict=True) if v is None]
        if not missing or time.monotonic() > deadline:
            return
        stored = self.repo.load(missing)
        entries = [(e, k, row.version, row.state) for (e, k), row in stored.items()]
        if entries:
            report.warmed += self.cache.put_many(entries)

    # --- (e) the size bound ----------------------------------------------------------------

    def _sweep(self, report: ReconcileReport, deadline: float) -> None:
        swept = self.sweeper.sweep(budget_s=max(0.0, deadline - time.monotonic()))
        report.swept += swept.dropped
        report.sweep_expired += swept.expired


def install_reconcile_task(app: Any, settings: Settings) -> None:
    """Register the beat tasks (reconcile, cache sweep) on a worker's Celery app."""
    from keyq.celery_app import CACHE_SWEEP_TASK, RECONCILE_TASK

    holder: dict[str, Any] = {}
    lock = threading.Lock()

    def reconciler() -> Reconciler:
        with lock:
            if "r" not in holder:
                pause = float(os.environ.get(FAULT_RECONCILE_SLEEP, "0") or 0)
                holder["r"] = Reconciler(
                    settings, app=app, hold=(lambda: time.sleep(pause)) if pause else None
                )
            return holder["r"]  # type: ignore[no-any-return]

    # A worker applies its partitions serially in one thread: a reconcile run (up to its time
    # budget) must not hold them up, so the task only hands the run to one background thread.
    # A run asked for while another is pending or running on this worker is skipped.
    busy = threading.Event()

    def in_background(name: str, run: Callable[[], Any]) -> dict[str, Any]:
        if busy.is_set():
            return {"scheduled": False, "reason": f"a {name} run is still going on this worker"}
        busy.set()

        def go() -> None:
            try:
                run()
            except Exception:
                log.exception("keyq %s run failed", name)
            finally:
                busy.clear()

        threading.Thread(target=go, name=f"keyq-{name}", daemon=True).start()
        return {"scheduled": True}

    @app.task(name=RECONCILE_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
    def reconcile() -> dict[str, Any]:
        return in_background("reconcile", lambda: reconciler().run_once())

    @app.task(name=CACHE_SWEEP_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
    def cache_sweep() -> dict[str, Any]:
        return in_background("cache-sweep", lambda: reconciler().sweeper.sweep())
