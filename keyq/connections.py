"""Every Redis client and database engine keyq opens, with the timeouts chosen for its use.

One place on purpose: redis-py 8 gives every socket a 5 s read timeout by default, so a BLPOP
that waits longer than that failed as if Redis were down, while nothing at all bounded a hung
database connection. Here each kind of connection gets explicit limits from Settings:

- Redis commands: ``KEYQ_REDIS_CONNECT_TIMEOUT_S`` to connect, ``KEYQ_REDIS_READ_TIMEOUT_S``
  for an answer (a stopped or unreachable server is found within that).
- Blocking reads (a ``call`` waiting for its reply) never ask the server to block longer than
  ``blocking_slice_s`` (less than the read timeout), and loop until their own deadline, so the
  caller's timeout holds for any length while a hung connection is still found.
- The broker (kombu) gets the same connect and read timeouts through its transport options,
  and a fetch (BRPOP) left without an answer is given up within about twice the read timeout.
- The database: a connect timeout, TCP keepalives and ``tcp_user_timeout`` (a dead peer is
  found within seconds), and a statement timeout on PostgreSQL; SQLite waits out a writer's
  lock for the statement timeout. A server that acknowledges but never answers (stopped, hung,
  a proxy in between that stopped relaying) passes all of those: every wait of psycopg2 for
  its server is bounded too (``install_database_wait_limit``).

Redis Sentinel: a ``sentinel://host:port[;sentinel://host:port...][/db]`` URL (Celery's form)
names the sentinels instead of a server; with ``KEYQ_SENTINEL_MASTER`` every client here asks
them for the current primary on each (re)connect (redis-py's ``Sentinel.master_for``), so after
a failover the next connection goes to the promoted replica. A Redis password in the URL is the
primary's; ``KEYQ_SENTINEL_PASSWORD`` is the sentinels' own. The broker gets the same through
kombu's sentinel transport options (``master_name``, ``sentinel_kwargs``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from keyq.errors import ConfigurationError
from keyq.reply_spin import SpinningConnection

# defaults of the Settings fields below (README: Configuration)
DEFAULT_REDIS_CONNECT_TIMEOUT_S = 2.0  # a Redis that does not accept within this is down
DEFAULT_REPLY_SPIN_US = 200  # keyq.reply_spin: a reply is polled for this long, then blocked on
DEFAULT_REDIS_READ_TIMEOUT_S = 5.0  # a command unanswered this long: Redis hung or unreachable
DEFAULT_DATABASE_CONNECT_TIMEOUT_S = 5.0
DEFAULT_DATABASE_STATEMENT_TIMEOUT_S = 30.0  # one batch's statement; 0 turns it off
KEEPALIVE_IDLE_S = 5  # database TCP keepalive: first probe after this much silence ...
KEEPALIVE_INTERVAL_S = 2  # ... then one probe every this many seconds ...
KEEPALIVE_COUNT = 3  # ... and the connection is dead after this many unanswered probes
# a worker that lost its broker tries again after 0.2 s, 0.4 s ... then every 1 s (Celery's own
# schedule, 2 s, 4 s, 6 s ... up to 30 s, left a Sentinel failover's workers idle up to 4 s after
# the promotion; keyq.broker_consumer)
BROKER_RECONNECT_START_S = 0.2
BROKER_RECONNECT_STEP_S = 0.2
BROKER_RECONNECT_MAX_S = 1.0
SENTINEL_SCHEME = "sentinel"  # Celery's and kombu's scheme for a list of Redis sentinels
SENTINEL_DEFAULT_PORT = 26379  # a sentinel URL without a port means this one


@dataclass(frozen=True)
class SentinelOptions:
    """How to find a Sentinel-managed primary: its master name (KEYQ_SENTINEL_MASTER) and the
    sentinels' own password (KEYQ_SENTINEL_PASSWORD, None when they have none)."""

    master: str
    password: str | None = None


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``sentinel://`` URL: the sentinels to ask, and the primary's db and login."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None

    def kombu_url(self) -> str:
        """The URL in the form kombu reads: every alternate carries the login and the db
        (kombu takes them from the first one, and from the next one after a switch)."""
        login = ""
        if self.password is not None or self.username:
            login = f"{self.username or ''}:{self.password or ''}@"
        return ";".join(
            f"{SENTINEL_SCHEME}://{login}{host}:{port}/{self.db}" for host, port in self.sentinels
        )


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME + "://")


def parse_sentinel_url(url: str) -> SentinelUrl:
    """``sentinel://[user:password@]host:port[;sentinel://host:port...][/db]``; the db and the
    login may be written on any one of the parts (or on all alike)."""
    sentinels: list[tuple[str, int]] = []
    dbs: set[int] = set()
    logins: set[tuple[str | None, str | None]] = set()
    for part in (p.strip() for p in url.split(";")):
        if not part:
            continue
        try:
            parts = urlsplit(part)
            port = parts.port or SENTINEL_DEFAULT_PORT
        except ValueError as e:
            raise ConfigurationError(f"a sentinel URL part is malformed: {e}") from None
        if parts.scheme != SENTINEL_SCHEME or not parts.hostname:
            raise ConfigurationError(
                "each ';'-separated part of a sentinel URL must be sentinel://host:port"
            )
        sentinels.append((parts.hostname, port))
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ConfigurationError(f"the db of a sentinel URL must be a number, not {path!r}")
            dbs.add(int(path))
        if parts.username or parts.password is not None:
            user = unquote(parts.username) if parts.username else None
            password = unquote(parts.password) if parts.password is not None else None
            logins.add((user, password))
    if not sentinels:
        raise ConfigurationError("a sentinel URL must name at least one sentinel://host:port")
    if len(dbs) > 1 or len(logins) > 1:
        raise ConfigurationError(
            "the parts of a sentinel URL give different dbs or passwords: write them once"
        )
    username, password = next(iter(logins)) if logins else (None, None)
    return SentinelUrl(tuple(sentinels), dbs.pop() if dbs else 0, username, password)


@dataclass(frozen=True)
class Timeouts:
    """The connection limits of one process (built by Settings.timeouts), and for a Sentinel
    deployment how to find the primary (``sentinel``, None without one)."""

    redis_connect_s: float = DEFAULT_REDIS_CONNECT_TIMEOUT_S
    redis_read_s: float = DEFAULT_REDIS_READ_TIMEOUT_S
    redis_reply_spin_s: float = DEFAULT_REPLY_SPIN_US / 1e6
    database_connect_s: float = DEFAULT_DATABASE_CONNECT_TIMEOUT_S
    database_statement_s: float = DEFAULT_DATABASE_STATEMENT_TIMEOUT_S
    sentinel: SentinelOptions | None = None

    @property
    def blocking_slice_s(self) -> float:
        """The longest a single blocking Redis command may wait on the server: well inside
        the read timeout, so its answer always arrives before the socket gives up."""
        return max(0.01, self.redis_read_s * 0.8 - 0.05)

    def without_reply_spin(self) -> Timeouts:
        """For a worker's clients, which block for their replies at once (keyq.reply_spin)."""
        return replace(self, redis_reply_spin_s=0.0)

    def without_statement_timeout(self) -> Timeouts:
        """For schema migrations, which may rightly run longer than any one batch."""
        return replace(self, database_statement_s=0.0)


DEFAULT_TIMEOUTS = Timeouts()


def redis_client(url: str, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> redis.Redis:
    """A redis-py client for keyq's own data (registry, leases, cache, replies, queues); for a
    sentinel:// URL, a client of the current primary that follows a failover."""
    if is_sentinel_url(url):
        return sentinel_master(url, timeouts)
    spin: dict[str, Any] = {}
    if timeouts.redis_reply_spin_s > 0 and urlsplit(url).scheme == "redis":  # plain TCP
        spin = {"connection_class": SpinningConnection, "reply_spin_s": timeouts.redis_reply_spin_s}
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeouts.redis_connect_s,
        socket_timeout=timeouts.redis_read_s,
        socket_keepalive=True,
        **spin,
    )


def sentinel_options(timeouts: Timeouts) -> SentinelOptions:
    if timeouts.sentinel is None:
        raise ConfigurationError(
            "a sentinel:// URL needs the master name: set KEYQ_SENTINEL_MASTER"
        )
    return timeouts.sentinel


def sentinel_kwargs(timeouts: Timeouts) -> dict[str, Any]:
    """Connection arguments of the connections to the sentinels themselves."""
    options = sentinel_options(timeouts)
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": timeouts.redis_connect_s,
        "socket_timeout": timeouts.redis_read_s,
        "socket_keepalive": True,
    }
    if options.password:
        kwargs["password"] = options.password
    return kwargs


def sentinel_master(url: str, timeouts: Timeouts) -> redis.Redis:
    """A client of the primary the sentinels name now: each new connection asks them again,
    and a connection that meets a demoted primary (READONLY) is dropped and reconnects."""
    target = parse_sentinel_url(url)
    options = sentinel_options(timeouts)
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.sentinels),
        sentinel_kwargs=sentinel_kwargs(timeouts),
        socket_connect_timeout=timeouts.redis_connect_s,
        socket_timeout=timeouts.redis_read_s,
        socket_keepalive=True,
    )
    login: dict[str, Any] = {}
    if target.username:
        login["username"] = target.username
    if target.password is not None:
        login["password"] = target.password
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        options.master, db=target.db, **login
    )
    return client


def broker_url_for_kombu(url: str) -> str:
    """The broker URL as kombu reads it (a sentinel URL with its db on every alternate)."""
    return parse_sentinel_url(url).kombu_url() if is_sentinel_url(url) else url


def broker_transport_options(timeouts: Timeouts, url: str = "") -> dict[str, Any]:
    """The socket limits of kombu's Redis channels (producers and workers); for a sentinel://
    broker URL also the master name and the sentinels' connection arguments."""
    options: dict[str, Any] = {
        "socket_connect_timeout": timeouts.redis_connect_s,
        "socket_timeout": timeouts.redis_read_s,
        "socket_keepalive": True,
        # a consumer's fetch waits in the event loop, where no socket timeout applies: kombu
        # drops a BRPOP whose reply is this much overdue, checking this often (its default,
        # 25 s, left a worker on a hung broker connection for up to 51 s)
        "health_check_interval": timeouts.redis_read_s,
    }
    if is_sentinel_url(url):
        options["master_name"] = sentinel_options(timeouts).master
        options["sentinel_kwargs"] = sentinel_kwargs(timeouts)
    return options


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
        # a client that hangs inside a transaction (a cut link, a stopped process) keeps its
        # row locks (the partition's fence row) until the server ends its session: the server
        # does so after this long idle in a transaction, or the next owner's commits of that
        # partition wait on the lock for as long as the dead peer's TCP connection lives
        connect_args["options"] = (
            f"-c statement_timeout={statement_ms} "
            f"-c idle_in_transaction_session_timeout={statement_ms}"
        )
    install_database_wait_limit()
    return {"connect_args": connect_args, "pool_timeout": timeouts.database_connect_s}


DATABASE_ANSWER_MARGIN_S = 2.0  # past the statement timeout, the server's own cancel is here


def install_database_wait_limit() -> None:
    """Bound every wait of psycopg2 for its server, in this process (idempotent).

    libpq waits for an answer without any limit, and the server-side statement timeout cannot
    help when the server never got the statement or cannot answer: a hung connection held a
    worker's partitions forever (tests/test_hung_connection.py). psycopg2's wait callback makes
    every wait go through ``_wait_with_limit``. A callback set by someone else (psycogreen)
    is left alone.
    """
    try:
        import psycopg2.extensions  # type: ignore[import-untyped]
    except ImportError:  # another driver (psycopg 3) has timeouts of its own to set
        return
    if psycopg2.extensions.get_wait_callback() is None:
        psycopg2.extensions.set_wait_callback(_wait_with_limit)


def _wait_limits(dsn: str) -> tuple[float | None, float | None]:
    """A connection's limits, read from its DSN (what engine_options put there): for
    connecting, its connect_timeout (libpq does not apply it once a wait callback is set); for
    any answer, its statement timeout + connect timeout + a margin, or None without one."""
    import re

    import psycopg2.extensions

    found = _WAIT_LIMITS.get(dsn)
    if found is None:
        params = psycopg2.extensions.parse_dsn(dsn)
        raw = params.get("connect_timeout")
        connect = float(raw) if raw and float(raw) > 0 else None
        match = re.search(r"statement_timeout\s*=\s*(\d+)", params.get("options") or "")
        statement_s = int(match.group(1)) / 1000 if match else 0.0
        answer = statement_s + (connect or 0.0) + DATABASE_ANSWER_MARGIN_S if statement_s else None
        found = _WAIT_LIMITS[dsn] = (connect, answer)
    return found


_WAIT_LIMITS: dict[str, tuple[float | None, float | None]] = {}


def _wait_with_limit(conn: Any) -> None:
    """psycopg2's wait_select, with a limit on each wait: no byte from the server for that
    long and the connection is given up (psycopg2 closes it; SQLAlchemy's pool drops it, the
    next checkout connects anew)."""
    import select

    import psycopg2
    import psycopg2.extensions as ext

    connecting, answering = _wait_limits(conn.dsn)
    limit = connecting if conn.status == ext.STATUS_SETUP else answering
    poller = select.poll()
    fd = conn.fileno()
    while True:
        state = conn.poll()
        if state == ext.POLL_OK:
            return
        if state == ext.POLL_READ:
            poller.register(fd, select.POLLIN)
        elif state == ext.POLL_WRITE:
            poller.register(fd, select.POLLOUT)
        else:
            raise psycopg2.OperationalError(f"bad state from poll: {state}")
        if not poller.poll(None if limit is None else limit * 1000):
            raise psycopg2.OperationalError(
                f"no answer from the database server within {limit:g}s: connection given up"
            )
