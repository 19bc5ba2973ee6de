"""The anchor of the comparison: a plain Celery app with a no-op task on the same broker.

Run as a worker subprocess: ``python -m keyq.bench.celery_noop BROKER BACKEND QUEUE LOGLEVEL``.
Plain means Celery's defaults (acks on receipt, prefetch 4), JSON, a solo pool, no task events;
only startup chatter (mingle, gossip, heartbeats) is turned off.
"""

from __future__ import annotations

import sys

from celery import Celery

NOOP_TASK = "keyq_bench.noop"  # no result stored: the throughput anchor
ECHO_TASK = "keyq_bench.echo"  # result stored in Redis: the apply_async().get() anchor


def make_noop_app(broker_url: str, backend_url: str) -> Celery:
    app = Celery("keyq_bench", broker=broker_url, backend=backend_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=600,
        worker_hijack_root_logger=True,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name=NOOP_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
    def noop() -> None:
        return None

    @app.task(name=ECHO_TASK, ignore_result=False)  # type: ignore[untyped-decorator]
    def echo(value: int) -> int:
        return value

    return app


def main(argv: list[str]) -> int:
    broker_url, backend_url, queue, loglevel = argv
    app = make_noop_app(broker_url, backend_url)
    worker = app.Worker(
        pool="solo",
        concurrency=1,
        queues=[queue],
        loglevel=loglevel.upper(),
        without_mingle=True,
        without_gossip=True,
        without_heartbeat=True,
    )
    worker.start()
    return int(worker.exitcode or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
