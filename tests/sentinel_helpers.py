"""A Redis Sentinel group of a test's own: a primary, replicas and sentinels, each a real
``redis-server`` on a free loopback port in a temporary directory, killed and removed at the end.

Short sentinel timeouts (down after 1 s) make a failover take a few seconds instead of the
production default of half a minute.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

REDIS_SERVER = "redis-server"
MASTER_NAME = "keyqmaster"  # the name the sentinels know the primary by
DOWN_AFTER_MS = 1000  # a primary silent this long is subjectively down
FAILOVER_TIMEOUT_MS = 2000  # sentinel's failover-timeout (also spaces repeated attempts)
QUORUM = 2  # sentinels that must agree the primary is down


def master_port(sentinel: Server) -> int:
    """The primary's port as this sentinel names it."""
    address: Any = sentinel.client().sentinel_get_master_addr_by_name(MASTER_NAME)
    return int(address[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()  # type: ignore[operator]
        except (redis.RedisError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Server:
    """One redis-server process (a data node or a sentinel)."""

    port: int
    directory: Path
    args: list[str]
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *self.args], cwd=self.directory, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_until(self.client().ping, 10, f"redis-server on port {self.port}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port, password=self.password, socket_timeout=2, socket_connect_timeout=1
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server holds its sockets open but answers nothing."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class SentinelGroup:
    """A primary, replicas and sentinels monitoring them under MASTER_NAME."""

    base: Path
    replicas: int = 1
    sentinels: int = 3
    password: str | None = None  # the data nodes' requirepass (and masterauth)
    sentinel_password: str | None = None  # the sentinels' own requirepass
    nodes: list[Server] = field(default_factory=list)  # data nodes; nodes[0] started as primary
    watchers: list[Server] = field(default_factory=list)  # the sentinels

    def start(self) -> SentinelGroup:
        primary = self._data_node(0, None)
        for i in range(self.replicas):
            self._data_node(i + 1, primary.port)
        wait_until(
            lambda: (
                primary.client().info("replication")["connected_slaves"] == self.replicas
                and all(
                    n.client().info("replication").get("master_link_status") == "up"
                    for n in self.nodes[1:]
                )
            ),
            20,
            "the replicas to sync",
        )
        for i in range(self.sentinels):
            port = free_port()
            directory = self.base / f"sentinel-{i}"
            directory.mkdir(parents=True, exist_ok=True)
            conf = directory / "sentinel.conf"
            auth = f"sentinel auth-pass {MASTER_NAME} {self.password}\n" if self.password else ""
            if self.sentinel_password:
                auth += f"requirepass {self.sentinel_password}\n"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n{auth}"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary.port} {QUORUM}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            watcher = Server(port, directory, [str(conf), "--sentinel"], self.sentinel_password)
            self.watchers.append(watcher.start())

        def all_see_everyone() -> bool:
            for w in self.watchers:
                state: Any = w.client().sentinel_master(MASTER_NAME)
                if int(state["num-other-sentinels"]) < self.sentinels - 1:
                    return False
                if int(state["num-slaves"]) < self.replicas:
                    return False
            return True

        wait_until(all_see_everyone, 30, "every sentinel to see the others and the replicas")
        return self

    def _data_node(self, index: int, primary_port: int | None) -> Server:
        port = free_port()
        args = [
            "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if primary_port is not None:
            args += ["--replicaof", "127.0.0.1", str(primary_port)]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        node = Server(port, self.base / f"redis-{index}", args, self.password).start()
        self.nodes.append(node)
        return node

    def url(self, db: int = 0, password: str | None = None) -> str:
        """Celery's form: sentinel://host:port;sentinel://host:port;.../db."""
        login = f":{password}@" if password else ""
        hosts = ";".join(f"sentinel://{login}127.0.0.1:{w.port}" for w in self.watchers)
        return f"{hosts}/{db}"

    def primary_port(self) -> int:
        """The primary's port as the first sentinel that answers names it."""
        for w in self.watchers:
            try:
                return master_port(w)
            except (redis.RedisError, TypeError):
                continue
        raise AssertionError("no sentinel answers")

    def node(self, port: int) -> Server:
        return next(n for n in self.nodes if n.port == port)

    def primary(self) -> Server:
        return self.node(self.primary_port())

    def wait_promoted(self, old_port: int, timeout: float = 30.0) -> Server:
        """The replica every sentinel names as primary once they have failed over."""

        def promoted() -> int | None:
            ports = {master_port(w) for w in self.watchers}
            if len(ports) != 1 or old_port in ports:
                return None
            port = ports.pop()
            role = self.node(port).client().info("replication")["role"]
            return port if role == "master" else None

        return self.node(int(str(wait_until(promoted, timeout, "a replica to be promoted"))))

    def restart(self, node: Server, replica_of: int | None = None) -> Server:
        """Start a killed data node again on its port; with `replica_of`, as that node's replica
        (what an operator does, so that no empty primary exists for a sentinel to elect),
        otherwise as it first started (the sentinels convert a returning primary on their own
        schedule)."""
        node.proc = None
        if replica_of is not None:
            args = list(node.args)
            if "--replicaof" in args:
                at = args.index("--replicaof")
                del args[at : at + 3]
            node.args = [*args, "--replicaof", "127.0.0.1", str(replica_of)]
        return node.start()

    def settled_primary(self) -> Server | None:
        """The node every sentinel names primary, if it says it is one and has all its replicas
        connected; None while the group is still settling."""
        ports = {master_port(w) for w in self.watchers}
        if len(ports) != 1:
            return None
        node = self.node(ports.pop())
        info = node.client().info("replication")
        if info["role"] != "master" or info["connected_slaves"] != self.replicas:
            return None
        return node

    def close(self) -> None:
        for server in [*self.watchers, *self.nodes]:
            server.kill()
