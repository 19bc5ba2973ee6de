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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from keyq import reply as replies
from keyq.activations import Activation, ActivationTable, KeyId
from keyq.entity import JSON, EntityRegistry, EntityType, RestartPolicy
from keyq.envelope import Envelope, parse_envelope
from keyq.errors import (
    KeyqError,
    MalformedMessageError,
    Rejected,
    RepoError,
    StaleWriteError,
    UnknownEntityError,
    UnknownOperationError,
)
from keyq.repo import DeadLetter, Repo, StateWrite, StoredState
from keyq.settings import Settings
from keyq.supervisor import RestartIntensity, backoff_delay

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
    restarts_by_entity: dict[str, int] = field(default_factory=dict)


class _Crash(Exception):
    """Internal: a handler outcome that needs a reload of the key."""


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
        intensity: RestartIntensity | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.repo = repo
        self.activations = activations
        self.intensity = intensity or RestartIntensity()
        self._sleep = sleep
        self._default_policy = RestartPolicy(settings.max_restarts, settings.restart_window_s)

    # --- the step ------------------------------------------------------------------------

    def apply(
        self,
        partition: int,
        fence: int,
        raws: Sequence[object],
        keep_trying: Callable[[], bool] = lambda: True,
    ) -> BatchOutcome:
        """Apply and commit one batch; raises StaleWriteError if the partition moved on."""
        outcome = BatchOutcome(partition)
        groups = self._parse(partition, raws, outcome)
        if groups:
            self._activate(partition, groups, outcome, keep_trying)
            writes: list[StateWrite] = []
            for key_id, envs in groups.items():
                act = self.activations.get(key_id)
                if act is None:  # evicted by the cap while loading this very batch
                    act = self._load_activations(partition, [key_id], outcome, keep_trying)[0]
                write = self._run_key(act, envs, outcome, keep_trying)
                if write is not None:
                    writes.append(write)
        else:
            writes = []
        try:
            self._retry_repo(
                lambda: self.repo.commit(partition, fence, writes, outcome.dead_letters),
                keep_trying,
                f"commit of partition {partition}",
            )
        except (StaleWriteError, RepoError):
            for key_id in groups:
                self.activations.drop(key_id)
            raise
        return outcome

    # --- parsing ---------------------------------------------------------------------------

    def _parse(
        self, partition: int, raws: Sequence[object], outcome: BatchOutcome
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
                    raise MalformedMessageError(
                        f"message for partition {env.partition} arrived on partition {partition}"
                    )
                self.registry.get(env.entity).handler_for(env.op)
            except (MalformedMessageError, UnknownEntityError, UnknownOperationError) as e:
                self._refuse(partition, raw, e, outcome)
                continue
            groups.setdefault((env.entity, env.key), []).append(env)
        return groups

    def _refuse(self, partition: int, raw: object, exc: KeyqError, outcome: BatchOutcome) -> None:
        doc = raw if isinstance(raw, dict) else {}
        msg_id = doc.get("id") if isinstance(doc.get("id"), str) else ""
        reason = "malformed" if isinstance(exc, MalformedMessageError) else "unknown"
        log.warning(
            "keyq message refused partition=%s message_id=%s reason=%s error=%s",
            partition,
            msg_id,
            reason,
            exc,
        )
        outcome.malformed += 1
        outcome.dead_letters.append(
            DeadLetter(
                message_id=str(msg_id)[:128],
                entity=str(doc.get("entity", ""))[:128],
                key=str(doc.get("key", ""))[:1024],
                op=str(doc.get("op", ""))[:128],
                partition=partition,
                envelope=raw if _is_json(raw) else repr(raw),
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
        partition: int,
        groups: dict[KeyId, list[Envelope]],
        outcome: BatchOutcome,
        keep_trying: Callable[[], bool],
    ) -> None:
        missing = [key_id for key_id in groups if key_id not in self.activations]
        if missing:
            self._load_activations(partition, missing, outcome, keep_trying)

    def _load_activations(
        self,
        partition: int,
        missing: list[KeyId],
        outcome: BatchOutcome,
        keep_trying: Callable[[], bool],
    ) -> list[Activation]:
        stored = self._retry_repo(
            lambda: self.repo.load(missing), keep_trying, f"load of {len(missing)} key(s)"
        )
        made = []
        for key_id in missing:
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
        state = entity_type.instance.on_activate(state)
        return Activation(entity_type, key_id[1], partition, state, version, list(recent))

    def _reload_state(self, act: Activation, keep_trying: Callable[[], bool]) -> JSON:
        """A restart: the key's committed state, fresh from the Repo."""
        stored = self._retry_repo(
            lambda: self.repo.load_one(act.entity_type.name, act.key),
            keep_trying,
            f"reload of {act.entity_type.name}/{act.key}",
        )
        if stored is None:
            return act.entity_type.instance.on_activate(act.entity_type.instance.initial())
        return act.entity_type.instance.on_activate(stored.state)

    # --- running handlers ------------------------------------------------------------------

    def _run_key(
        self,
        act: Activation,
        envs: list[Envelope],
        outcome: BatchOutcome,
        keep_trying: Callable[[], bool],
    ) -> StateWrite | None:
        seen: set[str] = set()
        pending: list[Envelope] = []
        for env in envs:
            if env.id in act.recent_set or env.id in seen:
                outcome.duplicates += 1
                continue
            seen.add(env.id)
            pending.append(env)
        if not pending:
            return None

        entity_type = act.entity_type
        policy = entity_type.instance.restart_policy(self._default_policy)
        settled: dict[str, str] = {}  # message id -> encoded error reply (not applied to state)
        attempts: dict[str, int] = {}
        state = act.state
        while True:
            try:
                state, results = self._run_pending(entity_type, state, pending, settled)
                break
            except _Crash as crash:
                env, exc, tb = crash.args
                if isinstance(exc, Rejected):
                    outcome.rejected += 1
                    settled[env.id] = replies.encode(
                        replies.error("rejected", type(exc).__name__, str(exc))
                    )
                else:
                    attempts[env.id] = attempts.get(env.id, 0) + 1
                    retry = attempts[env.id] <= policy.max_restarts and self.intensity.allow(
                        entity_type.name, policy
                    )
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
                        outcome.restarts += 1
                        outcome.restarts_by_entity[entity_type.name] = (
                            outcome.restarts_by_entity.get(entity_type.name, 0) + 1
                        )
                        self._sleep(backoff_delay(attempts[env.id]))
                    else:
                        outcome.crashed += 1
                        settled[env.id] = replies.encode(
                            replies.error("crashed", type(exc).__name__, str(exc))
                        )
                        outcome.dead_letters.append(
                            _dead_letter(env, "crashed", exc, attempts[env.id], tb)
                        )
                # the handler may have mutated the state before raising: restart from the Repo
                state = self._reload_state(act, keep_trying)

        now = time.time()
        for env in pending:
            act.remember(env.id, self.settings.dedupe_window)
            if env.id not in settled:
                outcome.applied += 1
            if env.sent_at:
                outcome.latencies_s.append(max(0.0, now - env.sent_at))
        for env, encoded in results:
            if env.reply:
                outcome.replies.append((env.id, encoded))
        act.state = state
        act.version += len(pending)
        outcome.touched.append(act)
        outcome.cache_entries.append((entity_type.name, act.key, act.version, state))
        return StateWrite(
            entity=entity_type.name,
            key=act.key,
            state=state,
            version=act.version,
            recent_ids=list(act.recent_ids),
        )

    def _run_pending(
        self,
        entity_type: EntityType,
        state: JSON,
        pending: list[Envelope],
        settled: dict[str, str],
    ) -> tuple[JSON, list[tuple[Envelope, str]]]:
        results: list[tuple[Envelope, str]] = []
        for env in pending:
            done = settled.get(env.id)
            if done is not None:
                results.append((env, done))
                continue
            try:
                out = entity_type.ops[env.op](state, env.payload)
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
            state = new_state
            results.append((env, encoded))
        return state, results

    # --- repo resilience -------------------------------------------------------------------

    def _retry_repo(self, fn: Callable[[], Any], keep_trying: Callable[[], bool], what: str) -> Any:
        """Run fn; while the database is down, wait and try again (nothing is acked meanwhile)."""
        delay = 0.05
        while True:
            try:
                return fn()
            except StaleWriteError:
                raise
            except RepoError as e:
                if not keep_trying():
                    raise
                log.error(
                    "keyq repo unavailable, retrying in %.2fs what=%s error=%s", delay, what, e
                )
                self._sleep(delay)
                delay = min(REPO_RETRY_MAX_S, delay * 2)


def _check_json(value: object, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise TypeError(f"handler returned a {what} that is not JSON: {e}") from e


def _is_json(value: object) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
