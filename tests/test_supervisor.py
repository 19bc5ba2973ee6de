"""Supervisor: activation on demand, restart from the Repo under restart intensity."""

from __future__ import annotations

import random
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from keyq.client import Client
from keyq.dedupe import DedupeWindow
from keyq.errors import HandlerCrashedError, HandlerTimeoutError
from keyq.repo import Repo, StateWrite
from keyq.routing import partition_for
from keyq.settings import Settings
from keyq.supervisor import (
    SupervisionPolicy,
    Supervisor,
    backoff_delay,
    time_limit,
)
from tests.conftest import SUPERVISED_ENTITY_MODULES, WorkerFactory, WorkerProcess, poll
from tests.supervised_entities import LIFECYCLE_LOG

pytestmark = pytest.mark.integration

ENTITY_MODULES = SUPERVISED_ENTITY_MODULES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(port: int, name: str, **labels: str) -> float:
    """One sample of a worker's Prometheus metrics (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name + (f"{{{want}}}" if want else "")) + r" ([0-9.e+-]+)"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def start(
    start_worker: WorkerFactory, s: Settings, tmp_path: Path, port: int | None = None
) -> WorkerProcess:
    env = {LIFECYCLE_LOG: str(tmp_path / "lifecycle.log")}
    if port:
        env["KEYQ_METRICS_PORT"] = str(port)
    return start_worker(settings_override=s, env=env)


def test_first_message_activates_key_from_repo_runs_on_activate_and_registers_name(
    start_worker: WorkerFactory,
    sup_settings: Settings,
    sup_client: Client,
    repo: Repo,
    redis_client: object,
    tmp_path: Path,
) -> None:
    # given a key whose state is already in the Repo (and nothing in the cache)
    seeded = {"activations": 0, "note": "from the repo"}
    part = partition_for("k1", sup_settings.partitions)
    repo.commit(part, 0, [StateWrite("lifecycle", "k1", seeded, 5, ["old-id"])])
    port = free_port()
    worker = start(start_worker, sup_settings, tmp_path, port)

    # when its first message arrives, it is loaded from the Repo and on_activate runs once
    first = sup_client.call("lifecycle", "k1", "touch")
    assert first["note"] == "from the repo" and first["activations"] == 1
    assert sup_client.call("lifecycle", "k1", "touch")["activations"] == 1  # still active
    stored = repo.load_one("lifecycle", "k1")
    assert stored is not None and stored.version == 7
    window = DedupeWindow.from_stored(stored.recent_ids)  # the old list form, read and kept
    assert window.seen("old-id") and window.last[0] == "old-id" and len(window) == 3

    # a key unknown to the Repo starts from the entity's initial state
    assert sup_client.call("lifecycle", "k2", "touch") == {"activations": 1, "key": "k2"}

    # its name is registered to this worker, and each activation counted one spawn
    node = worker.node_id(sup_client.redis, sup_settings)  # type: ignore[arg-type]
    assert sup_client.resolve("lifecycle", "k1").node == node
    assert sup_client.resolve("lifecycle", "k2").node == node
    poll(
        lambda: metric(port, "keyq_spawns_total", entity="lifecycle") == 2.0,
        what="keyq_spawns_total == 2.0",
    )
    log = (tmp_path / "lifecycle.log").read_text().splitlines()
    assert len([line for line in log if line.startswith("activate")]) == 2


def test_crashed_handler_restarts_from_repo_state_and_keeps_key_order(
    start_worker: WorkerFactory, sup_settings: Settings, sup_client: Client, tmp_path: Path
) -> None:
    port = free_port()
    start(start_worker, sup_settings, tmp_path, port)
    # given three messages for one key where the second fails twice before it succeeds
    sup_client.send_many(
        "transient",
        [
            ("t1", "see", {"value": 1}),
            ("t1", "see", {"value": 2, "fail": 2}),
            ("t1", "see", {"value": 3}),
        ],
    )
    # then each is applied once, in order, without the state the crashed runs mutated
    poll(
        lambda: (sup_client.read("transient", "t1") or {}).get("seen") == [1, 2, 3],
        what="seen == [1, 2, 3]",
    )
    poll(
        lambda: metric(port, "keyq_restarts_total", entity="transient") == 2.0,
        what="keyq_restarts_total == 2.0",
    )
    assert metric(port, "keyq_restarts_total", entity="flaky") == 0.0

    # a handler that corrupts the state and then raises leaves no trace of the corruption
    sup_client.call("flaky", "f1", "inc")
    with pytest.raises(HandlerCrashedError):
        sup_client.call("flaky", "f1", "mutate_then_boom")
    assert sup_client.call("flaky", "f1", "inc") == 2
    assert sup_client.read("flaky", "f1") == {"n": 2, "junk": []}


def test_handler_past_restart_intensity_is_dead_lettered_and_caller_gets_typed_error(
    start_worker: WorkerFactory,
    sup_settings: Settings,
    sup_client: Client,
    repo: Repo,
    tmp_path: Path,
) -> None:
    port = free_port()
    start(start_worker, sup_settings, tmp_path, port)
    with pytest.raises(HandlerCrashedError, match="ValueError: boom x") as info:
        sup_client.call("flaky", "f2", "boom", "x")
    assert info.value.exc_type == "ValueError" and info.value.key == "f2"
    [dead] = repo.dead_letters(entity="flaky", key="f2")
    assert dead.reason == "crashed" and dead.error_type == "ValueError"
    assert dead.error_message == "boom x" and "raise ValueError" in dead.traceback
    assert dead.attempts == 3  # the first try and the 2 restarts Flaky allows
    assert dead.message_id == info.value.message_id
    poll(
        lambda: metric(port, "keyq_restarts_total", entity="flaky") == 2.0,
        what="keyq_restarts_total == 2.0",
    )
    # the key's next messages go on
    assert sup_client.call("flaky", "f2", "inc") == 1


def test_always_failing_handler_does_not_stall_its_partition(
    start_worker: WorkerFactory,
    sup_settings: Settings,
    sup_client: Client,
    repo: Repo,
    tmp_path: Path,
) -> None:
    start(start_worker, sup_settings, tmp_path)
    part = partition_for("bad", sup_settings.partitions)
    neighbour = next(
        f"n{i}" for i in range(1000) if partition_for(f"n{i}", sup_settings.partitions) == part
    )
    # given a key whose every message crashes, interleaved with a healthy key of its partition
    for i in range(15):
        sup_client.send("flaky", "bad", "boom", i)
        sup_client.send("counter", neighbour, "add", {"by": 1})
    # then the healthy key gets all its messages and every bad message is dead-lettered once
    poll(lambda: (sup_client.read("counter", neighbour) or {}).get("value") == 15, what="15 adds")
    poll(lambda: len(repo.dead_letters(entity="flaky", key="bad")) == 15, what="15 dead letters")
    dead = repo.dead_letters(entity="flaky", key="bad")
    assert [d.envelope["payload"] for d in dead] == list(range(15))  # in the key's order
    # the restart intensity bounded the retries: most went straight to the dead-letter table
    assert [d.attempts for d in dead].count(1) >= 10


POLICY = SupervisionPolicy(
    max_restarts=2, within_seconds=5.0, backoff_min_s=0.1, backoff_max_s=2.0, max_handler_seconds=0
)


def test_restart_intensity_allows_max_restarts_per_window_per_key() -> None:
    now = [100.0]
    sup = Supervisor(clock=lambda: now[0], rng=random.Random(1))
    boom = ValueError("boom")
    assert sup.on_crash("e", "a", 1, POLICY, boom).restart
    assert sup.on_crash("e", "a", 2, POLICY, boom).restart
    third = sup.on_crash("e", "a", 3, POLICY, boom)
    assert not third.restart and third.reason == "crashed"  # a third restart within 5 s
    assert sup.on_crash("e", "b", 1, POLICY, boom).restart  # another key has its own budget
    now[0] += 5.1
    assert sup.on_crash("e", "a", 1, POLICY, boom).restart  # the window slid past
    assert sup.total == {"e": 4}


def test_a_handler_past_its_time_limit_is_not_restarted() -> None:
    decision = Supervisor().on_crash("e", "k", 1, POLICY, HandlerTimeoutError("too long"))
    assert not decision.restart and decision.reason == "timeout"


def test_backoff_grows_with_jitter_between_the_configured_bounds() -> None:
    rng = random.Random(3)
    delays = [backoff_delay(n, POLICY, rng) for n in range(1, 12)]
    assert 0.08 <= delays[0] <= 0.12 and max(delays) <= POLICY.backoff_max_s
    assert delays[3] > delays[0] * 4  # exponential: 0.8 s against 0.1 s, jitter aside
    assert len(set(delays[6:])) > 1  # capped waits are spread by jitter, not in lockstep
    defaults = Settings().supervision
    waited = sum(backoff_delay(n, defaults, random.Random(0)) for n in range(1, 11))
    assert waited > 10.0  # the defaults ride out a 10 s outage within the restart budget
    assert defaults.max_restarts >= 10 and defaults.within_seconds > waited


def test_time_limit_interrupts_a_spinning_handler() -> None:
    import time as _time

    started = _time.monotonic()
    with pytest.raises(HandlerTimeoutError, match=r"limit of 0\.2s"), time_limit(0.2, "spin"):
        while True:
            pass
    assert _time.monotonic() - started < 5.0


def test_time_limit_is_disarmed_after_the_handler_and_keeps_the_previous_alarm_handler() -> None:
    import signal as _sig
    import time as _time

    seen: list[int] = []
    previous = _sig.signal(_sig.SIGALRM, lambda signum, _frame: seen.append(signum))
    try:
        for _ in range(3):
            with time_limit(0.05, "quick"):
                pass  # finished in time: nothing may fire later
        _time.sleep(0.15)
        assert seen == []
        _sig.setitimer(_sig.ITIMER_REAL, 0.01)  # someone else's alarm, no limit armed
        _time.sleep(0.1)
        assert seen == [_sig.SIGALRM]
    finally:
        _sig.setitimer(_sig.ITIMER_REAL, 0)
        _sig.signal(_sig.SIGALRM, previous)


def test_other_keys_of_a_batch_commit_and_reply_while_one_key_backs_off(
    start_worker: WorkerFactory,
    sup_settings: Settings,
    sup_client: Client,
    repo: Repo,
    tmp_path: Path,
) -> None:
    """One key of a batch crashes until its dependency comes back (4 s, 0.3 s backoffs): the
    batch's other keys are committed and answered meanwhile, not after it; the crashing key is
    then applied once, in order, without a dead letter."""
    start(start_worker, sup_settings, tmp_path)
    part = partition_for("sick", sup_settings.partitions)
    others = [
        k
        for k in (f"o{i}" for i in range(3000))
        if partition_for(k, sup_settings.partitions) == part
    ][:5]
    sup_client.send("recovering", others[0], "see", "warm")  # the worker is up and the key warm
    poll(lambda: sup_client.read("recovering", others[0]) is not None, what="a warm partition")
    until = time.time() + 4.0
    # one broker message: the sick key first, then the others of its partition (one batch)
    sup_client.send_many(
        "recovering", [("sick", "until", {"until": until})] + [(k, "see", 1) for k in others]
    )
    sent = time.monotonic()
    poll(
        lambda: all(
            (sup_client.read("recovering", k) or {}).get("seen", [])[-1:] == [1] for k in others
        ),
        timeout=20,
        what="the other keys of the batch",
    )
    others_done = time.monotonic() - sent
    assert time.time() < until - 1.0, f"the other keys waited for the sick one ({others_done:.1f}s)"
    assert sup_client.call("recovering", others[1], "see", 2) == 2  # the partition answers
    poll(
        lambda: (sup_client.read("recovering", "sick") or {}).get("seen") == ["recovered"],
        timeout=30,
        what="the sick key after its dependency came back",
    )
    assert time.time() >= until
    assert repo.dead_letters(entity="recovering") == []
    stored = repo.load_one("recovering", others[1])
    assert stored is not None and stored.state["seen"] == [1, 2]
