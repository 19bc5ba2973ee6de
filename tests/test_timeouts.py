"""Connection limits: a `call` waits as long as it was asked to (also past redis-py's 5 s socket
read timeout), while a Redis that is really down, stopped or gone is reported quickly."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyq.client import Client
from keyq.connections import Timeouts, blocking_pop, engine_options, redis_client
from keyq.embedded import EmbeddedRedis, free_port
from keyq.errors import BrokerUnavailableError, CacheUnavailableError, CallTimeoutError
from keyq.settings import Settings
from tests.conftest import WorkerFactory

pytestmark = pytest.mark.integration


def test_call_waits_its_whole_timeout_past_the_socket_read_timeout(
    start_worker: WorkerFactory, settings: Settings, tmp_path: Path
) -> None:
    """Given a worker that holds the reply back 12 s, a call with timeout=8 waits 8 s (redis-py
    alone gives up at 5 s) and then raises CallTimeoutError; the message is applied later."""
    start_worker()
    with Client(settings.with_(redis_read_timeout_s=5.0)) as client:
        mark = tmp_path / "held"
        payload = {"mark": str(mark), "seconds": 12}
        started = time.monotonic()
        with pytest.raises(CallTimeoutError, match="within 8s"):
            client.call("slow", "held-reply", "see", payload, timeout=8)
        waited = time.monotonic() - started
        assert mark.exists(), "the handler never started: the test would prove nothing"
        assert 8.0 <= waited < 10.0, waited


def test_blocking_pop_returns_what_arrives_after_several_slices(redis_url: str) -> None:
    """A reply pushed after several server-side slices is still received."""
    timeouts = Timeouts(redis_read_s=0.5)  # slices of 0.35 s
    client = redis_client(redis_url, timeouts)
    key = f"keyq-test-slices-{os.getpid()}"
    client.delete(key)
    timer = threading.Timer(1.2, lambda: redis_client(redis_url).rpush(key, b"late"))
    timer.start()
    try:
        assert blocking_pop(client, key, 5.0, timeouts) == b"late"
        assert blocking_pop(client, key, 0.3, timeouts) is None
    finally:
        timer.cancel()
        client.delete(key)
        client.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server
    if server.proc is not None:
        server.proc.send_signal(signal.SIGCONT)
    server.stop()


def _quick_settings(settings: Settings, url: str) -> Settings:
    return settings.with_(
        broker_url=url, redis_url=url, redis_connect_timeout_s=0.5, redis_read_timeout_s=1.0
    )


def test_redis_down_fails_fast_with_typed_errors(settings: Settings) -> None:
    """Nothing listens: send raises BrokerUnavailableError, call and read name Redis, fast."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with Client(_quick_settings(settings, dead)) as client:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            client.send("counter", "k", "add", {"by": 1})
        with pytest.raises(BrokerUnavailableError):
            client.call("counter", "k", "add", {"by": 1}, timeout=30)
        with pytest.raises(CacheUnavailableError, match=r"127\.0\.0\.1"):
            client.read("counter", "k")
        assert time.monotonic() - started < 15.0


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_redis_lost_while_a_call_waits_raises_cache_unavailable_before_the_timeout(
    settings: Settings, private_redis: EmbeddedRedis, fault: str
) -> None:
    """A call waiting 30 s for its reply learns within seconds that Redis died (connection
    refused) or hung (SIGSTOP: only the socket read timeout can tell)."""
    assert private_redis.proc is not None
    proc = private_redis.proc
    with Client(_quick_settings(settings, private_redis.url)) as client:

        def fail_redis() -> None:
            if fault == "killed":
                proc.kill()
            else:
                proc.send_signal(signal.SIGSTOP)

        timer = threading.Timer(1.0, fail_redis)
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(CacheUnavailableError, match="reply"):
                client.call("counter", "lost", "add", {"by": 1}, timeout=30)
        finally:
            timer.cancel()
        assert time.monotonic() - started < 10.0


def test_database_engines_carry_connect_and_statement_limits() -> None:
    """The limits reach the driver: a pure check of the options keyq hands to SQLAlchemy."""
    timeouts = Timeouts(database_connect_s=3.0, database_statement_s=12.5)
    pg = engine_options("postgresql+psycopg2://u@h/db", timeouts)["connect_args"]
    assert pg["connect_timeout"] == 3
    assert pg["options"] == (
        "-c statement_timeout=12500 -c idle_in_transaction_session_timeout=12500"
    )
    assert pg["keepalives"] == 1 and pg["tcp_user_timeout"] > 0
    assert "options" not in engine_options("postgresql://u@h/db", Timeouts(database_statement_s=0))[
        "connect_args"
    ]
    assert engine_options("sqlite:///x.db", timeouts)["connect_args"] == {"timeout": 12.5}


def test_postgres_statement_timeout_is_applied(pg_database_url: str) -> None:
    """A statement longer than the limit is cancelled by the server, not waited out."""
    import sqlalchemy as sa

    from keyq.repo import make_engine

    engine = make_engine(pg_database_url, timeouts=Timeouts(database_statement_s=0.5))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "500ms"
            # a client hung inside a transaction must not hold its locks for longer
            idle = conn.execute(sa.text("SHOW idle_in_transaction_session_timeout")).scalar()
            assert idle == "500ms"
            with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
                conn.execute(sa.text("SELECT pg_sleep(3)"))
    finally:
        engine.dispose()
