"""The worker's broker consumer: Celery's own, reconnecting within a second of the broker's
return instead of on Celery's growing schedule.

Celery's consumer calls kombu's ``ensure_connection`` with kombu's defaults: sleep 2 s after the
first failed attempt, then 4, 6 ... up to 30 s. A Redis failover (Sentinel promotes a replica
1-3 s after the primary died) then fell between two attempts: in tests/test_sentinel.py the
attempt at +2.0 s met "No master found", the next came 4 s later, and every partition waited
for it (promotion at +2.3 s, served again at +6.4 s). Here the sleeps start at
BROKER_RECONNECT_START_S and grow to BROKER_RECONNECT_MAX_S (keyq.connections), so a broker that
is back is found within about that maximum; an attempt against a broker still down costs a
refused connect (or the connect timeout) and a log line per sentinel. Everything else is
Celery's (the retry count, the shutdown check, the log lines).

``keyq.celery_app.celery_settings`` names this class in ``worker_consumer``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from keyq.connections import (
    BROKER_RECONNECT_MAX_S,
    BROKER_RECONNECT_START_S,
    BROKER_RECONNECT_STEP_S,
)


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer whose broker (re)connection retries are spaced by keyq's schedule."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = partial(
            conn.ensure_connection,
            interval_start=BROKER_RECONNECT_START_S,
            interval_step=BROKER_RECONNECT_STEP_S,
            interval_max=BROKER_RECONNECT_MAX_S,
        )
        return super().ensure_connected(conn)
