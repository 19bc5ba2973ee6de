"""The apply step: one call applies a batch of a partition's messages and commits it.

This is keyq's worker loop body, callable in a test without Celery: give it the raw envelopes
of one partition in queue order and it (1) re-validates each one, dead-lettering what is
malformed, (2) loads the activations it needs in one Repo query, (3) runs the handlers key by
key in message order, skipping ids already applied, restarting a crashed key from the Repo under
the restart intensity, and (4) commits the whole batch in one transaction. It returns what must
happen after the commit (cache writes, replies) and what it did, as counters.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from keyq import metrics
from keyq import reply as replies
from keyq.activations import Activation, ActivationTable, KeyId
from keyq.context import HandlerContext, TimerFire, running
from keyq.dedupe import DedupeWindow
from keyq.entity import JSON, EntityRegistry, EntityType
from keyq.envelope import STRICT_JSON, Envelope, has_nul, parse_envelope
from keyq.errors import (
    KeyqError,
    MalformedMessageError,
    Rejected,
    RepoDataError,
    RepoError,
    StaleWriteError,
    UnknownEntityError,
    UnknownOperationError,
)
from keyq.records import (
    DeadLetter,
    StateWrite,
    StoredState,
    TimerChange,
    TimerDelete,
    TimerRow,
)
from keyq.repo import Repo
from keyq.repo_health import RepoHealth
from keyq.settings import Settings
from keyq.supervisor import Supervisor, time_limit
from keyq.timers import KeyTimers, decide

log = logging.getLogger(__name__)

REPO_RETRY_MAX_S = 2.0  # longest wait between tries while the database is down


@dataclass
class BatchOutcome:
    """What one batch did, and what must follow its commit."""

    partition: int
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    crashed: int = 0
    restarts: int = 0
    malformed: int = 0
    spawned: list[Activation] = field(default_factory=list)
    evicted: list[Activation] = field(default_factory=list)
    touched: list[Activation] = field(default_factory=list)
    replies: list[tuple[str, str]] = field(default_factory=list)  # (message id, encoded reply)
    cache_entries: list[tuple[str, str, int, JSON]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)  # send -> applied, per message
    sent: list[tuple[int, float]] = field(default_factory=list)  # (partition, producer clock)
    restarts_by_entity: dict[str, int] = field(default_factory=dict)
    timer_changes: list[TimerChange] = field(default_factory=list)  # committed with the batch
    timer_fires: int = 0  # timer fires whose handler ran
    stale_timer_fires: int = 0  # fires of timers cancelled or rescheduled since their publish
    reroutes: list[Envelope] = field(default_factory=list)  # arrived on another partition
    applied_by_entity: dict[str, int] = field(default_factory=dict)
    # every message a handler saw: (envelope, "applied" | "rejected" | "crashed", error text)
    messages: list[tuple[Envelope, str, str]] = field(default_factory=list)


@dataclass
class _KeyRun:
    """One pass over a key's pending messages: the new state, replies and timer changes."""

    state: JSON
    results: list[tuple[Envelope, str]]
    timers: KeyTimers
    fires: int = 0
    stale: int = 0


class _Crash(Exception):
    """Internal: a handler outcome that needs a reload of the key."""


@dataclass
class _KeyJob:
    """One key of a batch: its run (paused while it backs off) and what it did so far."""

    partition: int
    run: Generator[float, None, StateWrite | None]
    part: BatchOutcome  # merged into the batch's outcome once the key is done
    due: float = 0.0  # monotonic time its restart backoff ends
    done: bool = False
    write: StateWrite | None = None


def _merge(into: BatchOutcome, part: BatchOutcome) -> None:
    """Add what one key did to a batch's outcome (once per key of every batch: only the
    fields the key filled are touched)."""
    for name in _LIST_FIELDS:
        theirs = getattr(part, name)
        if theirs:
            getattr(into, name).extend(theirs)
    for name in _DICT_FIELDS:
        theirs = getattr(part, name)
        if theirs:
            mine = getattr(into, name)
            for k, n in theirs.items():
                mine[k] = mine.get(k, 0) + n
    for name in _COUNT_FIELDS:
        n = getattr(part, name)
        if n:
            setattr(into, name, getattr(into, name) + n)


def _fields_holding(kind: type) -> tuple[str, ...]:
    empty = BatchOutcome(0)
    return tuple(
        f.name
        for f in fields(BatchOutcome)
        if f.name != "partition" and isinstance(getattr(empty, f.name), kind)
    )


_LIST_FIELDS = _fields_holding(list)
_DICT_FIELDS = _fields_holding(dict)
_COUNT_FIELDS = _fields_holding(int)


def _dead_letter(
    env: Envelope, reason: str, exc: BaseException, attempts: int, tb: str = ""
) -> DeadLetter:
    return DeadLetter(
        message_id=env.id,
        entity=env.entity,
        key=env.key,
        op=env.op,
        partition=env.partition,
        envelope=env.to_wire(),
        reason=reason,
        error_type=type(exc).__name__,
        error_message=str(exc),
        traceback=tb,
        attempts=attempts,
    )


class Applier:
    """Applies batches for the partitions this process owns."""

    def __init__(
        self,
        settings: Settings,
        registry: EntityRegistry,
        repo: Repo,
        activations: ActivationTable,
        supervisor: Supervisor | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.repo = repo
        self.activations = activations
        self.supervisor = supervisor or Supervisor()
        self._sleep = sleep
        # called whenever the batch moves on (a handler starts, a wait ends): the watchdog's pulse
        self.on_progress: Callable[[], None] = lambda: None
        # told of database outages (keyq.repo_health: a node that cannot reach it steps back)
        self.repo_health: RepoHealth | None = None
        self.timer_clock: Callable[[], float] | None = None  # the database's clock (worker sets)
        self._defaults = settings.supervision

    # --- the step ------------------------------------------------------------------------

    def apply(
        self,
        partition: int,
        fence: int,
        raws: Sequence[object],
        keep_trying: Callable[[], bool] = lambda: True,
    ) -> BatchOutcome:
        """Apply and commit one batch; raises StaleWriteError if the partition moved on."""
        return self.apply_group([(partition, fence, raws)], keep_trying)

    def apply_group(
        self,
        batches: Sequence[tuple[int, int, Sequence[object]]],
        keep_trying: Callable[[], bool] = lambda: True,
        *,
        dead_letters: Sequence[DeadLetter] = (),
        rerouted: frozenset[str] = frozenset(),
        on_early_commit: Callable[[BatchOutcome], None] | None = None,
    ) -> BatchOutcome:
        """Apply batches of several partitions, (partition, fence, raws) each, and commit them
        in ONE transaction (one fsync), every fence checked; all or nothing.

        ``dead_letters`` (broker messages that cannot be applied) are committed with the batch;
        ``rerouted`` holds ids that were already moved once from a wrong partition (a second
        wrong arrival is dead-lettered, not moved again). Whatever raises, no activation keeps
        an effect that was not committed: every key the batch touched is dropped.

        A key whose handler crashed waits out its restart backoff without holding up the
        others: every other key runs first, and with ``on_early_commit`` the finished keys are
        committed at once (their replies need not wait; the callback gets what they did), the
        waiting keys in a second commit. The in-flight list is settled after the last commit;
        a crash in between redelivers the early keys' messages, which their committed ids skip.
        """
        outcome = BatchOutcome(batches[0][0])
        outcome.dead_letters.extend(dead_letters)
        fences = {p: fence for p, fence, _ in batches}
        touched: list[KeyId] = []
        try:
            jobs = self._start_keys(batches, outcome, keep_trying, rerouted, touched)
            waiting = [job for job in jobs if not job.done]
            if waiting and on_early_commit is not None and len(waiting) < len(jobs):
                early = BatchOutcome(outcome.partition)
                finished = [job for job in jobs if job.done]
                for job in finished:
                    _merge(early, job.part)
                self._commit(fences, finished, early, keep_trying)
                on_early_commit(early)
                jobs = list(waiting)  # (waiting shrinks below)
            while waiting:
                job = min(waiting, key=lambda j: j.due)
                self._sleep(max(0.0, job.due - time.monotonic()))
                if self._step(job):
                    waiting.remove(job)
            for job in jobs:
                _merge(outcome, job.part)
            self._commit(fences, jobs, outcome, keep_trying)
        except BaseException:
            for key_id in touched:
                self.activations.drop(key_id)
            raise
        return outcome

    def _commit(
        self,
        fences: dict[int, int],
        jobs: Sequence[_KeyJob],
        outcome: BatchOutcome,
        keep_trying: Callable[[], bool],
    ) -> None:
        writes: dict[int, list[StateWrite]] = {p: [] for p in fences}
        for job in jobs:
            if job.write is not None:
                writes[job.partition].append(job.write)
        (partition, fence), *rest = fences.items()
        self._retry_repo(
            lambda: self.repo.commit(
                partition,
                fence,
                writes[partition],
                outcome.dead_letters,
                timers=outcome.timer_changes,
                others=[(p, f, writes[p]) for p, f in rest],
            ),
            keep_trying,
            f"commit of partition(s) {list(fences)}",
        )

    def _start_keys(
        self,
        batches: Sequence[tuple[int, int, Sequence[object]]],
        outcome: BatchOutcome,
        keep_trying: Callable[[], bool],
        rerouted: frozenset[str],
        touched: list[KeyId],
    ) -> list[_KeyJob]:
        """Run every key of the batches up to its end or its first restart backoff."""
        jobs: list[_KeyJob] = []
        parsed: list[tuple[int, dict[KeyId, list[Envelope]]]] = []
        for partition, _fence, raws in batches:
            groups = self._parse(partition, raws, outcome, rerouted)
            touched.extend(groups)
            parsed.append((partition, groups))
        # one query for the activations and one for the timers of every partition's keys
        self._activate(parsed, outcome, keep_trying)
        everything = {key_id: envs for _, groups in parsed for key_id, envs in groups.items()}
        timers = self._load_timers(everything, keep_trying)
        for partition, groups in parsed:
            for key_id, envs in groups.items():
                act = self.activations.get(key_id)
                if act is None:  # evicted by the cap while loading this very batch
                    act = self._load_activations(partition, [key_id], outcome, keep_trying)[0]
                part = BatchOutcome(partition)
                run = self._run_key(act, envs, part, keep_trying, timers.get(key_id))
                job = _KeyJob(partition, run, part)
                self._step(job)
                jobs.append(job)
        return jobs

    @staticmethod
    def _step(job: _KeyJob) -> bool:
        """Run a key on to its end (True) or to its next restart backoff (False, due set)."""
        try:
            delay = next(job.run)
        except StopIteration as end:
            job.write, job.done = end.value, True
            return True
        job.due = time.monotonic() + delay
        return False

    # --- parsing ---------------------------------------------------------------------------

    def _parse(
        self,
        partition: int,
        raws: Sequence[object],
        outcome: BatchOutcome,
        rerouted: frozenset[str] = frozenset(),
    ) -> dict[KeyId, list[Envelope]]:
        groups: dict[KeyId, list[Envelope]] = {}
        for raw in raws:
            try:
                env = parse_envelope(
                    raw,
                    partitions=self.settings.partitions,
                    max_key_length=self.settings.max_key_length,
                )
                if env.partition != partition:
                    if env.id not in rerouted:  # moved once to its own partition, after commit
                        outcome.reroutes.append(env)
                        continue
                    raise MalformedMessageError(
                        f"message for partition {env.partition} arrived on partition {partition}"
                        " again after it was re-routed there once"
                    )
                entity_type = self.registry.get(env.entity)
                if not env.system:  # keyq.activate & co. run no handler (see _run_key)
                    entity_type.handler_for(env.op)
                    entity_type.check_wire_payload(env.op, env.payload)  # typed ops
            except (MalformedMessageError, UnknownEntityError, UnknownOperationError) as e:
                self._refuse(partition, raw, e, outcome)
                continue
            groups.setdefault((env.entity, env.key), []).append(env)
        return groups

    def _refuse(self, partition: int, raw: object, exc: KeyqError, outcome: BatchOutcome) -> None:
        doc = raw if isinstance(raw, dict) else {}
        msg_id = doc.get("id") if isinstance(doc.get("id"), str) else ""
        reason = "malformed" if isinstance(exc, MalformedMessageError) else "unknown"
        envelope = raw if _is_json(raw) else repr(raw)
        log.warning(
            "keyq message refused partition=%s message_id=%s reason=%s error=%s",
            partition,
            msg_id,
            reason,
            exc,
        )
        outcome.malformed += 1
        timer = doc.get("timer")
        if reason == "unknown" and isinstance(timer, dict):
            # a due timer whose entity or op is gone (code changed): consume it, or its owner
            # would publish it again and again
            fields = [doc.get("entity"), doc.get("key"), timer.get("name"), timer.get("id")]
            names = [f for f in fields if isinstance(f, str)]
            if len(names) == 4:
                outcome.timer_changes.append(TimerDelete(*names))
        outcome.dead_letters.append(
            DeadLetter(
                message_id=str(msg_id)[:128],
                entity=str(doc.get("entity", ""))[:128],
                key=str(doc.get("key", ""))[:1024],
                op=str(doc.get("op", ""))[:128],
                partition=partition,
                envelope=envelope,
                reason=reason,
                error_type=type(exc).__name__,
                error_message=str(exc),
            )
        )
        if msg_id and doc.get("reply"):
            outcome.replies.append(
                (
                    str(msg_id),
                    replies.encode(replies.error("refused", type(exc).__name__, str(exc))),
                )
            )

    # --- activation ------------------------------------------------------------------------

    def _activate(
        self,
        parsed: Sequence[tuple[int, dict[KeyId, list[Envelope]]]],
        outcome: BatchOutcome,
        keep_trying: Callable[[], bool],
    ) -> None:
        missing = [
            (partition, key_id)
            for partition, groups in parsed
            for key_id in groups
            if key_id not in self.activations
        ]
        if missing:
            self._load_missing(missing, outcome, keep_trying)

    def _load_activations(
        self,
        partition: int,
        missing: list[KeyId],
        outcome: BatchOutcome,
        keep_trying: Callable[[], bool],
    ) -> list[Activation]:
        return self._load_missing([(partition, k) for k in missing], outcome, keep_trying)

    def _load_missing(
        self,
        missing: list[tuple[int, KeyId]],
        outcome: BatchOutcome,
        keep_trying: Callable[[], bool],
    ) -> list[Activation]:
        """Activations of keys (of any partitions of the batch) from one Repo query."""
        key_ids = [key_id for _, key_id in missing]
        stored = self._retry_repo(
            lambda: self.repo.load(key_ids), keep_trying, f"load of {len(key_ids)} key(s)"
        )
        made = []
        for partition, key_id in missing:
            act = self._new_activation(partition, key_id, stored.get(key_id))
            outcome.spawned.append(act)
            outcome.evicted.extend(self.activations.put(act))
            made.append(act)
        return made

    def _new_activation(
        self, partition: int, key_id: KeyId, stored: StoredState | None
    ) -> Activation:
        entity_type = self.registry.get(key_id[0])
        if stored is None:
            state, version, recent = entity_type.instance.initial(), 0, []
        else:
            state, version, recent = stored.state, stored.version, stored.recent_ids
        state = _on_activate(entity_type, key_id[1], state)
        return Activation(
            entity_type, key_id[1], partition, state, version, DedupeWindow.from_stored(recent)
        )

    def _load_timers(
        self, groups: dict[KeyId, list[Envelope]], keep_trying: Callable[[], bool]
    ) -> dict[KeyId, dict[str, TimerRow]]:
        """The timer rows of the keys that receive a timer fire in this batch (one query)."""
        firing = [key_id for key_id, envs in groups.items() if any(e.timer for e in envs)]
        if not firing:
            return {}
        loaded: dict[KeyId, dict[str, TimerRow]] = self._retry_repo(
            lambda: self.repo.load_timers(firing), keep_trying, f"timers of {len(firing)} key(s)"
        )
        return loaded

    def _reload_state(self, act: Activation, keep_trying: Callable[[], bool]) -> JSON:
        """A restart: the key's committed state, fresh from the Repo."""
        stored = self._retry_repo(
            lambda: self.repo.load_one(act.entity_type.name, act.key),
            keep_trying,
            f"reload of {act.entity_type.name}/{act.key}",
        )
        state = act.entity_type.instance.initial() if stored is None else stored.state
        return _on_activate(act.entity_type, act.key, state)

    # --- running handlers ------------------------------------------------------------------

    def _run_key(
        self,
        act: Activation,
        envs: list[Envelope],
        outcome: BatchOutcome,
        keep_trying: Callable[[], bool],
        timer_rows: dict[str, TimerRow] | None = None,
    ) -> Generator[float, None, StateWrite | None]:
        """Run one key's messages of the batch. A generator: it yields the backoff before each
        restart (the driver runs the batch's other keys meanwhile) and returns the key's write."""
        system_ids = [e.id for e in envs if e.system]
        if system_ids:  # keyq.activate: loaded above; no handler run, no new version
            envs = [e for e in envs if not e.system]
            act.name_renewed_at = float("-inf")  # the name is (re)registered after the commit
            outcome.touched.append(act)
            log.info(
                "keyq activated by the reconciler entity=%s key=%s message_id=%s",
                act.entity_type.name,
                act.key,
                ",".join(system_ids),
            )
            if not envs:
                return None
        seen: set[str] = set()
        pending: list[Envelope] = []
        for env in envs:
            if env.id in seen or act.window.seen(env.id):
                outcome.duplicates += 1
                if env.reply:  # a retried call: behind the first reply if that is still unread
                    outcome.replies.append((env.id, replies.ALREADY_APPLIED))
                continue
            seen.add(env.id)
            pending.append(env)
        if not pending:
            return None

        entity_type = act.entity_type
        policy = entity_type.instance.supervision(self._defaults)
        settled: dict[str, str] = {}  # message id -> encoded error reply (not applied to state)
        failed: dict[str, tuple[str, str]] = {}  # message id -> (status, error) for observers
        attempts: dict[str, int] = {}
        state = act.state
        started = self.timer_clock() if self.timer_clock else time.time()
        while True:
            try:
                run = self._run_pending(
                    act, state, pending, settled, timer_rows, started, policy.max_handler_seconds
                )
                state, results = run.state, run.results
                break
            except _Crash as crash:
                env, exc, tb = crash.args
                crashed_at, restarted = time.monotonic(), False
                if isinstance(exc, Rejected):
                    outcome.rejected += 1
                    failed[env.id] = ("rejected", f"{type(exc).__name__}: {exc}")
                    settled[env.id] = replies.encode(
                        replies.error("rejected", type(exc).__name__, str(exc))
                    )
                else:
                    attempts[env.id] = attempts.get(env.id, 0) + 1
                    decision = self.supervisor.on_crash(
                        entity_type.name, act.key, attempts[env.id], policy, exc
                    )
                    retry = decision.restart
                    log.warning(
                        "keyq handler crashed entity=%s key=%s message_id=%s op=%s attempt=%s "
                        "retry=%s error=%s: %s",
                        env.entity,
                        env.key,
                        env.id,
                        env.op,
                        attempts[env.id],
                        retry,
                        type(exc).__name__,
                        exc,
                    )
                    if retry:
                        restarted = True
                        outcome.restarts += 1
                        outcome.restarts_by_entity[entity_type.name] = (
                            outcome.restarts_by_entity.get(entity_type.name, 0) + 1
                        )
                        yield decision.delay_s  # the batch's other keys go on meanwhile
                        self.on_progress()
                    else:
                        outcome.crashed += 1
                        failed[env.id] = ("crashed", f"{type(exc).__name__}: {exc}")
                        settled[env.id] = replies.encode(
                            replies.error("crashed", type(exc).__name__, str(exc))
                        )
                        outcome.dead_letters.append(
                            _dead_letter(env, decision.reason, exc, attempts[env.id], tb)
                        )
                # the handler may have mutated the state before raising: restart from the Repo
                state = self._reload_state(act, keep_trying)
                if restarted:  # crash -> backoff -> reloaded: the key is ready again
                    metrics.key_restart_ready_seconds.labels(entity_type.name).observe(
                        time.monotonic() - crashed_at
                    )

        now = time.time()
        # never forget an id of this batch: a redelivery of the whole batch must be skipped
        window = max(self.settings.dedupe_window, len(pending))
        for env in pending:
            act.window.remember(env.id, window)
            status, error = failed.get(env.id, ("applied", ""))
            outcome.messages.append((env, status, error))
            if env.id not in settled:
                outcome.applied += 1
                name = entity_type.name
                outcome.applied_by_entity[name] = outcome.applied_by_entity.get(name, 0) + 1
            if env.sent_at:
                outcome.latencies_s.append(max(0.0, now - env.sent_at))
                outcome.sent.append((env.partition, env.sent_at))
        for env, encoded in results:
            if env.reply:
                outcome.replies.append((env.id, encoded))
        outcome.timer_changes.extend(run.timers.changes())
        outcome.timer_fires += run.fires
        outcome.stale_timer_fires += run.stale
        act.state = state
        act.version += len(pending)
        outcome.touched.append(act)
        outcome.cache_entries.append((entity_type.name, act.key, act.version, state))
        return StateWrite(
            entity=entity_type.name,
            key=act.key,
            state=state,
            version=act.version,
            recent_ids=act.window.stored(),
        )

    def _run_pending(
        self,
        act: Activation,
        state: JSON,
        pending: list[Envelope],
        settled: dict[str, str],
        timer_rows: dict[str, TimerRow] | None,
        now: float,
        max_handler_seconds: float = 0.0,
    ) -> _KeyRun:
        """Run the key's messages in order from `state`; a crash aborts the whole run."""
        entity_type = act.entity_type
        run = _KeyRun(state, [], KeyTimers(entity_type.name, act.key, timer_rows))
        for env in pending:
            fire: TimerFire | None = None
            if env.timer is not None:
                row = run.timers.matches(env.timer)
                if row is None:  # cancelled or rescheduled since it was published: no effect
                    run.stale += 1
                    run.results.append((env, ""))
                    continue
                decision = decide(row, int(now * 1000))
                run.timers.consume(row, decision)  # even if the handler then crashes for good
                if not decision.run:
                    run.results.append((env, ""))
                    continue
                fire = TimerFire(row.name, row.due_ms / 1000.0, decision.missed)
            done = settled.get(env.id)
            if done is not None:
                run.results.append((env, done))
                continue
            ctx = HandlerContext(
                entity_type=entity_type,
                key=act.key,
                message_id=env.id,
                partition=act.partition,
                now=now,
                max_payload_bytes=self.settings.max_payload_bytes,
                timer=fire,
            )
            try:
                self.on_progress()
                limit = time_limit(max_handler_seconds, f"{entity_type.name}.{env.op}")
                with running(ctx), limit:
                    out = entity_type.ops[env.op](run.state, env.payload)
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        f"handler {entity_type.name}.{env.op} must return (new_state, reply), "
                        f"got {type(out).__name__}"
                    )
                new_state, value = out
                # JSON-only: a state or reply that cannot be encoded is the handler's fault
                _check_json(new_state, "state")
                encoded = replies.encode(replies.ok(value)) if env.reply else ""
            except Exception as exc:
                raise _Crash(env, exc, traceback.format_exc()) from exc
            run.state = new_state
            run.timers.apply(ctx.changes)  # only a handler that returned changes timers
            if fire is not None:
                run.fires += 1
            run.results.append((env, encoded))
        return run

    # --- repo resilience -------------------------------------------------------------------

    def _retry_repo(self, fn: Callable[[], Any], keep_trying: Callable[[], bool], what: str) -> Any:
        """Run fn; while the database is down, wait and try again (nothing is acked meanwhile)."""
        delay = 0.05
        failed = False
        while True:
            try:
                out = fn()
                if failed and self.repo_health is not None:
                    self.repo_health.succeeded()
                return out
            except (StaleWriteError, RepoDataError):
                raise  # a newer owner, or data the database refuses: waiting cannot help
            except RepoError as e:
                failed = True
                if self.repo_health is not None:
                    self.repo_health.failed()
                if not keep_trying():
                    raise
                log.error(
                    "keyq repo unavailable, retrying in %.2fs what=%s error=%s", delay, what, e
                )
                self._sleep(delay)
                self.on_progress()
                delay = min(REPO_RETRY_MAX_S, delay * 2)


def _on_activate(entity_type: EntityType, key: str, state: JSON) -> JSON:
    """Run the entity's on_activate hook; a hook that raises is logged and skipped."""
    try:
        return entity_type.instance.on_activate(state)
    except Exception:
        log.exception("keyq on_activate raised entity=%s key=%s", entity_type.name, key)
        return state


def _check_json(value: object, what: str) -> None:
    try:
        encoded = STRICT_JSON.encode(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"handler returned a {what} that is not JSON: {e}") from e
    if has_nul(encoded):  # PostgreSQL cannot store it: the commit would fail forever
        raise TypeError(f"handler returned a {what} with a NUL (\\u0000) character")
    if "\\ud" in encoded:  # lone surrogates: valid JSON escapes, but no database stores them
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise TypeError(f"handler returned a {what} with a lone surrogate: {e}") from e


def _is_json(value: object) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
