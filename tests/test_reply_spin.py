"""keyq's Redis connections poll for a prompt reply before they block (keyq.reply_spin), and
answer exactly as redis-py's own connection does, blocking commands and failures included."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from keyq.connections import Timeouts, redis_client
from keyq.reply_spin import SpinningConnection, command_name, spin_until_readable
from keyq.settings import Settings

pytestmark = pytest.mark.integration


def _spinning(redis_url: str, spin_s: float = 0.005) -> redis.Redis:
    return redis_client(redis_url, Timeouts(redis_reply_spin_s=spin_s))


def _connection(client: redis.Redis) -> SpinningConnection:
    conn = client.connection_pool.get_connection()
    client.connection_pool.release(conn)
    assert isinstance(conn, SpinningConnection)
    return conn


def test_keyqs_clients_spin_unless_it_is_turned_off(redis_url: str) -> None:
    on = redis_client(redis_url, Settings.from_env({}).timeouts)
    off = redis_client(redis_url, Settings.from_env({"KEYQ_REPLY_SPIN_US": "0"}).timeouts)
    try:
        assert on.connection_pool.connection_class is SpinningConnection
        assert _connection(on).reply_spin_s == pytest.approx(200e-6)
        assert off.connection_pool.connection_class is redis.Connection
    finally:
        on.close()
        off.close()


def test_a_prompt_reply_is_found_by_spinning_and_reads_as_redis_pys(
    redis_url: str, redis_client: redis.Redis
) -> None:
    client = _spinning(redis_url)
    try:
        conn = _connection(client)
        for i in range(20):
            assert client.set(f"spin:{i}", i) is True
            assert client.get(f"spin:{i}") == str(i).encode()
        assert conn.spun >= 30  # the replies of a Redis on this host come within 5 ms
        pipe = client.pipeline(transaction=False)
        for _ in range(20):
            pipe.incr("spin:n")
        before = conn.spun
        assert pipe.execute() == list(range(1, 21))  # one write, twenty replies
        assert conn.spun - before <= 1  # only the first one spun for: the rest were buffered
        assert redis_client.get("spin:n") == b"20"
    finally:
        client.close()


def test_blocking_commands_block_at_once(redis_url: str, redis_client: redis.Redis) -> None:
    """BLPOP waits on the server: it is never spun for, and answers as before."""
    client = _spinning(redis_url, spin_s=0.5)  # a spin this long would show in the timings
    try:
        conn = _connection(client)
        before = conn.spun
        started = time.perf_counter()
        assert client.blpop(["spin:empty"], timeout=0.1) is None
        assert conn.spun == before
        later = threading.Timer(0.05, lambda: redis_client.rpush("spin:later", b"x"))
        later.start()
        assert client.blpop(["spin:later"], timeout=2) == (b"spin:later", b"x")
        later.join(2)  # its RPUSH has read its reply before the fixture's client closes
        assert conn.spun == before
        assert time.perf_counter() - started < 1.0
        assert command_name((b"blpop", "k", 1)) == "BLPOP" and command_name(()) == ""
    finally:
        client.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(2)
    for s in accepted:
        s.close()
    server.close()


def test_a_reply_that_never_comes_still_times_out(silent_server: int) -> None:
    """The spin gives up after its budget; the read then blocks and times out as redis-py's
    does, with redis-py's own error."""
    client = redis_client(
        f"redis://127.0.0.1:{silent_server}/0",
        Timeouts(redis_read_s=0.3, redis_reply_spin_s=0.01),
    )
    try:
        started = time.perf_counter()
        with pytest.raises(redis.TimeoutError):
            client.execute_command("PING")
        assert 0.25 < time.perf_counter() - started < 3.0
    finally:
        client.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_workers_own_clients_block_at_once(settings: Settings) -> None:
    """Workers do not spin (their CPU drains the queues); the producers in the same
    deployment do."""
    from keyq.worker import WorkerRuntime

    runtime = WorkerRuntime(settings, "spin-test-node")
    try:
        assert runtime.redis.connection_pool.connection_class is redis.Connection
        assert runtime.broker.connection_pool.connection_class is redis.Connection
        producer = redis_client(settings.redis_url, settings.timeouts)
        assert producer.connection_pool.connection_class is SpinningConnection
        producer.close()
    finally:
        runtime.close()


SLOW_SCRIPT = """
local start = redis.call('TIME')
local t = start
while (t[1] - start[1]) * 1000000 + (t[2] - start[2]) < tonumber(ARGV[1]) do
  t = redis.call('TIME')
end
return 1
"""


def test_a_connection_whose_spins_run_out_stops_spinning_and_learns_again(
    redis_url: str,
) -> None:
    """Replies slower than the budget (a saturated machine): after a few spins that ran out,
    only one reply in eight is spun for; prompt replies bring the spinning back."""
    client = _spinning(redis_url, spin_s=0.005)  # long enough for a PING on a loaded host
    try:
        conn = _connection(client)
        slow = client.register_script(SLOW_SCRIPT)
        slow(args=[30000])  # loaded (and spun for) once
        before = conn.spins
        for _ in range(40):
            assert slow(args=[30000]) == 1  # each reply takes 30 ms, the spin gives up at 5
        spins = conn.spins - before
        assert 3 <= spins <= 12, spins  # a few to learn, then one in eight (40 would be all)
        found = conn.spun
        for _ in range(120):
            client.ping()
        assert conn.spun - found >= 60  # prompt again: spinning resumed and found the replies
    finally:
        client.close()


def test_a_reply_found_by_a_look_made_after_the_deadline_counts_as_run_out() -> None:
    """A process that was away (a saturated host, where sched_yield hands over a whole time
    slice) finds its reply on return: that says nothing for spinning, and must not teach the
    connection to go on spinning (CI's busy host did, 16 spins in 40 where 12 were the most)."""
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(b"+PONG\r\n")
        assert spin_until_readable(ours, time.perf_counter() - 0.001, None) is False
        assert spin_until_readable(ours, time.perf_counter() + 0.001, 2.0) is True
        assert ours.gettimeout() == 2.0
        assert ours.recv(16) == b"+PONG\r\n"  # looked at, never taken
    finally:
        ours.close()
        theirs.close()
