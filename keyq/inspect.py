"""`keyq inspect ENTITY KEY`: everything keyq knows about one key, from every place it lives.

An operator asking "why is this key stuck?" needs the answer in one view: which partition the
key hashes to and who holds that partition's lease (with its fencing token), what the Repo holds
(version, state size, the last applied message ids), what the cache holds (a cached version
behind the Repo's is normal for a moment, for long it is a cache the reconciler has not healed),
how many messages wait on the partition and for how long, the key's pending timers, and its
recent dead letters. Read-only: nothing is activated, counted as a cache read or published.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click
import redis

from keyq.cache import StateCache
from keyq.celery_app import DISPATCH_TASK
from keyq.cli_errors import handle_errors
from keyq.cluster import Leases
from keyq.cluster_metrics import oldest_sent_at
from keyq.connections import redis_client
from keyq.dedupe import DedupeWindow
from keyq.errors import CacheUnavailableError, ValidationError
from keyq.mailbox import PARTITION_TASKS, decode
from keyq.registry import NameRegistry
from keyq.repo import Repo
from keyq.routing import partition_for
from keyq.settings import Settings, redact_url

SCAN_LIMIT = 10_000  # queued broker messages looked into for this key's own messages, at most
RECENT_DEAD_LETTERS = 5  # dead letters of the key shown, newest last
RECENT_IDS = 10  # last applied message ids shown
DEAD_LETTER_WINDOW = 1000  # dead letters of the key read to find the newest ones


def _queue_figures(broker: redis.Redis, settings: Settings, partition: int, entity: str,
                   key: str, now: float) -> dict[str, Any]:
    queue = settings.queue_name(partition)
    pipe = broker.pipeline(transaction=False)
    pipe.llen(queue)
    pipe.lindex(queue, -1)
    pipe.lrange(queue, -SCAN_LIMIT, -1)
    depth, oldest, scanned = pipe.execute()
    mine = 0
    for raw in scanned:
        for env in decode(raw, PARTITION_TASKS, DISPATCH_TASK).envelopes:
            if isinstance(env, dict) and env.get("entity") == entity and env.get("key") == key:
                mine += 1
    sent = oldest_sent_at([oldest])
    return {
        "queue": queue,
        "depth": int(depth),
        "oldest_age_s": round(now - sent, 3) if sent is not None else None,
        "waiting_for_key": mine,
        "waiting_for_key_scanned": len(scanned),
    }


def collect_inspect(settings: Settings, entity: str, key: str) -> dict[str, Any]:
    """One key's view (see the module docstring) as a JSON-ready dict."""
    if not entity or not key:
        raise ValidationError("inspect needs an entity name and a key")
    partition = partition_for(key, settings.partitions)
    now = time.time()
    client = redis_client(settings.redis_url, settings.timeouts)
    broker = redis_client(settings.broker_url, settings.timeouts)
    try:
        lease = Leases(client, settings).holders().get(partition)
        resolution = NameRegistry(client, settings).resolve(entity, key)
        cached = StateCache(client, settings).get(entity, key)
        queue = _queue_figures(broker, settings, partition, entity, key, now)
    except redis.RedisError as e:
        raise CacheUnavailableError(
            f"Redis at {redact_url(settings.redis_url)} is not answering: {e}"
        ) from e
    finally:
        client.close()
        broker.close()
    repo = Repo(settings.database_url, timeouts=settings.timeouts)
    try:
        stored = repo.load_one(entity, key)
        timers = repo.load_timers([(entity, key)]).get((entity, key), {})
        dead = repo.dead_letters(entity=entity, key=key, limit=DEAD_LETTER_WINDOW)
    finally:
        repo.dispose()
    repo_view: dict[str, Any] | None = None
    if stored is not None:
        repo_view = {
            "version": stored.version,
            "state_bytes": len(json.dumps(stored.state, separators=(",", ":")).encode()),
            "active": stored.active,
            "fence": stored.fence,
            "last_applied_ids": DedupeWindow.from_stored(stored.recent_ids).last[-RECENT_IDS:],
        }
    return {
        "entity": entity,
        "key": key,
        "partition": partition,
        "lease": None if lease is None else {
            "owner": lease.owner, "token": lease.token, "ttl_ms": lease.ttl_ms
        },
        "activation": resolution.to_json(),
        "repo": repo_view,
        "cache": None if cached is None else {"version": cached.version},
        "messages": queue,
        "timers": [
            {
                "name": t.name,
                "op": t.op,
                "due_in_s": round(t.due_ms / 1000.0 - now, 3),
                "every_s": None if t.every_ms is None else t.every_ms / 1000.0,
                "catch_up": t.catch_up,
            }
            for t in sorted(timers.values(), key=lambda t: t.due_ms)
        ],
        "dead_letters": [
            {
                "id": d.id,
                "message_id": d.message_id,
                "op": d.op,
                "reason": d.reason,
                "error": f"{d.error_type}: {d.error_message}",
                "created_at": str(d.created_at),
            }
            for d in dead[-RECENT_DEAD_LETTERS:]
        ],
    }


def render_inspect(view: dict[str, Any]) -> str:
    lease, repo, cache, msgs = view["lease"], view["repo"], view["cache"], view["messages"]
    act = view["activation"]
    lines = [
        f"{view['entity']}/{view['key']}  partition {view['partition']} ({msgs['queue']})",
        "  lease     "
        + ("none: the partition is not owned" if lease is None else
           f"{lease['owner']}  token {lease['token']}  ttl {lease['ttl_ms']} ms"),
        "  active    "
        + (f"on {act['node']} (heartbeat {act['heartbeat_age_ms']} ms ago)" if act["active"]
           else "no"),
        "  repo      "
        + ("no state stored" if repo is None else
           f"version {repo['version']}  state {repo['state_bytes']} bytes  fence {repo['fence']}"),
        "  cache     " + ("no entry" if cache is None else f"version {cache['version']}"),
        f"  queue     {msgs['depth']} waiting on the partition, "
        f"{msgs['waiting_for_key']} for this key"
        + ("" if msgs["oldest_age_s"] is None else f", oldest {msgs['oldest_age_s']:.1f}s old"),
    ]
    if repo is not None and repo["last_applied_ids"]:
        lines.append("  applied   " + " ".join(repo["last_applied_ids"][-3:]) + " (last)")
    for t in view["timers"]:
        lines.append(f"  timer     {t['name']}: {t['op']} in {t['due_in_s']:.1f}s")
    for d in view["dead_letters"]:
        lines.append(f"  dead      #{d['id']} {d['op']} {d['reason']}: {d['error']}")
    return "\n".join(lines)


@click.command("inspect")
@click.argument("entity")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def inspect(entity: str, key: str, as_json: bool) -> None:
    """Everything about one key: partition, lease owner and token, Repo version and state size,
    cached version, waiting messages and the oldest's age, timers, dead letters.

    \b
    Examples:
      keyq inspect cart alice
      keyq inspect counter user-1 --json
    """
    view = collect_inspect(Settings.from_env(), entity, key)
    if as_json:
        click.echo(json.dumps(view, sort_keys=True, default=str))
    else:
        click.echo(render_inspect(view))
