"""Prometheus metrics: what the design brief asks operators to watch.

Metrics live in one CollectorRegistry per process; ``serve`` exposes them over HTTP when
KEYQ_METRICS_PORT is set. Three kinds of figures, so that a sum over all scraped processes
never counts anything twice:

- per process: what this process did (applied, dead letters, restarts ... and ``process_*``);
- partition-wide (depth, oldest message age, owner, live members, the shared cache counters):
  exported by one elected process only, the holder of partition 0 (keyq.cluster_metrics);
- probes: registry lookups timed by that same elected process, since the producers that look
  names up export nothing.
"""

from __future__ import annotations

import errno

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from keyq.errors import ConfigurationError

REGISTRY = CollectorRegistry(auto_describe=True)
# process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds ... of this process
PROCESS = ProcessCollector(registry=REGISTRY)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

messages_applied = Counter(
    "keyq_messages_applied_total",
    "Messages applied to entity state",
    ["entity"],
    registry=REGISTRY,
)
duplicates_skipped = Counter(
    "keyq_duplicates_skipped_total",
    "Redelivered or re-published messages skipped",
    registry=REGISTRY,
)
dead_letters = Counter(
    "keyq_dead_letters_total",
    "Messages moved to the dead-letter table",
    ["reason"],
    registry=REGISTRY,
)
restarts = Counter(
    "keyq_restarts_total", "Handler crashes followed by a restart", ["entity"], registry=REGISTRY
)
spawns = Counter("keyq_spawns_total", "Activations created", ["entity"], registry=REGISTRY)
passivations = Counter(
    "keyq_passivations_total",
    "Activations dropped (idle or evicted)",
    ["why"],
    registry=REGISTRY,
)
batches = Counter(
    "keyq_batches_total",
    "Committed batches by how they began: 'fetch' (a broker delivery through Celery), "
    "'follow' (taken in the previous batch's post-commit round trip, under a steady stream) or "
    "'housekeeping' (messages the fetch refused, dead-lettered by the consumer loop's tick)",
    ["start"],
    registry=REGISTRY,
)
batches_abandoned = Counter(
    "keyq_batches_abandoned_total",
    "Batches that failed unplanned; their messages went back to their queue heads",
    registry=REGISTRY,
)
task_events_dropped = Counter(
    "keyq_task_events_dropped_total",
    "Flower task events not sent: their sending thread had 1,000 batches waiting (broker slow)",
    registry=REGISTRY,
)
stale_writes = Counter(
    "keyq_stale_writes_refused_total", "Commits refused by the fencing token", registry=REGISTRY
)
activations = Gauge("keyq_activations", "Activations held by this process", registry=REGISTRY)
partitions_owned = Gauge(
    "keyq_partitions_owned", "Partitions whose lease this process holds", registry=REGISTRY
)
# Not exported: every partition's depth comes from the elected process (keyq.cluster_metrics).
# Kept as an object because the worker still forgets a released partition's label here.
mailbox_depth = Gauge(
    "keyq_mailbox_depth", "Queue length of an owned partition", ["partition"], registry=None
)
dead_letters_by_entity = Counter(
    "keyq_dead_letters_by_entity_total",
    "Messages moved to the dead-letter table after a commit, per entity and reason",
    ["entity", "reason"],
    registry=REGISTRY,
)
node_info = Gauge(
    "keyq_node_info",
    "1, labelled with this worker process's node id (joins per-process figures to owners)",
    ["node"],
    registry=REGISTRY,
)
restart_ready_seconds = Histogram(
    "keyq_restart_ready_seconds",
    "From the last moment a partition was served to the moment it is served again "
    "(takeover after a crash, or a handoff)",
    ["kind"],
    buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60),
    registry=REGISTRY,
)
for _kind in ("takeover", "reclaim"):  # at 0 from the start: increase() counts the first
    restart_ready_seconds.labels(_kind)
key_restart_ready_seconds = Histogram(
    "keyq_key_restart_ready_seconds",
    "From a handler crash to its key being ready again (backoff waited, state reloaded from "
    "the Repo), per entity; observed by the applier for each restart",
    ["entity"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30),
    registry=REGISTRY,
)
dispatch_latency = Histogram(
    "keyq_dispatch_latency_seconds",
    "Send to applied, per message",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
batch_size = Histogram(
    "keyq_batch_size",
    "Messages per group commit",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
    registry=REGISTRY,
)
commit_seconds = Histogram(
    "keyq_repo_commit_seconds",
    "Repo commit latency",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
REPO_OPS = ("load", "load_timers", "commit", "due_timers")  # the Repo calls on a worker's paths
repo_seconds = Histogram(
    "keyq_repo_seconds",
    "Repo call latency by operation (load: states of activating or reloaded keys, load_timers, "
    "commit: a batch's transaction, due_timers: the timer poll), failed calls included",
    ["op"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
for _op in REPO_OPS:  # at 0 from the start
    repo_seconds.labels(_op)
registry_lookup_seconds = Histogram(
    "keyq_registry_lookup_seconds",
    "Registry resolve latency",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
registry_lookup_failures = Counter(
    "keyq_registry_lookup_failures_total", "Registry resolves that raised", registry=REGISTRY
)
cache_reads = Counter(
    "keyq_cache_reads_total", "Client reads by outcome", ["outcome"], registry=REGISTRY
)
reconcile_runs = Counter("keyq_reconcile_runs_total", "Reconciler runs", registry=REGISTRY)
reconcile_healed = Counter(
    "keyq_reconcile_healed_total", "Drifts healed by the reconciler", ["kind"], registry=REGISTRY
)
reconcile_skipped = Counter(
    "keyq_reconcile_skipped_total",
    "Reconciler runs skipped because another run held the lock",
    registry=REGISTRY,
)
cache_keys = Gauge(
    "keyq_cache_keys", "Entries in the hot-read cache (as of the last sweep)", registry=REGISTRY
)
cache_swept = Counter(
    "keyq_cache_swept_total",
    "Cache entries removed by the sweep",
    ["reason"],
    registry=REGISTRY,
)
cache_sweep_seconds = Histogram(
    "keyq_cache_sweep_seconds",
    "Cache sweep duration",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
reconcile_seconds = Histogram(
    "keyq_reconcile_seconds",
    "Reconciler run duration",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)


def serve(port: int) -> None:
    """Expose this process's metrics on http://0.0.0.0:port/metrics (0: not at all).

    One port per worker process: a port another process holds is a ConfigurationError that
    says how to fix it (keyq does not use prometheus-client's multiprocess mode).
    """
    if not port:
        return
    if not 0 < port < 65536:
        raise ConfigurationError(
            f"metrics port {port} (KEYQ_METRICS_PORT or --metrics-port) must be 1-65535, "
            "or 0 for no metrics server"
        )
    try:
        start_http_server(port, registry=REGISTRY)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            problem = "is already in use (another worker on this host?)"
        else:
            problem = f"cannot be opened: {e.strerror or e}"
        other = port + 1 if port < 65535 else port - 1
        raise ConfigurationError(
            f"metrics port {port} {problem}: give each worker process on a host its own "
            f"KEYQ_METRICS_PORT, e.g. `keyq worker --metrics-port {other}`, "
            "or 0 to run without metrics"
        ) from e
