"""The reconciler: a Celery beat task that heals drift between registry, cache and Repo.

Each run is bounded by a batch size and a time budget, holds a Redis lock so that two beats
(or a manual run beside a beat) never reconcile at once, logs one line and records metrics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from keyq import metrics
from keyq.registry import NameRegistry
from keyq.scripts import register
from keyq.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    """What one run did."""

    ran: bool = True
    names_checked: int = 0
    names_released: int = 0
    duration_s: float = 0.0
    budget_exhausted: bool = False
    skipped_reason: str = ""
    details: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Reconciler:
    """One reconcile pass over the registry (bounded, locked, observable)."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.client = client or redis.Redis.from_url(settings.redis_url)
        self.names = NameRegistry(self.client, settings)
        self._compare_delete = register(self.client, "compare_delete")
        self.lock_key = settings.redis_key("reconcile", "lock")

    def run_once(self) -> ReconcileReport:
        started = time.monotonic()
        token = f"{time.time()}"
        lock_ms = int(max(self.settings.reconcile_budget_s * 2, 1.0) * 1000)
        if not self.client.set(self.lock_key, token, nx=True, px=lock_ms):
            return ReconcileReport(ran=False, skipped_reason="another reconciler is running")
        report = ReconcileReport()
        try:
            self._release_orphan_names(report, started)
        finally:
            self._compare_delete(keys=[self.lock_key], args=[token])
        report.duration_s = time.monotonic() - started
        metrics.reconcile_runs.inc()
        metrics.reconcile_seconds.observe(report.duration_s)
        log.info(
            "keyq reconcile names_checked=%d names_released=%d duration_ms=%.1f budget_hit=%s",
            report.names_checked,
            report.names_released,
            report.duration_s * 1000,
            report.budget_exhausted,
        )
        return report

    def _over_budget(self, report: ReconcileReport, started: float, done: int) -> bool:
        if done >= self.settings.reconcile_batch or (
            time.monotonic() - started > self.settings.reconcile_budget_s
        ):
            report.budget_exhausted = True
            return True
        return False

    def _release_orphan_names(self, report: ReconcileReport, started: float) -> None:
        """(a) names whose owner node no longer heartbeats."""
        live = set(self.names_live_members())
        for name_key, node in self.names.scan_names():
            if self._over_budget(report, started, report.names_checked):
                return
            report.names_checked += 1
            if node not in live and self._compare_delete(keys=[name_key], args=[node]):
                report.names_released += 1
                metrics.reconcile_healed.labels("orphan_name").inc()

    def names_live_members(self) -> list[str]:
        from keyq.ownership import Membership

        return list(Membership(self.client, self.settings).live())


def install_reconcile_task(app: Any, settings: Settings) -> None:
    """Register the beat task on a Celery app (worker side)."""
    from keyq.celery_app import RECONCILE_TASK

    @app.task(name=RECONCILE_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
    def reconcile() -> dict[str, Any]:
        return Reconciler(settings).run_once().to_json()
