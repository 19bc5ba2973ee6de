"""Every Redis client and database engine keyq opens, with the timeouts chosen for its use.

One place on purpose: redis-py 8 gives every socket a 5 s read timeout by default, so a BLPOP
that waits longer than that failed as if Redis were down, while nothing at all bounded a hung
database connection. Here each kind of connection gets explicit limits from Settings:

- Redis commands: ``KEYQ_REDIS_CONNECT_TIMEOUT_S`` to connect, ``KEYQ_REDIS_READ_TIMEOUT_S``
  for an answer (a stopped or unreachable server is found within that).
- Blocking reads (a ``call`` waiting for its reply) never ask the server to block longer than
  ``blocking_slice_s`` (less than the read timeout), and loop until their own deadline, so the
  caller's timeout holds for any length while a hung connection is still found.
- The broker (kombu) gets the same connect and read timeouts through its transport options.
- The database: a connect timeout, TCP keepalives and ``tcp_user_timeout`` (a dead peer is
  found within seconds), and a statement timeout on PostgreSQL; SQLite waits out a writer's
  lock for the statement timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

# defaults of the Settings fields below (README: Configuration)
DEFAULT_REDIS_CONNECT_TIMEOUT_S = 2.0  # a Redis that does not accept within this is down
DEFAULT_REDIS_READ_TIMEOUT_S = 5.0  # a command unanswered this long: Redis hung or unreachable
DEFAULT_DATABASE_CONNECT_TIMEOUT_S = 5.0
DEFAULT_DATABASE_STATEMENT_TIMEOUT_S = 30.0  # one batch's statement; 0 turns it off
KEEPALIVE_IDLE_S = 5  # database TCP keepalive: first probe after this much silence ...
KEEPALIVE_INTERVAL_S = 2  # ... then one probe every this many seconds ...
KEEPALIVE_COUNT = 3  # ... and the connection is dead after this many unanswered probes


@dataclass(frozen=True)
class Timeouts:
    """The connection limits of one process (built by Settings.timeouts)."""

    redis_connect_s: float = DEFAULT_REDIS_CONNECT_TIMEOUT_S
    redis_read_s: float = DEFAULT_REDIS_READ_TIMEOUT_S
    database_connect_s: float = DEFAULT_DATABASE_CONNECT_TIMEOUT_S
    database_statement_s: float = DEFAULT_DATABASE_STATEMENT_TIMEOUT_S

    @property
    def blocking_slice_s(self) -> float:
        """The longest a single blocking Redis command may wait on the server: well inside
        the read timeout, so its answer always arrives before the socket gives up."""
        return max(0.01, self.redis_read_s * 0.8 - 0.05)

    def without_statement_timeout(self) -> Timeouts:
        """For schema migrations, which may rightly run longer than any one batch."""
        return Timeouts(
            self.redis_connect_s, self.redis_read_s, self.database_connect_s, 0.0
        )


DEFAULT_TIMEOUTS = Timeouts()


def redis_client(url: str, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> redis.Redis:
    """A redis-py client for keyq's own data (registry, leases, cache, replies, queues)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeouts.redis_connect_s,
        socket_timeout=timeouts.redis_read_s,
        socket_keepalive=True,
    )


def broker_transport_options(timeouts: Timeouts) -> dict[str, Any]:
    """The socket limits of kombu's Redis channels (producers and workers)."""
    return {
        "socket_connect_timeout": timeouts.redis_connect_s,
        "socket_timeout": timeouts.redis_read_s,
        "socket_keepalive": True,
    }


def blocking_pop(
    client: redis.Redis, key: str, timeout_s: float, timeouts: Timeouts = DEFAULT_TIMEOUTS
) -> bytes | None:
    """BLPOP one key for up to timeout_s (any length), in server-side slices shorter than the
    socket read timeout. None when nothing arrived in time; redis errors propagate."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        wait = max(0.01, min(remaining, timeouts.blocking_slice_s))
        got = client.blpop([key], timeout=wait)
        if got is not None:
            value = got[1]
            return value if isinstance(value, bytes) else str(value).encode()


def engine_options(url: str, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> dict[str, Any]:
    """create_engine keyword arguments that bound connecting and every statement."""
    statement_ms = int(timeouts.database_statement_s * 1000)
    if url.startswith("sqlite"):
        # SQLite has no server to hang; its one wait is for another writer's lock
        lock_s = timeouts.database_statement_s or 30.0
        return {"connect_args": {"timeout": lock_s}}
    connect_args: dict[str, Any] = {
        "connect_timeout": max(1, round(timeouts.database_connect_s)),
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE_S,
        "keepalives_interval": KEEPALIVE_INTERVAL_S,
        "keepalives_count": KEEPALIVE_COUNT,
        # unacknowledged data for this long means the peer is gone (a hung connection)
        "tcp_user_timeout": int(
            (KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_COUNT) * 1000
        ),
    }
    if statement_ms:
        connect_args["options"] = f"-c statement_timeout={statement_ms}"
    return {"connect_args": connect_args, "pool_timeout": timeouts.database_connect_s}
