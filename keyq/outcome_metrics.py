"""A committed batch's counters, per entity: what WorkerRuntime._count exports.

Kept apart from keyq.worker so that the metric names and labels live next to keyq.metrics and
can be tested on a plain BatchOutcome, without a worker.
"""

from __future__ import annotations

from typing import Any

from keyq import metrics

MIXED = "(mixed)"  # entity label of applied messages the batch does not attribute to one entity


def applied_by_entity(outcome: Any) -> dict[str, int]:
    """Applied messages per entity type. Uses the applier's own per-entity count when it has one
    (``applied_by_entity``); otherwise a batch that touched a single entity type is attributed
    to it exactly, and a mixed batch to ``(mixed)``."""
    exact = getattr(outcome, "applied_by_entity", None)
    if isinstance(exact, dict) and exact:
        return {str(k): int(v) for k, v in exact.items() if v}
    if not outcome.applied:
        return {}
    names = {act.entity_type.name for act in outcome.touched}
    name = names.pop() if len(names) == 1 else MIXED
    return {name: int(outcome.applied)}


def count(outcome: Any) -> None:
    """Export one committed batch's counters (the caller sets the activation gauge)."""
    metrics.batch_size.observe(outcome.applied + outcome.rejected + outcome.crashed)
    for latency in outcome.latencies_s:
        metrics.dispatch_latency.observe(latency)
    if outcome.duplicates:
        metrics.duplicates_skipped.inc(outcome.duplicates)
    for dl in outcome.dead_letters:
        metrics.dead_letters.labels(dl.reason).inc()
        metrics.dead_letters_by_entity.labels(dl.entity or "(none)", dl.reason).inc()
    for entity, n in outcome.restarts_by_entity.items():
        metrics.restarts.labels(entity).inc(n)
    for act in outcome.spawned:
        metrics.spawns.labels(act.entity_type.name).inc()
    if outcome.evicted:
        metrics.passivations.labels("evicted").inc(len(outcome.evicted))
    for entity, n in applied_by_entity(outcome).items():
        metrics.messages_applied.labels(entity).inc(n)
