"""The one Settings object: built from the environment at the edge, never at import time."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit, urlunsplit

from keyq.connections import (
    DEFAULT_DATABASE_CONNECT_TIMEOUT_S,
    DEFAULT_DATABASE_STATEMENT_TIMEOUT_S,
    DEFAULT_REDIS_CONNECT_TIMEOUT_S,
    DEFAULT_REDIS_READ_TIMEOUT_S,
    DEFAULT_REPLY_SPIN_US,
    SentinelOptions,
    Timeouts,
    is_sentinel_url,
    parse_sentinel_url,
)
from keyq.errors import ConfigurationError
from keyq.supervisor import SupervisionPolicy

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "sqlite:///keyq.sqlite3"  # the embedded default: a file beside you
DEFAULT_PARTITIONS = 64  # fixed per deployment; changing it is a migration
DEFAULT_LEASE_TTL_MS = 600  # a crashed node's partitions are served again within about this
DEFAULT_IDLE_TIMEOUT_S = 300.0  # an activation idle this long is passivated
DEFAULT_MAX_ACTIVATIONS = 10_000  # per worker process, least recently used out first
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024
DEFAULT_MAX_KEY_LENGTH = 256
MAX_KEY_LENGTH_LIMIT = 1024  # the Repo's key columns (keyq_state.key) hold this many characters
DEFAULT_CACHE_TTL_S = 3600.0
DEFAULT_CACHE_MAX_KEYS = 1_000_000
DEFAULT_CACHE_SWEEP_INTERVAL_S = 5.0  # the beat's cache sweep (the reconciler sweeps too)
DEFAULT_DEDUPE_WINDOW = 256  # applied message ids remembered per key
DEFAULT_BATCH_MAX = 256  # messages applied in one group commit
DEFAULT_MAX_RESTARTS = 10  # restart intensity: restarts of one key ...
DEFAULT_RESTART_WINDOW_S = 60.0  # ... within this window (with the backoff: a 10 s outage passes)
DEFAULT_BACKOFF_MIN_S = 0.1  # first wait before a restart, doubling ...
DEFAULT_BACKOFF_MAX_S = 2.0  # ... up to this (with +-20 % jitter)
DEFAULT_MAX_HANDLER_SECONDS = 30.0  # a handler running longer is stopped and dead-lettered
DEFAULT_REPO_HANDOFF_S = 10.0  # a node whose database fails this long hands its partitions off
DEFAULT_RECONCILE_INTERVAL_S = 10.0
DEFAULT_RECONCILE_BATCH = 1000
DEFAULT_RECONCILE_BUDGET_S = 2.0
DEFAULT_CALL_TIMEOUT_S = 10.0
DEFAULT_MAX_QUEUE_DEPTH = 100_000  # per partition queue: past it producers get OverloadedError
DEFAULT_MAX_DELIVERIES = 5  # a message delivered this often without being applied is dead-lettered
DEFAULT_STARTUP_WAIT_S = 30.0  # worker and beat wait this long for Redis and the database
DEFAULT_NAMESPACE = "keyq"
DEFAULT_PUBLISH_REPLICA_TIMEOUT_MS = 1000  # a durable send waits this long for its replicas

_NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


def redact_url(url: str) -> str:
    """Return the URL with any password replaced, so it is safe to log or print."""
    if ";" in url:  # a sentinel URL: several hosts, any of which may carry the password
        return ";".join(redact_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigurationError(f"{name}={value} must be at least {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):  # NaN passes every `<` check; inf overflows Redis TTLs
        raise ConfigurationError(f"{name}={raw!r} must be a finite number")
    if value < minimum:
        raise ConfigurationError(f"{name}={value} must be at least {minimum}")
    return value


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a switch: write 1 or 0 (true/false, on/off)")


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    url = env.get(name) or default
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not scheme.startswith(schemes):
        allowed = ", ".join(s + "://" for s in schemes)
        raise ConfigurationError(f"{name}={redact_url(url)} must start with one of {allowed}")
    return url


# Settings field -> the environment variable it is read from (README: Configuration)
ENV_VARIABLES: dict[str, str] = {
    "broker_url": "KEYQ_BROKER_URL",
    "redis_url": "KEYQ_REDIS_URL",
    "database_url": "KEYQ_DATABASE_URL",
    "namespace": "KEYQ_NAMESPACE",
    "partitions": "KEYQ_PARTITIONS",
    "entity_modules": "KEYQ_ENTITY_MODULES",
    "lease_ttl_ms": "KEYQ_LEASE_TTL_MS",
    "idle_timeout_s": "KEYQ_IDLE_TIMEOUT_S",
    "max_activations": "KEYQ_MAX_ACTIVATIONS",
    "max_payload_bytes": "KEYQ_MAX_PAYLOAD_BYTES",
    "max_key_length": "KEYQ_MAX_KEY_LENGTH",
    "cache_ttl_s": "KEYQ_CACHE_TTL_S",
    "cache_max_keys": "KEYQ_CACHE_MAX_KEYS",
    "cache_sweep_interval_s": "KEYQ_CACHE_SWEEP_INTERVAL_S",
    "dedupe_window": "KEYQ_DEDUPE_WINDOW",
    "batch_max": "KEYQ_BATCH_MAX",
    "max_restarts": "KEYQ_MAX_RESTARTS",
    "restart_window_s": "KEYQ_RESTART_WINDOW_S",
    "reconcile_interval_s": "KEYQ_RECONCILE_INTERVAL_S",
    "reconcile_batch": "KEYQ_RECONCILE_BATCH",
    "reconcile_budget_s": "KEYQ_RECONCILE_BUDGET_S",
    "call_timeout_s": "KEYQ_CALL_TIMEOUT_S",
    "max_deliveries": "KEYQ_MAX_DELIVERIES",
    "max_queue_depth": "KEYQ_MAX_QUEUE_DEPTH",
    "backoff_min_s": "KEYQ_BACKOFF_MIN_S",
    "backoff_max_s": "KEYQ_BACKOFF_MAX_S",
    "max_handler_seconds": "KEYQ_MAX_HANDLER_SECONDS",
    "repo_handoff_s": "KEYQ_REPO_HANDOFF_S",
    "metrics_port": "KEYQ_METRICS_PORT",
    "startup_wait_s": "KEYQ_STARTUP_WAIT_S",
    "redis_connect_timeout_s": "KEYQ_REDIS_CONNECT_TIMEOUT_S",
    "redis_read_timeout_s": "KEYQ_REDIS_READ_TIMEOUT_S",
    "database_connect_timeout_s": "KEYQ_DATABASE_CONNECT_TIMEOUT_S",
    "database_statement_timeout_s": "KEYQ_DATABASE_STATEMENT_TIMEOUT_S",
    "sentinel_master": "KEYQ_SENTINEL_MASTER",
    "sentinel_password": "KEYQ_SENTINEL_PASSWORD",
    "publish_min_replicas": "KEYQ_PUBLISH_MIN_REPLICAS",
    "publish_replica_timeout_ms": "KEYQ_PUBLISH_REPLICA_TIMEOUT_MS",
    "follow_on": "KEYQ_FOLLOW_ON",
    "fetch_claim": "KEYQ_FETCH_CLAIM",
    "reply_spin_us": "KEYQ_REPLY_SPIN_US",
}


MAX_REPLY_SPIN_US = 10_000  # a longer spin burns CPU on replies that are not coming soon


@dataclass(frozen=True)
class Settings:
    """Everything keyq reads from the environment; see README 'Configuration'."""

    broker_url: str = DEFAULT_REDIS_URL
    redis_url: str = DEFAULT_REDIS_URL
    database_url: str = DEFAULT_DATABASE_URL
    namespace: str = DEFAULT_NAMESPACE
    partitions: int = DEFAULT_PARTITIONS
    entity_modules: tuple[str, ...] = ("keyq.examples",)
    lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_activations: int = DEFAULT_MAX_ACTIVATIONS
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_key_length: int = DEFAULT_MAX_KEY_LENGTH
    cache_ttl_s: float = DEFAULT_CACHE_TTL_S
    cache_max_keys: int = DEFAULT_CACHE_MAX_KEYS
    cache_sweep_interval_s: float = DEFAULT_CACHE_SWEEP_INTERVAL_S
    dedupe_window: int = DEFAULT_DEDUPE_WINDOW
    batch_max: int = DEFAULT_BATCH_MAX
    max_restarts: int = DEFAULT_MAX_RESTARTS
    restart_window_s: float = DEFAULT_RESTART_WINDOW_S
    reconcile_interval_s: float = DEFAULT_RECONCILE_INTERVAL_S
    reconcile_batch: int = DEFAULT_RECONCILE_BATCH
    reconcile_budget_s: float = DEFAULT_RECONCILE_BUDGET_S
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    max_queue_depth: int = DEFAULT_MAX_QUEUE_DEPTH  # 0: no limit
    backoff_min_s: float = DEFAULT_BACKOFF_MIN_S
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S
    max_handler_seconds: float = DEFAULT_MAX_HANDLER_SECONDS
    repo_handoff_s: float = DEFAULT_REPO_HANDOFF_S
    metrics_port: int = 0  # 0: no metrics HTTP server
    startup_wait_s: float = DEFAULT_STARTUP_WAIT_S
    redis_connect_timeout_s: float = DEFAULT_REDIS_CONNECT_TIMEOUT_S
    redis_read_timeout_s: float = DEFAULT_REDIS_READ_TIMEOUT_S
    database_connect_timeout_s: float = DEFAULT_DATABASE_CONNECT_TIMEOUT_S
    database_statement_timeout_s: float = DEFAULT_DATABASE_STATEMENT_TIMEOUT_S
    # Redis Sentinel: the master name the sentinels know the primary by (needed with a
    # sentinel:// URL) and the sentinels' own password ("" when they have none)
    sentinel_master: str = ""
    sentinel_password: str = field(default="", repr=False)
    # durable publish: a send returns once this many replicas hold the message (0: once the
    # primary has it), else NotReplicatedError after publish_replica_timeout_ms
    publish_min_replicas: int = 0
    publish_replica_timeout_ms: int = DEFAULT_PUBLISH_REPLICA_TIMEOUT_MS
    # a worker under a steady stream takes its next batch in the post-commit round trip of
    # the batch before (keyq.worker: the follow-on batch); off: every batch begins with the
    # broker fetch and its claim (to compare, or to rule the follow-on out)
    follow_on: bool = True
    # the broker fetch claims a served partition's message into its in-flight list itself
    # (keyq.fetch_claims: one round trip, not two, where Redis is also the broker); off: the
    # fetch records it in kombu's unacked table and the worker claims it
    fetch_claim: bool = True
    # keyq's Redis connections poll their socket this long for a reply before they block
    # (keyq.reply_spin: on a VM a blocked round trip took 3 x as long); 0: block at once
    reply_spin_us: int = DEFAULT_REPLY_SPIN_US
    extra: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read KEYQ_* variables; refuse malformed or contradictory values with a fix hint."""
        env = os.environ if env is None else env
        redis_url = _url(
            env, "KEYQ_REDIS_URL", DEFAULT_REDIS_URL, ("redis", "rediss", "unix", "sentinel")
        )
        broker_url = _url(env, "KEYQ_BROKER_URL", redis_url, ("redis", "rediss", "sentinel"))
        database_url = _url(
            env, "KEYQ_DATABASE_URL", DEFAULT_DATABASE_URL, ("sqlite", "postgresql")
        )
        namespace = env.get("KEYQ_NAMESPACE") or DEFAULT_NAMESPACE
        if not _NAMESPACE_RE.match(namespace):
            raise ConfigurationError(
                f"KEYQ_NAMESPACE={namespace!r} must match {_NAMESPACE_RE.pattern}"
            )
        raw_modules = env.get("KEYQ_ENTITY_MODULES")
        # unset: keyq's examples; set but empty: none (a producer then reads the catalogue
        # that workers publish to Redis)
        modules = tuple(
            m.strip()
            for m in ("keyq.examples" if raw_modules is None else raw_modules).split(",")
            if m.strip()
        )
        settings = cls(
            broker_url=broker_url,
            redis_url=redis_url,
            database_url=database_url,
            namespace=namespace,
            partitions=_int(env, "KEYQ_PARTITIONS", DEFAULT_PARTITIONS),
            entity_modules=modules,
            lease_ttl_ms=_int(env, "KEYQ_LEASE_TTL_MS", DEFAULT_LEASE_TTL_MS, minimum=100),
            idle_timeout_s=_float(env, "KEYQ_IDLE_TIMEOUT_S", DEFAULT_IDLE_TIMEOUT_S, 0.01),
            max_activations=_int(env, "KEYQ_MAX_ACTIVATIONS", DEFAULT_MAX_ACTIVATIONS),
            max_payload_bytes=_int(env, "KEYQ_MAX_PAYLOAD_BYTES", DEFAULT_MAX_PAYLOAD_BYTES),
            max_key_length=_int(env, "KEYQ_MAX_KEY_LENGTH", DEFAULT_MAX_KEY_LENGTH),
            cache_ttl_s=_float(env, "KEYQ_CACHE_TTL_S", DEFAULT_CACHE_TTL_S, 1.0),
            cache_max_keys=_int(env, "KEYQ_CACHE_MAX_KEYS", DEFAULT_CACHE_MAX_KEYS),
            cache_sweep_interval_s=_float(
                env, "KEYQ_CACHE_SWEEP_INTERVAL_S", DEFAULT_CACHE_SWEEP_INTERVAL_S, 0.1
            ),
            dedupe_window=_int(env, "KEYQ_DEDUPE_WINDOW", DEFAULT_DEDUPE_WINDOW),
            batch_max=_int(env, "KEYQ_BATCH_MAX", DEFAULT_BATCH_MAX),
            max_restarts=_int(env, "KEYQ_MAX_RESTARTS", DEFAULT_MAX_RESTARTS, minimum=0),
            restart_window_s=_float(env, "KEYQ_RESTART_WINDOW_S", DEFAULT_RESTART_WINDOW_S, 0.1),
            reconcile_interval_s=_float(
                env, "KEYQ_RECONCILE_INTERVAL_S", DEFAULT_RECONCILE_INTERVAL_S, 0.1
            ),
            reconcile_batch=_int(env, "KEYQ_RECONCILE_BATCH", DEFAULT_RECONCILE_BATCH),
            reconcile_budget_s=_float(
                env, "KEYQ_RECONCILE_BUDGET_S", DEFAULT_RECONCILE_BUDGET_S, 0.01
            ),
            call_timeout_s=_float(env, "KEYQ_CALL_TIMEOUT_S", DEFAULT_CALL_TIMEOUT_S, 0.01),
            max_deliveries=_int(env, "KEYQ_MAX_DELIVERIES", DEFAULT_MAX_DELIVERIES),
            max_queue_depth=_int(
                env, "KEYQ_MAX_QUEUE_DEPTH", DEFAULT_MAX_QUEUE_DEPTH, minimum=0
            ),
            backoff_min_s=_float(env, "KEYQ_BACKOFF_MIN_S", DEFAULT_BACKOFF_MIN_S),
            backoff_max_s=_float(env, "KEYQ_BACKOFF_MAX_S", DEFAULT_BACKOFF_MAX_S),
            max_handler_seconds=_float(
                env, "KEYQ_MAX_HANDLER_SECONDS", DEFAULT_MAX_HANDLER_SECONDS
            ),
            repo_handoff_s=_float(env, "KEYQ_REPO_HANDOFF_S", DEFAULT_REPO_HANDOFF_S, 0.1),
            metrics_port=_int(env, "KEYQ_METRICS_PORT", 0, minimum=0),
            startup_wait_s=_float(env, "KEYQ_STARTUP_WAIT_S", DEFAULT_STARTUP_WAIT_S),
            redis_connect_timeout_s=_float(
                env, "KEYQ_REDIS_CONNECT_TIMEOUT_S", DEFAULT_REDIS_CONNECT_TIMEOUT_S, 0.05
            ),
            redis_read_timeout_s=_float(
                env, "KEYQ_REDIS_READ_TIMEOUT_S", DEFAULT_REDIS_READ_TIMEOUT_S, 0.1
            ),
            database_connect_timeout_s=_float(
                env, "KEYQ_DATABASE_CONNECT_TIMEOUT_S", DEFAULT_DATABASE_CONNECT_TIMEOUT_S, 1.0
            ),
            database_statement_timeout_s=_float(
                env, "KEYQ_DATABASE_STATEMENT_TIMEOUT_S", DEFAULT_DATABASE_STATEMENT_TIMEOUT_S
            ),
            sentinel_master=env.get("KEYQ_SENTINEL_MASTER", "").strip(),
            sentinel_password=env.get("KEYQ_SENTINEL_PASSWORD", ""),
            publish_min_replicas=_int(env, "KEYQ_PUBLISH_MIN_REPLICAS", 0, minimum=0),
            publish_replica_timeout_ms=_int(
                env, "KEYQ_PUBLISH_REPLICA_TIMEOUT_MS", DEFAULT_PUBLISH_REPLICA_TIMEOUT_MS
            ),
            follow_on=_bool(env, "KEYQ_FOLLOW_ON", True),
            fetch_claim=_bool(env, "KEYQ_FETCH_CLAIM", True),
            reply_spin_us=_int(env, "KEYQ_REPLY_SPIN_US", DEFAULT_REPLY_SPIN_US, minimum=0),
        )
        settings.check()
        return settings

    def to_env(self) -> dict[str, str]:
        """The KEYQ_* variables that make from_env() give exactly these settings (for the
        worker, beat and demo subprocesses that keyq and its tests start)."""
        env: dict[str, str] = {}
        for name, var in ENV_VARIABLES.items():
            value = getattr(self, name)
            env[var] = ",".join(value) if isinstance(value, tuple) else str(value)
        return env

    def check(self) -> None:
        """Refuse contradictory combinations, saying how to fix them."""
        if self.reply_spin_us > MAX_REPLY_SPIN_US:
            raise ConfigurationError(
                f"KEYQ_REPLY_SPIN_US={self.reply_spin_us} is more than {MAX_REPLY_SPIN_US}: a "
                "reply that takes longer is waited for by blocking; lower it (0 turns it off)"
            )
        if self.backoff_min_s > self.backoff_max_s:
            raise ConfigurationError(
                f"KEYQ_BACKOFF_MIN_S={self.backoff_min_s} is larger than KEYQ_BACKOFF_MAX_S="
                f"{self.backoff_max_s}: raise the maximum or lower the minimum"
            )
        if self.dedupe_window < self.batch_max:
            raise ConfigurationError(
                f"KEYQ_DEDUPE_WINDOW={self.dedupe_window} is smaller than KEYQ_BATCH_MAX="
                f"{self.batch_max}: a redelivered batch could be applied twice; raise the window"
            )
        if self.partitions > 4096:
            raise ConfigurationError(
                f"KEYQ_PARTITIONS={self.partitions}: at most 4096 partition queues are supported"
            )
        sentinel_urls = [u for u in (self.redis_url, self.broker_url) if is_sentinel_url(u)]
        if sentinel_urls and not self.sentinel_master:
            raise ConfigurationError(
                "KEYQ_REDIS_URL or KEYQ_BROKER_URL is a sentinel:// URL but KEYQ_SENTINEL_MASTER "
                "is not set: give the master name the sentinels monitor"
            )
        if self.sentinel_master and not sentinel_urls:
            raise ConfigurationError(
                f"KEYQ_SENTINEL_MASTER={self.sentinel_master!r} is set but no URL is a sentinel "
                "one: write KEYQ_REDIS_URL as sentinel://host:port[;sentinel://host:port...]/db, "
                "or unset KEYQ_SENTINEL_MASTER"
            )
        for url in sentinel_urls:
            parse_sentinel_url(url)  # a malformed one fails here, with its reason
        if self.publish_min_replicas and (
            self.publish_replica_timeout_ms >= self.redis_read_timeout_s * 1000
        ):
            raise ConfigurationError(
                f"KEYQ_PUBLISH_REPLICA_TIMEOUT_MS={self.publish_replica_timeout_ms} is not below "
                f"KEYQ_REDIS_READ_TIMEOUT_S={self.redis_read_timeout_s}: the socket would give "
                "up before the replicas answer; lower the one or raise the other"
            )
        if self.max_key_length > MAX_KEY_LENGTH_LIMIT:
            raise ConfigurationError(
                f"KEYQ_MAX_KEY_LENGTH={self.max_key_length}: the Repo stores keys of at most "
                f"{MAX_KEY_LENGTH_LIMIT} characters"
            )

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed (tests and the demo use it)."""
        new = replace(self, **changes)  # type: ignore[arg-type]
        new.check()
        return new

    @property
    def supervision(self) -> SupervisionPolicy:
        """The supervision defaults (each entity may override them)."""
        return SupervisionPolicy(
            max_restarts=self.max_restarts,
            within_seconds=self.restart_window_s,
            backoff_min_s=self.backoff_min_s,
            backoff_max_s=self.backoff_max_s,
            max_handler_seconds=self.max_handler_seconds,
        )

    @property
    def timeouts(self) -> Timeouts:
        """The connection limits every Redis client and database engine is built with."""
        return Timeouts(
            redis_connect_s=self.redis_connect_timeout_s,
            redis_read_s=self.redis_read_timeout_s,
            redis_reply_spin_s=self.reply_spin_us / 1e6,
            database_connect_s=self.database_connect_timeout_s,
            database_statement_s=self.database_statement_timeout_s,
            sentinel=(
                SentinelOptions(self.sentinel_master, self.sentinel_password or None)
                if self.sentinel_master
                else None
            ),
        )

    @property
    def lease_ttl_s(self) -> float:
        return self.lease_ttl_ms / 1000.0

    def queue_name(self, partition: int) -> str:
        """The Celery queue of one partition."""
        return f"{self.namespace}.p{partition}"

    def redis_key(self, *parts: str) -> str:
        """A namespaced Redis key for keyq's own data (registry, cache, leases)."""
        return ":".join((self.namespace, *parts))

    def safe_summary(self) -> dict[str, object]:
        """Settings fit for a log line: URLs redacted."""
        return {
            "broker_url": redact_url(self.broker_url),
            "redis_url": redact_url(self.redis_url),
            "database_url": redact_url(self.database_url),
            "namespace": self.namespace,
            "partitions": self.partitions,
            "entity_modules": ",".join(self.entity_modules),
            "lease_ttl_ms": self.lease_ttl_ms,
        }
