"""A network partition, not a crash: two worker nodes run in network namespaces of their own,
each with one link to Redis and another to PostgreSQL (through a hub namespace where this
test's proxies relay to the real servers). Node A's Redis link goes down (`ip link set down`)
while its database link stays up. A must stop writing (fencing: its pending write reaches the
database and is refused), B serves A's partitions within lease TTL + 1 s, nothing is lost,
doubled or reordered, and A rejoins cleanly when the link comes back."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from keyq.client import Client
from keyq.repo import Repo
from keyq.settings import Settings
from tests.conftest import ROOT, poll, settings_env
from tests.netns import Netns, leftover_namespaces, require_root_and_ip, veth
from tests.ownership_helpers import (  # noqa: F401  (database_url: PostgreSQL only)
    database_url,
    keys_in_partition,
    lease_owners,
)
from tests.tcp_proxy import TcpProxy
from tests.test_hung_connection import KEYS, Load, owner_runs, probe

pytestmark = pytest.mark.integration

READ_TIMEOUT_S = 1.0
HUB_REDIS_IF = "r{}"  # the hub's end of node {}'s Redis link


@dataclass
class Node:
    """A keyq worker process inside its own network namespace."""

    name: str
    ns: Netns
    proc: subprocess.Popen[bytes]
    log_path: Path
    settings: Settings

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Network:
    hub: Netns
    nodes: dict[str, Netns]
    proxies: dict[str, TcpProxy]  # "<node>-redis", "<node>-pg"

    def redis_link(self, node: str, up: bool) -> None:
        """The hub's end of node's Redis link, up or down (the node's end loses its carrier:
        nothing passes either way, and no socket is closed)."""
        self.hub.link(HUB_REDIS_IF.format(node), up)


@pytest.fixture
def network() -> Iterator[Network]:
    """Hub namespace with four proxies; namespaces a and b, each linked to the hub by one
    veth for Redis (10.91.<n>1.0/24) and one for PostgreSQL (10.91.<n>2.0/24)."""
    require_root_and_ip()
    made: list[Netns] = []
    proxies: dict[str, TcpProxy] = {}
    try:
        hub = Netns("h")
        made.append(hub)
        nodes: dict[str, Netns] = {}
        for n, node in enumerate(("a", "b"), start=1):
            ns = Netns(node)
            made.append(ns)
            nodes[node] = ns
            veth(hub, f"r{node}", f"10.91.{n}1.1/24", ns, "redis0", f"10.91.{n}1.2/24")
            veth(hub, f"p{node}", f"10.91.{n}2.1/24", ns, "pg0", f"10.91.{n}2.2/24")
            proxies[f"{node}-redis"] = TcpProxy(
                "127.0.0.1", 6379, f"10.91.{n}1.1", 0, listen_netns=hub.name
            ).start()
            proxies[f"{node}-pg"] = TcpProxy(
                "127.0.0.1", 5432, f"10.91.{n}2.1", 0, listen_netns=hub.name
            ).start()
        yield Network(hub, nodes, proxies)
    finally:
        for proxy in proxies.values():
            proxy.close()
        for ns in made:
            ns.delete()
        names = {ns.name for ns in made}
        assert not names & set(leftover_namespaces()), "a namespace was not removed"


@pytest.fixture
def start_node(
    network: Network, settings: Settings, tmp_path: Path, redis_client: redis.Redis
) -> Iterator[Callable[[str], Node]]:
    started: list[Node] = []

    def start(name: str) -> Node:
        r, pg = network.proxies[f"{name}-redis"], network.proxies[f"{name}-pg"]
        db = settings.redis_url.rsplit("/", 1)[1]
        redis_url = r.url("redis", f"/{db}")
        s = settings.with_(
            redis_url=redis_url,
            broker_url=redis_url,
            database_url=pg.url("postgresql", "/" + settings.database_url.rsplit("/", 1)[1],
                                "postgres"),
            redis_read_timeout_s=READ_TIMEOUT_S,
            redis_connect_timeout_s=0.5,
        )
        log_path = tmp_path / f"node-{name}.log"
        argv = [sys.executable, "-m", "keyq", "worker", "--loglevel", "info"]
        env = settings_env(s)
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                network.nodes[name].command(argv),
                env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(ROOT),
            )
        node = Node(name, network.nodes[name], proc, log_path, s)
        started.append(node)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"node {name} exited early:\n{node.log()[-3000:]}")
            return " ready." in node.log()

        poll(ready, 30.0, what=f"node {name} to start")
        return node

    yield start
    for node in started:
        node.kill()


def node_of(redis_client: redis.Redis, settings: Settings, pid: int) -> str:
    """The node id a worker process registered under (its member info holds its pid)."""
    import json

    def find() -> str | None:
        for raw in redis_client.zrange(settings.redis_key("members"), 0, -1):
            node = raw.decode() if isinstance(raw, bytes) else str(raw)
            info = redis_client.get(settings.redis_key("member", node))
            if isinstance(info, bytes) and json.loads(info).get("pid") == pid:
                return node
        return None

    return str(poll(find, 20.0, what=f"process {pid} to join"))


def test_partitioned_node_is_fenced_replaced_and_rejoins(
    network: Network,
    start_node: Callable[[str], Node],
    settings: Settings,
    client: Client,
    repo: Repo,
    redis_client: redis.Redis,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    a, b = start_node("a"), start_node("b")
    a_id, b_id = node_of(redis_client, settings, a.pid), node_of(redis_client, settings, b.pid)

    def a_parts() -> list[int] | None:
        owners = lease_owners(redis_client, settings)
        if len(owners) < settings.partitions or set(owners.values()) != {a_id, b_id}:
            return None
        return sorted(p for p, n in owners.items() if n == a_id)

    parts = poll(a_parts, 30.0, what="both nodes to own partitions")
    assert isinstance(parts, list)
    probe_key = keys_in_partition(parts[0], settings, 1, "probe")[0]
    slow_key = keys_in_partition(parts[-1], settings, 1, "pending")[0]
    load = Load(client, [f"k{i}" for i in range(KEYS)]).start()
    try:
        poll(lambda: load.total() > 200, what="load to build up")
        # a write of A's in hand: A is inside the handler of message 0 (1 waits behind it)
        mark = tmp_path / "inside-handler"
        client.send("slow", slow_key, "see", {"i": 0, "mark": str(mark), "seconds": 3.0})
        client.send("slow", slow_key, "see", {"i": 1})
        poll(lambda: mark.exists() and mark.read_text(), 10.0, 0.01, what="a in the handler")
        assert mark.read_text() == str(a.pid)

        network.redis_link("a", up=False)
        cut_at = time.monotonic()
        takeover_bound = settings.lease_ttl_s + 1.0
        takeover_s = probe(client, probe_key, cut_at, takeover_bound + 20, b.pid)
        # A's handler ends 3 s after it began: its commit reaches the database and is refused
        poll(lambda: "keyq write refused" in a.log(), 15.0, what="node a's refused write")
        cut_logs = {k: load.log(k) for k in load.keys}  # applied while A was cut off
        slow_log = (client.read("slow", slow_key) or {"log": []})["log"]
        network.redis_link("a", up=True)
        healed_at = time.monotonic()
        back_s = probe(client, probe_key, healed_at, 30.0, a.pid)
        more = load.total() + 300
        poll(lambda: load.total() > more, what="more load after the link came back")
    finally:
        load.finish()
    record_property("takeover_seconds", round(takeover_s, 3))
    record_property("rejoin_seconds", round(back_s, 3))
    print(
        f"partition: B served A's partitions after {takeover_s:.3f}s (bound {takeover_bound}s),"
        f" A served again {back_s:.3f}s after the link came back", file=sys.stderr,
    )
    assert takeover_s < takeover_bound, f"B took over after {takeover_s:.2f}s"
    # fencing: the pending write of A was not applied; B applied both messages, once, in order
    assert [(e[0]["i"], e[1]) for e in slow_log] == [(0, b.pid), (1, b.pid)], slow_log
    # and while cut off A applied nothing on any key after B had begun applying it
    for key, log in cut_logs.items():
        runs = owner_runs(log)
        assert runs in ([], [a.pid], [b.pid], [a.pid, b.pid]), (key, runs)
    load.wait_complete()
    assert repo.dead_letters() == []
    assert set(lease_owners(redis_client, settings).values()) == {a_id, b_id}, "A rejoined"
