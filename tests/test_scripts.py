"""keyq.scripts: composed scripts and the pipeline that does not ask for its scripts each time."""

from __future__ import annotations

import threading
import time
import uuid

import redis

from keyq.scripts import _LOADED, composed_source, script_pipeline


def _monitor(url: str, needle: str, lines: list[str], stop: threading.Event) -> None:
    with redis.Redis.from_url(url).monitor() as m:
        for cmd in m.listen():
            if stop.is_set():
                return
            if needle in cmd["command"]:
                lines.append(cmd["command"])


def test_script_pipeline_asks_once_and_reloads_scripts_the_server_lost(
    redis_client: redis.Redis, redis_url: str
) -> None:
    tag = uuid.uuid4().hex
    script = redis_client.register_script(f"-- {tag}\nreturn redis.call('INCR', KEYS[1])")
    key = f"kq-test:{tag}"
    seen: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_monitor, args=(redis_url, script.sha, seen, stop))
    watcher.start()
    time.sleep(0.2)
    try:
        for _ in range(3):
            pipe = script_pipeline(redis_client)
            script(keys=[key], client=pipe)
            pipe.execute()
        # the server loses its scripts (a restart): the known digest answers NOSCRIPT once
        lost = redis_client.register_script(f"-- {tag} lost\nreturn redis.call('INCR', KEYS[1])")
        _LOADED[redis_client.connection_pool].add(lost.sha)  # believed loaded; it is not
        pipe = script_pipeline(redis_client)
        lost(keys=[key], client=pipe)
        assert pipe.execute() == [4]
        time.sleep(0.2)
    finally:
        stop.set()
        redis_client.incr(key)  # one more command to wake the monitor
        watcher.join(5)
        redis_client.delete(key)
    asks = [c for c in seen if c.startswith("SCRIPT EXISTS")]
    assert len(asks) == 1, seen  # the first pipeline asked; the next two trusted it
    assert sum(1 for c in seen if c.startswith("EVALSHA")) == 3


def test_composed_script_defines_its_parts_as_functions() -> None:
    source = composed_source("claim_batch", "claim", "drain", "nonempty")
    assert source.index("local function claim(KEYS, ARGV)") < source.index("claim({KEYS[1]")
    assert "local function drain(KEYS, ARGV)" in source
    assert "local function nonempty(KEYS, ARGV)" in source
