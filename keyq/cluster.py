"""The cluster view: node names, live members, partition leases and who should own what.

Read by the worker's ownership loop and equally by `keyq status`, the demo, the reconciler and
the chaos tool, none of which should import the worker side to look at the cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from keyq.errors import ConfigurationError
from keyq.scripts import register
from keyq.settings import Settings

MAX_NODE_NAME_LENGTH = 64  # `keyq worker --hostname`: status columns and Redis keys stay short


def new_node_id(name: str | None = None) -> str:
    """This node's id: the given name (``keyq worker --hostname``), else one that is unique
    across hosts and restarts (host, pid and a random suffix).

    A given name may use Celery's ``%h`` (host name), ``%n`` (its first label), ``%d`` (its
    domain) and ``%%``. Reusing a name across restarts is safe: a lease is stored as
    ``node|token`` and the Repo accepts each fencing token only once, so a restarted node never
    writes under a lease its previous run was granted; it claims a new one.
    """
    if name is None:
        host = socket.gethostname().split(".")[0][:32]
        return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return check_node_name(_expand_host(name))


def _expand_host(name: str) -> str:
    host = socket.gethostname()
    short, _, domain = host.partition(".")
    out: list[str] = []
    i = 0
    while i < len(name):
        pair = name[i : i + 2]
        if pair in ("%h", "%n", "%d", "%%"):
            out.append({"%h": host, "%n": short, "%d": domain, "%%": "%"}[pair])
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def check_node_name(name: str) -> str:
    """The name if it can identify a node (status, leases, Celery); ConfigurationError if not."""
    problem = ""
    if not name:
        problem = "must not be empty"
    elif any(c.isspace() for c in name):
        problem = "must not contain whitespace"
    elif "|" in name:
        problem = "must not contain '|' (it separates node and token in a lease)"
    elif not name.isprintable():
        problem = "must contain printable characters only"
    elif len(name) > MAX_NODE_NAME_LENGTH:
        problem = f"is {len(name)} characters long, at most {MAX_NODE_NAME_LENGTH} are allowed"
    if problem:
        raise ConfigurationError(f"node name {name!r} {problem} (--hostname)")
    return name


def rendezvous_owner(partition: int, members: Iterable[str]) -> str | None:
    """The member with the highest hash weight for this partition (None with no members)."""
    best: tuple[int, str] | None = None
    for member in members:
        digest = hashlib.blake2b(f"{member}/{partition}".encode(), digest_size=8).digest()
        weight = int.from_bytes(digest, "big")
        if best is None or (weight, member) > best:
            best = (weight, member)
    return best[1] if best else None


def assignment(partitions: int, members: Iterable[str]) -> dict[str, set[int]]:
    """Every member's partition set under rendezvous hashing."""
    member_list = sorted(set(members))
    out: dict[str, set[int]] = {m: set() for m in member_list}
    for p in range(partitions):
        owner = rendezvous_owner(p, member_list)
        if owner is not None:
            out[owner].add(p)
    return out


@dataclass(frozen=True)
class LeaseInfo:
    partition: int
    owner: str
    token: int
    ttl_ms: int


class Leases:
    """The Redis lease table: who owns which partition, with fencing tokens."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._claim = register(client, "lease_claim")
        self._renew = register(client, "lease_renew")
        self._compare_delete = register(client, "compare_delete")

    def lease_key(self, partition: int) -> str:
        return self.settings.redis_key("lease", str(partition))

    def fence_key(self, partition: int) -> str:
        return self.settings.redis_key("fence", str(partition))

    def claim(self, partition: int, owner: str) -> int | None:
        """A new fencing token if the lease was free (or already ours), else None."""
        token = int(
            self._claim(
                keys=[self.lease_key(partition), self.fence_key(partition)],
                args=[owner, self.settings.lease_ttl_ms],
            )
        )
        if token == 0:
            return None
        return abs(token)

    def renew(self, owner: str, held: dict[int, int]) -> dict[int, bool]:
        if not held:
            return {}
        parts = sorted(held)
        result = self._renew(
            keys=[self.lease_key(p) for p in parts],
            args=[self.settings.lease_ttl_ms, *(f"{owner}|{held[p]}" for p in parts)],
        )
        return {p: bool(ok) for p, ok in zip(parts, result, strict=True)}

    def release(self, partition: int, owner: str, token: int) -> bool:
        return bool(
            self._compare_delete(keys=[self.lease_key(partition)], args=[f"{owner}|{token}"])
        )

    def holders(self) -> dict[int, LeaseInfo]:
        """Every partition's current lease holder (one pipeline)."""
        pipe = self.client.pipeline(transaction=False)
        for p in range(self.settings.partitions):
            pipe.get(self.lease_key(p))
            pipe.pttl(self.lease_key(p))
        raw = pipe.execute()
        out: dict[int, LeaseInfo] = {}
        for p in range(self.settings.partitions):
            value, ttl = raw[2 * p], raw[2 * p + 1]
            if value is None:
                continue
            owner, _, token = value.decode().rpartition("|")
            out[p] = LeaseInfo(p, owner, int(token), int(ttl))
        return out


class Membership:
    """Live worker nodes, by heartbeat on the Redis server's clock."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.members_key = settings.redis_key("members")
        self.balanced_key = settings.redis_key("members", "balanced")
        self._heartbeat = register(client, "heartbeat")
        self._live = register(client, "live_members")

    def info_key(self, node_id: str) -> str:
        return self.settings.redis_key("member", node_id)

    def heartbeat(
        self, node_id: str, info: dict[str, object], balanced: bool = True
    ) -> tuple[list[str], set[int]]:
        """Announce a node; returns the live members that share partitions by rendezvous, and
        the partitions that live static nodes (``keyq worker --partitions``) keep for themselves.

        A static node is a member (status, registry) but is left out of the rendezvous set:
        partitions hashed to it would otherwise never be consumed.
        """
        members, static_infos = self._heartbeat(
            keys=[self.members_key, self.info_key(node_id), self.balanced_key],
            args=[
                node_id,
                self.settings.lease_ttl_ms,
                json.dumps(info),
                "1" if balanced else "0",
                self.info_key(""),
            ],
        )
        static: set[int] = set()
        for raw in static_infos:
            try:
                static.update(int(p) for p in json.loads(raw).get("static") or ())
            except (ValueError, TypeError, AttributeError):
                continue
        return sorted(m.decode() for m in members), static

    def live(self) -> dict[str, int]:
        """Live member -> heartbeat age in ms."""
        rows = self._live(keys=[self.members_key], args=[self.settings.lease_ttl_ms])
        return {rows[i].decode(): int(rows[i + 1]) for i in range(0, len(rows), 2)}

    def info(self, node_id: str) -> dict[str, object]:
        raw = self.client.get(self.info_key(node_id))
        return dict(json.loads(raw)) if raw else {}

    def leave(self, node_id: str) -> None:
        pipe = self.client.pipeline()
        pipe.zrem(self.members_key, node_id)
        pipe.zrem(self.balanced_key, node_id)
        pipe.delete(self.info_key(node_id))
        pipe.execute()
