"""Hung connections: a TCP proxy in front of one worker's Redis (or its PostgreSQL) stops
relaying mid-load without closing anything, as a stopped server or a silent network would.
Every call of that worker has a timeout, so it notices; the lease it can no longer renew runs
out and the other worker serves its partitions within a bound; when the proxy relays again the
hung worker comes back and serves. Every key's history ends complete, once and in send order."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from keyq.client import Client
from keyq.repo import Repo
from keyq.settings import Settings
from tests.conftest import WorkerFactory, WorkerProcess, poll
from tests.ownership_helpers import (  # noqa: F401  (database_url: PostgreSQL only)
    database_url,
    keys_in_partition,
    lease_owners,
)
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

READ_TIMEOUT_S = 1.0  # the hung worker's Redis read timeout
SLACK_S = 2.0  # two noisy cores: scheduling, a batch in hand, the survivor's tick
KEYS = 16


@dataclass
class Load:
    """A producer thread sending `witness` messages round-robin over some keys (each records
    [payload, pid of the process that applied it]), and the checks of what it sent."""

    client: Client
    keys: list[str]
    sent: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> Load:
        self.sent = dict.fromkeys(self.keys, 0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                key = self.keys[n % len(self.keys)]
                self.client.send("witness", key, "see", self.sent[key])
                self.sent[key] += 1
                time.sleep(0.003)
        except BaseException as e:  # reported by finish()
            self.errors.append(e)

    def total(self) -> int:
        return sum(self.sent.values())

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)
        assert not self.errors, f"the producer failed: {self.errors!r}"

    def log(self, key: str) -> list[list[Any]]:
        state = self.client.read("witness", key)
        return list(state["log"]) if state else []

    def problems(self) -> dict[str, str]:
        """Keys whose history is not exactly 0..sent-1 in order: what is wrong with each."""
        out: dict[str, str] = {}
        for key in self.keys:
            got = [int(p) for p, _ in self.log(key)]
            if got != list(range(self.sent[key])):
                out[key] = history_diff(got, self.sent[key])
        return out

    def wait_complete(self, timeout: float = 30.0) -> None:
        try:
            poll(lambda: not self.problems(), timeout, 0.2, what="every history complete")
        except AssertionError:
            raise AssertionError(f"histories wrong: {self.problems()}") from None


def history_diff(got: list[int], sent: int) -> str:
    missing = sorted(set(range(sent)) - set(got))
    dupes = sorted({x for x in got if got.count(x) > 1})
    disorder = [(a, b) for a, b in itertools.pairwise(got) if b < a]
    return (
        f"sent={sent} got={len(got)} missing={missing[:8]} dupes={dupes[:8]} "
        f"order={disorder[:4]}"
    )


def probe(
    client: Client, key: str, since: float, limit: float, by_pid: int | None = None
) -> float:
    """Send `witness` messages to key (tagged with `since`) until one of them is applied, by
    process by_pid if given: the seconds from `since` until that was seen (AssertionError
    past `limit`)."""
    tag = repr(since)
    n = 0
    while True:
        client.send("witness", key, "see", {"probe": tag, "n": n})
        n += 1
        state = client.read("witness", key)
        for payload, pid in state["log"] if state else []:
            ours = isinstance(payload, dict) and payload.get("probe") == tag
            if ours and (by_pid is None or pid == by_pid):
                return time.monotonic() - since
        if time.monotonic() - since > limit:
            who = f"process {by_pid}" if by_pid else "any process"
            raise AssertionError(f"{who} applied no message of {key!r} within {limit:.0f}s")
        time.sleep(0.01)


@pytest.fixture
def redis_proxy() -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", 6379) as proxy:
        yield proxy


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", 5432) as proxy:
        yield proxy


def two_nodes(
    start_worker: WorkerFactory,
    redis_client: redis.Redis,
    base: Settings,
    hung: Settings,
) -> tuple[WorkerProcess, WorkerProcess, list[int]]:
    """The survivor (direct connections) and the node behind the proxy; both own partitions.
    Returns them and the partitions the proxied node owns."""
    survivor = start_worker(settings_override=base)
    node = start_worker(settings_override=hung)
    a, b = node.node_id(redis_client, base), survivor.node_id(redis_client, base)

    def both_own() -> list[int] | None:
        owners = lease_owners(redis_client, base)
        if len(owners) < base.partitions or set(owners.values()) != {a, b}:
            return None
        return sorted(p for p, n in owners.items() if n == a)

    parts = poll(both_own, 30.0, what="both workers to own partitions")
    assert isinstance(parts, list)
    return node, survivor, parts


def owner_runs(log: list[list[Any]]) -> list[int]:
    """The pids of a witness log with repeats folded: [a, a, b, b, a] -> [a, b, a]."""
    return [pid for pid, _ in itertools.groupby(pid for _, pid in log)]


def log_time(line_start: str) -> float:
    """The wall-clock time of a worker log line ("2026-01-01 10:00:00,123 ...")."""
    import datetime

    stamp = datetime.datetime.strptime(line_start[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def first_line_after(log: str, needle: str, after_wall: float) -> float | None:
    """Wall-clock time of the first log line holding needle, logged at or after after_wall."""
    for line in log.splitlines():
        if needle in line and line[:4].isdigit():
            at = log_time(line)
            if at >= after_wall - 0.01:
                return at
    return None


def test_hung_database_connections_are_given_up_and_the_node_serves_on(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    redis_client: redis.Redis,
    pg_proxy: TcpProxy,
    repo: Repo,
    record_property: Callable[[str, object], None],
) -> None:
    """Every PostgreSQL connection of one node hangs mid-load (the proxy stops relaying them;
    new connections work). Each call on a hung connection gives up after the statement timeout
    + connect timeout + 2 s (keyq.connections' wait limit), the pool opens a new one, and the
    node applies its partitions' messages again within that limit + slack."""
    statement_s, connect_s = 2.0, 1.0
    # each hung pooled connection costs one wait limit: past KEYQ_REPO_HANDOFF_S of them in a
    # row the node would hand its partitions on (the test below): here it must serve on itself
    base = settings.with_(
        database_statement_timeout_s=statement_s,
        database_connect_timeout_s=connect_s,
        repo_handoff_s=60.0,
    )
    node, _, parts = two_nodes(start_worker, redis_client, base, proxied_database(base, pg_proxy))
    probe_key = keys_in_partition(parts[0], base, 1, "probe")[0]
    load = Load(client, [f"k{i}" for i in range(KEYS)]).start()
    try:
        poll(lambda: load.total() > 200, what="load to build up")
        assert pg_proxy.hang() > 0, "the node has no database connection to hang"
        hung_at = time.monotonic()
        wait_limit = statement_s + connect_s + 2.0  # keyq.connections.DATABASE_ANSWER_MARGIN_S
        bound = wait_limit + base.lease_ttl_s + SLACK_S
        served_s = probe(client, probe_key, hung_at, bound + 20.0, by_pid=node.pid)
        more = load.total() + 300
        poll(lambda: load.total() > more, what="more load after the hang")
    finally:
        load.finish()
    record_property("served_again_seconds", round(served_s, 3))
    print(f"hung database connections: served again after {served_s:.3f}s", file=sys.stderr)
    assert served_s < bound, f"served again after {served_s:.1f}s, bound {bound:.1f}s"
    load.wait_complete()
    assert repo.dead_letters() == []


def proxied_database(base: Settings, proxy: TcpProxy) -> Settings:
    """The same settings with PostgreSQL reached through the proxy."""
    db = base.database_url.rsplit("/", 1)[1]
    return base.with_(database_url=proxy.url("postgresql", f"/{db}", "postgres"))


def proxied_redis(base: Settings, proxy: TcpProxy) -> Settings:
    """The same settings with Redis and the broker reached through the proxy."""
    db = base.redis_url.rsplit("/", 1)[1]
    url = proxy.url("redis", f"/{db}")
    return base.with_(redis_url=url, broker_url=url)


def redis_limits(settings: Settings) -> Settings:
    return settings.with_(redis_read_timeout_s=READ_TIMEOUT_S, redis_connect_timeout_s=0.5)


def test_hung_redis_connections_are_given_up_and_the_node_serves_on(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    redis_client: redis.Redis,
    redis_proxy: TcpProxy,
    record_property: Callable[[str, object], None],
) -> None:
    """Every Redis connection of one node (registry, leases, broker) hangs mid-load; new ones
    work. Each call on a hung connection fails after the read timeout (1 s) and the node
    connects anew; a fetch waiting in kombu's event loop (no socket timeout applies there) is
    dropped by kombu's check (keyq.connections sets its interval to the read timeout). The node
    applies its partitions' messages again within lease TTL + 5 read timeouts + slack (having
    kept or re-claimed its leases); nothing is lost, doubled or reordered."""
    base = redis_limits(settings)
    node, _, parts = two_nodes(start_worker, redis_client, base, proxied_redis(base, redis_proxy))
    probe_key = keys_in_partition(parts[0], base, 1, "probe")[0]
    load = Load(client, [f"k{i}" for i in range(KEYS)]).start()
    try:
        poll(lambda: load.total() > 200, what="load to build up")
        assert redis_proxy.hang() > 0, "the node has no Redis connection to hang"
        hung_at = time.monotonic()
        # its loop meets each hung connection once (leases, registry, kombu's commands and
        # fetch), one read timeout each, kombu's fetch check up to two; the lease may lapse
        bound = base.lease_ttl_s + 5 * READ_TIMEOUT_S + SLACK_S
        served_s = probe(client, probe_key, hung_at, bound + 20.0, by_pid=node.pid)
        more = load.total() + 300
        poll(lambda: load.total() > more, what="more load after the hang")
    finally:
        load.finish()
    record_property("served_again_seconds", round(served_s, 3))
    print(f"hung Redis connections: the node served again after {served_s:.3f}s", file=sys.stderr)
    assert served_s < bound, f"served again after {served_s:.1f}s, bound {bound:.1f}s"
    load.wait_complete()


def test_a_node_cut_off_from_redis_gives_up_its_leases_and_rejoins(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    redis_client: redis.Redis,
    redis_proxy: TcpProxy,
    record_property: Callable[[str, object], None],
) -> None:
    """The proxy stops relaying anything to one node's Redis, new connections too (its Redis
    hangs, its database still answers). The node cannot renew its leases: the other node
    serves its partitions within lease TTL + slack, while the hung node notices (its heartbeat
    fails) within its read timeout + slack and applies nothing more. When the proxy relays
    again the node comes back and serves its partitions; every key's history is complete, in
    send order, each message once."""
    base = redis_limits(settings)
    node, survivor, parts = two_nodes(
        start_worker, redis_client, base, proxied_redis(base, redis_proxy)
    )
    probe_key = keys_in_partition(parts[0], base, 1, "probe")[0]
    load = Load(client, [f"k{i}" for i in range(KEYS)]).start()
    try:
        poll(lambda: load.total() > 200, what="load to build up")
        redis_proxy.freeze()
        frozen_wall, frozen_at = time.time(), time.monotonic()
        takeover_bound = base.lease_ttl_s + SLACK_S
        takeover_s = probe(client, probe_key, frozen_at, takeover_bound + 20, survivor.pid)
        time.sleep(2 * READ_TIMEOUT_S)  # the hung node's calls time out meanwhile
        hung_logs = {k: load.log(k) for k in load.keys}  # what was applied while it hung
        noticed = first_line_after(node.log(), "keyq heartbeat failed", frozen_wall)
        redis_proxy.thaw()
        thawed_at = time.monotonic()
        back_bound = READ_TIMEOUT_S + base.lease_ttl_s + SLACK_S
        back_s = probe(client, probe_key, thawed_at, back_bound + 20, node.pid)
        more = load.total() + 300
        poll(lambda: load.total() > more, what="more load after the thaw")
    finally:
        load.finish()
    for name, value in (("takeover", takeover_s), ("back", back_s)):
        record_property(f"{name}_seconds", round(value, 3))
    print(f"Redis cut off: served by the other node after {takeover_s:.3f}s, the node noticed "
          f"after {(noticed or 0) - frozen_wall:.3f}s, served again by it {back_s:.3f}s after "
          f"the thaw", file=sys.stderr)
    assert takeover_s < takeover_bound, f"taken over after {takeover_s:.1f}s"
    assert noticed is not None, "the hung node never noticed it lost Redis"
    assert noticed - frozen_wall < READ_TIMEOUT_S + SLACK_S, "the hung node noticed late"
    # fencing while it hung: on every key, nothing of the hung node's after the survivor's
    for key, log in hung_logs.items():
        runs = owner_runs(log)
        assert runs in ([], [node.pid], [survivor.pid], [node.pid, survivor.pid]), (key, runs)
    assert back_s < back_bound, f"the node served again {back_s:.1f}s after the thaw"
    load.wait_complete()


def within(
    seconds: float, fn: Callable[[], object], release: Callable[[], None] | None = None
) -> tuple[BaseException | None, float]:
    """Run fn in a thread; what it raised (None if nothing) and how long it took. A call still
    running after `seconds` fails the test instead of hanging it (after release())."""
    out: dict[str, BaseException] = {}

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            out["error"] = e

    started = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if release is not None:
            release()  # so that nothing else hangs on the stuck call's connection
        raise AssertionError(f"the call still waits after {seconds:.1f}s: no limit applied")
    return out.get("error"), time.monotonic() - started


def test_every_database_wait_on_a_hung_connection_has_a_limit(
    pg_proxy: TcpProxy, pg_database_url: str
) -> None:
    """keyq's engines on a connection that stops answering: a statement gives up after the
    statement timeout + connect timeout + 2 s, connecting gives up after the connect timeout
    (libpq alone waits forever for both), and the pool then connects anew."""
    import sqlalchemy as sa

    from keyq.connections import DATABASE_ANSWER_MARGIN_S, Timeouts
    from keyq.repo import make_engine

    db = pg_database_url.rsplit("/", 1)[1]
    timeouts = Timeouts(database_connect_s=1.0, database_statement_s=1.0)
    engine = make_engine(pg_proxy.url("postgresql", f"/{db}", "postgres"), timeouts=timeouts)
    limit = 1.0 + 1.0 + DATABASE_ANSWER_MARGIN_S
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
            assert pg_proxy.hang() == 1
            error, waited = within(
                limit + SLACK_S, lambda: conn.execute(sa.text("SELECT 2")), pg_proxy.close
            )
        assert isinstance(error, sa.exc.OperationalError), error
        assert "no answer from the database" in str(error)
        assert limit - 0.1 <= waited, waited
        pg_proxy.freeze()  # new connections are accepted and never answered

        def connect() -> None:
            with engine.connect():
                pass

        error, _ = within(1.0 + SLACK_S, connect, pg_proxy.close)
        assert isinstance(error, sa.exc.OperationalError), error
        pg_proxy.thaw()
        with engine.connect() as conn:  # the hung connection was dropped, not pooled
            assert conn.execute(sa.text("SELECT 3")).scalar() == 3
    finally:
        engine.dispose()


def test_a_node_that_loses_its_database_hands_its_partitions_to_the_others(
    start_worker: WorkerFactory,
    client: Client,
    settings: Settings,
    redis_client: redis.Redis,
    pg_proxy: TcpProxy,
    repo: Repo,
    record_property: Callable[[str, object], None],
) -> None:
    """One node loses its database altogether (the proxy swallows every connection, new ones
    too) while the other still reaches it: after KEYQ_REPO_HANDOFF_S of failures the node gives
    up its batch (messages back at their queue heads), leaves the rendezvous set and releases
    its partitions; the other node serves them within handoff + TTL + grace + slack. When the
    database answers again the node rejoins and serves its partitions again. Every history
    complete, once, in order; nothing dead-lettered."""
    handoff_s, statement_s, connect_s = 2.0, 2.0, 1.0
    base = settings.with_(
        database_statement_timeout_s=statement_s,
        database_connect_timeout_s=connect_s,
        repo_handoff_s=handoff_s,
    )
    node, survivor, parts = two_nodes(
        start_worker, redis_client, base, proxied_database(base, pg_proxy)
    )
    probe_key = keys_in_partition(parts[0], base, 1, "probe")[0]
    load = Load(client, [f"k{i}" for i in range(KEYS)]).start()
    try:
        poll(lambda: load.total() > 200, what="load to build up")
        pg_proxy.cut()
        cut_at = time.monotonic()
        # the node notices within one wait limit, steps back after the handoff time, and the
        # survivor claims once the lease is released (grace) or expired (TTL)
        wait_limit = statement_s + connect_s + 2.0
        bound = wait_limit + handoff_s + base.lease_ttl_s + 1.0 + SLACK_S
        taken_s = probe(client, probe_key, cut_at, bound + 20.0, by_pid=survivor.pid)
        assert node.proc.poll() is None, node.log()[-2000:]
        pg_proxy.thaw()
        back_at = time.monotonic()
        rejoined_s = probe(client, probe_key, back_at, 30.0, by_pid=node.pid)
        more = load.total() + 300
        poll(lambda: load.total() > more, what="more load after the database came back")
    finally:
        load.finish()
    record_property("handed_off_seconds", round(taken_s, 3))
    record_property("rejoined_seconds", round(rejoined_s, 3))
    print(
        f"database lost by one node: served by the other after {taken_s:.3f}s; "
        f"the node served again {rejoined_s:.3f}s after the database came back",
        file=sys.stderr,
    )
    assert taken_s < bound, f"handed off after {taken_s:.1f}s, bound {bound:.1f}s"
    assert "this node takes partitions again" in node.log()
    load.wait_complete()
    assert repo.dead_letters() == []
