"""`keyq status`: members, partition owners with fencing tokens and queue depths, caches."""

from __future__ import annotations

import time
from typing import Any

import redis

from keyq.cache import StateCache
from keyq.celery_app import DISPATCH_TASK
from keyq.cluster import Leases, Membership
from keyq.connections import redis_client
from keyq.errors import CacheUnavailableError
from keyq.mailbox import PARTITION_TASKS, decode
from keyq.registry import NameRegistry
from keyq.settings import Settings, redact_url


def collect_status(settings: Settings) -> dict[str, Any]:
    """A snapshot of the cluster as Redis sees it (one consistent-enough read)."""
    client = redis_client(settings.redis_url, settings.timeouts)
    broker = redis_client(settings.broker_url, settings.timeouts)
    try:
        membership = Membership(client, settings)
        live = membership.live()
        members = [
            {"node": node, "heartbeat_age_ms": age, **membership.info(node)}
            for node, age in sorted(live.items())
        ]
        holders = Leases(client, settings).holders()
        pipe = broker.pipeline(transaction=False)
        for p in range(settings.partitions):
            pipe.llen(settings.queue_name(p))
            pipe.lindex(settings.queue_name(p), -1)  # the head: the oldest waiting message
        replies = pipe.execute()
        depths = replies[0::2]
        now = time.time()
        quiet: dict[str, Any] = {str(m["node"]): m.get("batch_quiet_s") for m in members}
        limits: dict[str, Any] = {str(m["node"]): m.get("watchdog_limit_s") for m in members}
        partitions = [
            {
                "partition": p,
                "owner": holders[p].owner if p in holders else None,
                "token": holders[p].token if p in holders else None,
                "lease_ttl_ms": holders[p].ttl_ms if p in holders else None,
                "depth": int(depths[p]),
                "oldest_age_s": _age(replies[2 * p + 1], now),
                "progress": _progress(
                    holders[p].owner if p in holders else None, quiet, limits, int(depths[p])
                ),
            }
            for p in range(settings.partitions)
        ]
        active = NameRegistry(client, settings).count_by_node()
        cache = StateCache(client, settings).stats()
    except redis.RedisError as e:
        where = redact_url(settings.redis_url)
        if settings.broker_url != settings.redis_url:
            where += f" or the broker at {redact_url(settings.broker_url)}"
        raise CacheUnavailableError(f"Redis at {where} is not answering: {e}") from e
    finally:
        client.close()
        broker.close()
    total = cache["hits"] + cache["misses"]
    return {
        "namespace": settings.namespace,
        "members": members,
        "partitions": partitions,
        "unowned_partitions": [p["partition"] for p in partitions if p["owner"] is None],
        "active_keys_by_node": active,
        "cache": {**cache, "hit_ratio": (cache["hits"] / total) if total else None},
        "queued_messages": sum(int(d) for d in depths),
    }


def _age(head: bytes | None, now: float) -> float | None:
    """Seconds since the producer sent the oldest waiting message (its first envelope)."""
    if head is None:
        return None
    delivery = decode(head, PARTITION_TASKS, DISPATCH_TASK)
    first = delivery.envelopes[0] if delivery.envelopes else None
    sent = first.get("sent_at") if isinstance(first, dict) else None
    return round(max(0.0, now - sent), 3) if isinstance(sent, int | float) and sent else None


def _progress(
    owner: str | None, quiet: dict[str, Any], limits: dict[str, Any], depth: int
) -> str:
    """Whether the partition's consumer moves: unowned, idle, working, or stalled (a batch
    quiet for more than half the watchdog's limit)."""
    if owner is None:
        return "unowned" if depth else "unowned (empty)"
    q, limit = quiet.get(owner), limits.get(owner)
    if q is None:
        return "waiting" if depth else "idle"
    if isinstance(limit, int | float) and q > limit / 2:
        return f"stalled {q:.0f}s"
    return "working"


def render_status(snap: dict[str, Any]) -> str:
    lines = [f"namespace {snap['namespace']}", "", "MEMBERS"]
    for m in snap["members"]:
        owned = sum(1 for p in snap["partitions"] if p["owner"] == m["node"])
        lines.append(
            f"  {m['node']:<40} heartbeat {m['heartbeat_age_ms']:>5} ms ago  "
            f"partitions {owned:>3}  active keys {snap['active_keys_by_node'].get(m['node'], 0)}"
            + ("  static" if m.get("static") else "")
        )
    if not snap["members"]:
        lines.append("  (no live members)")
    lines += [
        "",
        "PARTITIONS  owner                                     token  lease ms   depth  "
        "oldest s  progress",
    ]
    for p in snap["partitions"]:
        age = "-" if p["oldest_age_s"] is None else f"{p['oldest_age_s']:.1f}"
        ttl = "-" if p["lease_ttl_ms"] is None else str(p["lease_ttl_ms"])
        lines.append(
            f"  {p['partition']:>4}      {p['owner'] or '-':<40} {p['token'] or '-':>6} "
            f"{ttl:>8} {p['depth']:>7} {age:>9}  {p['progress']}"
        )
    c = snap["cache"]
    ratio = "n/a" if c["hit_ratio"] is None else f"{c['hit_ratio']:.1%}"
    lines += [
        "",
        f"CACHE  hits {c['hits']}  misses {c['misses']}  hit ratio {ratio}",
        f"QUEUED {snap['queued_messages']} message(s)",
    ]
    return "\n".join(lines)
