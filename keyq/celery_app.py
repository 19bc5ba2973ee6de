"""Celery application factory and configuration: the producer side's only Celery import.

Settings come from keyq's Settings (the environment); ``celeryconfig.py`` at the project root
exposes the same values to the plain ``celery`` and ``flower`` commands.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from keyq.connections import broker_transport_options, broker_url_for_kombu, is_sentinel_url
from keyq.settings import Settings

DISPATCH_TASK = "keyq.dispatch"  # applies a list of envelopes of one partition
RECONCILE_TASK = "keyq.reconcile"  # the periodic reconciler (beat)
CACHE_SWEEP_TASK = "keyq.cache_sweep"  # the periodic cache sweep (beat)
VISIBILITY_TIMEOUT_S = 6 * 3600  # kombu's own restore stays out of the way; keyq restores
# An idle consumer's wait for a wake token, after which it looks at its queues anyway: a message
# published without a token (plain Celery, another language) is noticed within this. A handoff
# waits it out before releasing a lease (keyq.mailbox.HANDOFF_GRACE_S).
BRPOP_TIMEOUT_S = 0.05
TICK_OPTION = "keyq_wake_tick_s"  # transport option: a worker's idle consumer looks this often
TRANSPORT = "keyq.transport:Transport"  # kombu's Redis transport with keyq's atomic fetch ...
SENTINEL_TRANSPORT = "keyq.transport:SentinelTransport"  # ... and the same on Redis Sentinel
BROKER_CONSUMER = "keyq.broker_consumer:Consumer"  # the worker's consumer (loaded by workers only)


def broker_transport(settings: Settings) -> str:
    """keyq's transport class for the broker URL (plain Redis or Sentinel)."""
    return SENTINEL_TRANSPORT if is_sentinel_url(settings.broker_url) else TRANSPORT


def default_queue(settings: Settings) -> str:
    """The shared queue for keyq's housekeeping tasks (reconciler)."""
    return f"{settings.namespace}.default"


def celery_settings(settings: Settings) -> dict[str, Any]:
    """The Celery configuration keyq needs, as a plain dict (for celeryconfig.py too)."""
    return {
        "broker_url": broker_url_for_kombu(settings.broker_url),
        "broker_transport": broker_transport(settings),
        "broker_transport_options": {
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            "priority_steps": [0],
            **broker_transport_options(settings.timeouts, settings.broker_url),
            "keyq_max_queue_depth": settings.max_queue_depth,  # keyq.transport reads it ...
            # ... and these: a keyq.dispatch sent with send_task WAITs as keyq's publisher does
            "keyq_min_replicas": settings.publish_min_replicas,
            "keyq_replica_timeout_ms": settings.publish_replica_timeout_ms,
        },
        "broker_connection_timeout": settings.redis_connect_timeout_s,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # JSON only on the wire; a pickled message is refused by every keyq worker
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_ignore_result": True,
        # ack after the commit; never re-queue at the tail (that would break per-key order)
        "task_acks_late": True,
        "task_acks_on_failure_or_timeout": False,
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Celery's consumer, reconnecting to a lost broker within about a second of its return
        "worker_consumer": BROKER_CONSUMER,
        "task_default_queue": default_queue(settings),
        "task_create_missing_queues": True,
        # Flower shows keyq's tasks and queues
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "beat_schedule": {
            "keyq-reconcile": {
                "task": RECONCILE_TASK,
                "schedule": settings.reconcile_interval_s,
                "options": {"queue": default_queue(settings), "expires": 60},
            },
            "keyq-cache-sweep": {
                "task": CACHE_SWEEP_TASK,
                "schedule": settings.cache_sweep_interval_s,
                "options": {"queue": default_queue(settings), "expires": 60},
            },
        },
    }


def make_app(settings: Settings, name: str = "keyq", *, depth_limit: bool = True) -> Celery:
    """A Celery app configured for keyq; no task bodies (workers add theirs). depth_limit=False:
    publishes are never refused at KEYQ_MAX_QUEUE_DEPTH (a worker's own timer fires and
    re-routes, which are not new load)."""
    app = Celery(name, set_as_current=False)
    conf = celery_settings(settings)
    if not depth_limit:
        conf["broker_transport_options"] = {
            **conf["broker_transport_options"],
            "keyq_max_queue_depth": 0,
        }
    app.conf.update(conf)
    return app
