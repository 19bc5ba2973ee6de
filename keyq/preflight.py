"""Checks that long-running commands make before handing over to Celery.

Celery's worker and beat retry an unreachable broker forever, printing a warning every few
seconds: a mistyped URL or a Redis that is not up yet looks like a process that hangs. So
`keyq worker` and `keyq beat` first wait, at most KEYQ_STARTUP_WAIT_S, for the servers they
need, and otherwise exit in one line naming the server (see keyq.cli_errors).
"""

from __future__ import annotations

import time

import redis

from keyq.cluster import Membership
from keyq.connections import redis_client
from keyq.errors import (
    BrokerUnavailableError,
    CacheUnavailableError,
    ConfigurationError,
    KeyqError,
)
from keyq.settings import Settings, redact_url

POLL_INTERVAL_S = 0.2  # between two attempts while waiting for a server or a node name


def _ping(url: str, settings: Settings) -> None:
    client = redis_client(url, settings.timeouts)
    try:
        client.ping()
    finally:
        client.close()


def wait_for_redis(settings: Settings, wait_s: float) -> None:
    """Block until the Redis of the registry and the broker's Redis answer; raise
    CacheUnavailableError / BrokerUnavailableError naming the one that did not."""
    targets: list[tuple[str, type[KeyqError], str]] = [
        (settings.redis_url, CacheUnavailableError, "Redis")
    ]
    if settings.broker_url != settings.redis_url:
        targets.append((settings.broker_url, BrokerUnavailableError, "broker"))
    deadline = time.monotonic() + wait_s
    for url, error, what in targets:
        while True:
            try:
                _ping(url, settings)
                break
            except redis.RedisError as e:
                if time.monotonic() >= deadline:
                    raise error(
                        f"{what} at {redact_url(url)} is not answering after {wait_s:g}s "
                        f"(KEYQ_STARTUP_WAIT_S): {e}"
                    ) from e
                time.sleep(POLL_INTERVAL_S)


def wait_until_name_free(settings: Settings, node: str, wait_s: float) -> None:
    """Refuse a node name that a live worker still uses; a crashed one's heartbeat runs out
    within one lease TTL, so a restart under the same name waits for that, not more."""
    client = redis_client(settings.redis_url, settings.timeouts)
    try:
        membership = Membership(client, settings)
        deadline = time.monotonic() + max(wait_s, settings.lease_ttl_s * 2)
        while node in membership.live():
            if time.monotonic() >= deadline:
                pid = membership.info(node).get("pid")
                where = f" (pid {pid})" if pid else ""
                raise ConfigurationError(
                    f"node name {node!r} is in use by a live worker{where}: stop it or give "
                    "this worker another --hostname"
                )
            time.sleep(POLL_INTERVAL_S)
    except redis.RedisError as e:
        raise CacheUnavailableError(
            f"Redis at {redact_url(settings.redis_url)} is not answering: {e}"
        ) from e
    finally:
        client.close()
