"""Celery glue of the worker side: the dispatch task and the ownership bootstep.

Kept thin on purpose: the task body calls WorkerRuntime.handle, the bootstep ticks
PartitionOwnership in the consumer's event loop and adds or cancels partition queues there.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable
from queue import Empty
from typing import Any

from celery import Celery, bootsteps
from celery.worker import state as worker_state
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy

from keyq.celery_app import BRPOP_TIMEOUT_S, DISPATCH_TASK, TICK_OPTION, make_app
from keyq.ownership import TICKS_PER_TTL, new_node_id
from keyq.settings import Settings
from keyq.worker import WorkerRuntime

log = logging.getLogger(__name__)

_delivering: dict[str, Any] = {}  # the kombu message being executed (solo pool: one at a time)
# per worker app (by id): its runtime holder and the dispatch body, for keyq_strategy
_DISPATCHERS: dict[int, tuple[dict[str, Any], Callable[[str, Any], None]]] = {}


def shutting_down() -> bool:
    """Celery has begun a warm or cold shutdown (SIGTERM, SIGQUIT, `celery control shutdown`):
    its loop stops after the task in flight, so the worker starts no batch of its own."""
    # Celery's own test (state.maybe_shutdown): a warm shutdown sets should_stop to 0 (EX_OK)
    return any(
        flag is not None and flag is not False
        for flag in (worker_state.should_stop, worker_state.should_terminate)
    )


def settle_pending_read(consumer: Any) -> bool:
    """Cancel every queue and read the BRPOP still in flight, so a message it popped goes back
    to its queue head (keyq's transport) BEFORE the leases are released: kombu would otherwise
    read it only when the channel closes, after the next owner may have started.
    True when no broker read is pending any more."""
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is None:
        return False
    try:
        for queue in list(task_consumer.queues):
            consumer.cancel_task_queue(queue.name)
        channel = task_consumer.channel
        settle = getattr(channel, "settle_in_flight", None)  # keyq.transport's channel
        if settle is not None:
            settle()
        elif getattr(channel, "_in_poll", None):
            with contextlib.suppress(Empty):
                channel._brpop_read()
    except Exception:
        log.exception("keyq could not settle the pending broker read")
        return False
    return True


def keyq_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's way of handling a keyq.dispatch message, without Celery's per-task work.

    Celery builds a Request for every task message, traces its execution (state, signals,
    stack protection) and acks it, about 0.2 ms a message: more than a whole keyq apply of a
    small batch. keyq's task needs none of it (its mailbox claims, applies, acks and reports
    on its own), so a plain message goes straight to the runtime and is acked after it, as
    acks_late would. A message Celery must hold or drop first (an ETA, an expiry, a revoked
    id) or one that arrives before the runtime is up takes Celery's own path."""
    celery_path = default_strategy(task, app, consumer, **kwargs)
    revoked = consumer.controller.state.revoked
    errors = consumer.connection_errors
    holder, handle = _DISPATCHERS[id(app)]

    def on_message(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any
    ) -> Any:
        headers = message.headers or {}
        held = headers.get("eta") or headers.get("expires") or headers.get("id") in revoked
        if held or holder.get("runtime") is None:
            return celery_path(message, body, ack, reject, callbacks, **kw)
        queue = (message.delivery_info or {}).get("routing_key") or ""
        try:
            handle(queue, getattr(message, "_raw", None))
        finally:
            ack(log, errors)  # Celery's acks_late ack (keyq.transport: no Redis write)
        return None

    return on_message


def freeze_startup_objects() -> None:
    """Move everything the worker built while starting (Celery, kombu, SQLAlchemy, the
    entities: some 200,000 objects) out of the garbage collector's reach. A full collection
    walked all of them, about 50 ms, and could land inside a batch; after gc.freeze() it walks
    only what the batches made (the CPython docs' advice for a long-lived process that has
    finished starting). The collection here runs once, before the first partition is claimed."""
    gc.collect()
    gc.freeze()


class KeyqRequest(Request):  # type: ignore[misc]
    """Lets the task body see its raw kombu message, to return it to the queue head intact."""

    # Celery's strategy subclasses this class and replaces execute_using_pool without calling
    # it (create_request_cls), so the hook is on_accepted: the pool calls it just before the
    # task body, in the same thread (solo pool).
    def on_accepted(self, *args: Any, **kwargs: Any) -> Any:
        _delivering["message"] = self.message
        return super().on_accepted(*args, **kwargs)


def celery_hostname(node: str) -> str:
    """The name Celery, Flower and `celery inspect` show for a node: NAME@keyq, or the name
    itself when it already has Celery's ``name@host`` shape."""
    return node if "@" in node else f"{node}@keyq"


def build_worker_app(
    settings: Settings,
    static_partitions: tuple[int, ...] | None = None,
    node_id: str | None = None,
) -> tuple[Celery, str]:
    """A Celery app with keyq's task and bootstep installed, and this node's id."""
    app = make_app(settings)
    # its consumer looks at its queues every BRPOP_TIMEOUT_S (keyq.transport's ticker)
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        TICK_OPTION: BRPOP_TIMEOUT_S,
    }
    node = node_id or new_node_id()
    holder: dict[str, WorkerRuntime] = {}

    @app.task(  # type: ignore[untyped-decorator]
        name=DISPATCH_TASK,
        bind=True,
        acks_late=True,
        ignore_result=True,
        typing=False,
        # Flower shows keyq's messages one by one (keyq.flower_events), not these carriers
        send_events=False,
        Request="keyq.celery_worker:KeyqRequest",
        Strategy="keyq.celery_worker:keyq_strategy",
    )
    def dispatch(self: Any, *args: object, **kwargs: object) -> None:
        # Celery's decoded arguments are not used: keyq.mailbox reads the raw message itself,
        # and any arguments are accepted, so a malformed call still reaches the mailbox.
        delivery = self.request.delivery_info or {}
        queue = delivery.get("routing_key") or ""
        raw = getattr(_delivering.pop("message", None), "_raw", None)
        if holder.get("runtime") is None:
            raise RuntimeError("keyq runtime is not started")
        handle(queue, raw)

    def handle(queue: str, raw: dict[str, Any] | None) -> None:
        try:
            holder["runtime"].handle(queue, raw)
        except Exception:  # handle() never raises; if it ever did, the message stays recorded
            log.exception("keyq dispatch failed queue=%s node=%s", queue, node)

    _DISPATCHERS[id(app)] = (holder, handle)  # keyq_strategy's way to the runtime

    from keyq.catalogue import publish_at_start
    from keyq.reconciler import install_reconcile_task

    install_reconcile_task(app, settings)

    class KeyqOwnershipStep(bootsteps.StartStopStep):  # type: ignore[misc]
        """Ticks partition ownership inside the consumer loop."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.timer_refs: list[Any] = []

        def start(self, consumer: Any) -> None:
            runtime = holder.get("runtime")
            if runtime is None:
                runtime = WorkerRuntime(
                    settings,
                    node,
                    static_partitions=static_partitions,
                    add_queue=lambda q: consumer.add_task_queue(q),
                    cancel_queue=lambda q: consumer.cancel_task_queue(q),
                    settle=lambda: settle_pending_read(consumer),
                    stopping=shutting_down,
                )
                holder["runtime"] = runtime
                runtime.ownership.start_heartbeat()
                # producers without the entity code validate against this (keyq.catalogue)
                publish_at_start(runtime.redis, settings, runtime.entities, node)
                freeze_startup_objects()
            else:  # the consumer restarted (broker reconnect): re-assert our queues
                runtime._add_queue = lambda q: consumer.add_task_queue(q)
                runtime._cancel_queue = lambda q: consumer.cancel_task_queue(q)
                runtime._settle = lambda: settle_pending_read(consumer)
                for p in runtime.ownership.held():
                    consumer.add_task_queue(settings.queue_name(p))
            # the consumer's channel fetches with the runtime's claim plans (keyq.fetch_claims)
            channel = getattr(consumer.task_consumer, "channel", None)
            if runtime.fetch_claims is not None and channel is not None:
                channel.keyq_claims = runtime.fetch_claims

            def tick() -> None:
                try:
                    runtime.ownership.tick()
                except Exception:
                    log.exception("keyq ownership tick failed node=%s", node)
                try:  # a held partition's consumer cancelled from outside is re-added
                    from keyq.consumer_guard import readd_cancelled

                    readd_cancelled(consumer, runtime.ownership, settings)
                except Exception:
                    log.exception("keyq consumer guard failed node=%s", node)

            def housekeeping() -> None:
                try:
                    runtime.housekeeping()
                except Exception:
                    log.exception("keyq housekeeping failed node=%s", node)

            tick()
            housekeeping()
            self.timer_refs = [
                consumer.timer.call_repeatedly(settings.lease_ttl_s / TICKS_PER_TTL, tick),
                consumer.timer.call_repeatedly(settings.lease_ttl_s / 4, housekeeping),
            ]

        def stop(self, consumer: Any) -> None:
            for ref in self.timer_refs:
                ref.cancel()
            self.timer_refs = []

        def shutdown(self, consumer: Any) -> None:
            self.stop(consumer)
            runtime = holder.pop("runtime", None)
            if runtime is not None:
                runtime.ownership.shutdown()
                runtime.close()

    app.steps["consumer"].add(KeyqOwnershipStep)
    return app, node
