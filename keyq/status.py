"""`keyq status`: members, partition owners with fencing tokens and queue depths, caches."""

from __future__ import annotations

from typing import Any

import redis

from keyq.cache import StateCache
from keyq.cluster import Leases, Membership
from keyq.connections import redis_client
from keyq.errors import CacheUnavailableError
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
        depths = pipe.execute()
        partitions = [
            {
                "partition": p,
                "owner": holders[p].owner if p in holders else None,
                "token": holders[p].token if p in holders else None,
                "lease_ttl_ms": holders[p].ttl_ms if p in holders else None,
                "depth": int(depths[p]),
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
    lines += ["", "PARTITIONS  owner                                     token   depth"]
    for p in snap["partitions"]:
        lines.append(
            f"  {p['partition']:>4}      {p['owner'] or '-':<40} {p['token'] or '-':>6} "
            f"{p['depth']:>7}"
        )
    c = snap["cache"]
    ratio = "n/a" if c["hit_ratio"] is None else f"{c['hit_ratio']:.1%}"
    lines += [
        "",
        f"CACHE  hits {c['hits']}  misses {c['misses']}  hit ratio {ratio}",
        f"QUEUED {snap['queued_messages']} message(s)",
    ]
    return "\n".join(lines)
