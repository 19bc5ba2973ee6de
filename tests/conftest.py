"""Fixtures on real servers: Redis (a dedicated DB, flushed) and PostgreSQL (a database
created for the run), SQLite files, and a factory of real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import pytest
import redis

from keyq.client import Client
from keyq.repo import Repo, metadata
from keyq.settings import DEFAULT_LEASE_TTL_MS, Settings

ROOT = Path(__file__).resolve().parents[1]
REDIS_BASE = os.environ.get("KEYQ_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("KEYQ_TEST_REDIS_DB", "13"))
PG_ADMIN_URL = os.environ.get("KEYQ_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TEST_PARTITIONS = 8
# entity modules of the supervisor, passivation, timer and dead-letter tests
SUPERVISED_ENTITY_MODULES = ("keyq.examples", "tests.entities", "tests.supervised_entities")


def poll(
    predicate: Callable[[], object],
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
) -> object:
    """Wait until predicate() is truthy; fail the test naming what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return f"{REDIS_BASE}/{REDIS_DB}"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A PostgreSQL database created for this test run, dropped at its end."""
    name = f"keyq_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    url = f"{base}/{name}"
    repo = Repo(url)
    repo.migrate()
    repo.dispose()
    yield url
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test that takes this runs on PostgreSQL and on SQLite, on empty tables."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'keyq.sqlite3'}"
        repo = Repo(url)
        repo.migrate()
        repo.dispose()
        yield url
        return
    url = request.getfixturevalue("pg_database_url")
    from keyq.repo import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    engine.dispose()
    yield url


@pytest.fixture
def settings(redis_url: str, database_url: str, redis_client: redis.Redis) -> Settings:
    return Settings(
        broker_url=redis_url,
        redis_url=redis_url,
        database_url=database_url,
        namespace=f"t{uuid.uuid4().hex[:8]}",
        partitions=TEST_PARTITIONS,
        entity_modules=("keyq.examples", "tests.entities"),
        lease_ttl_ms=DEFAULT_LEASE_TTL_MS,
        call_timeout_s=15.0,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess exactly these settings."""
    env = dict(os.environ)
    env.update(settings.to_env())
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


@dataclass
class WorkerProcess:
    """A real `keyq worker` subprocess."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    partitions: str | None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def node_id(self, client: redis.Redis, settings: Settings, timeout: float = 20.0) -> str:
        """The node id this process registered under (found by its pid in member info)."""
        import json as _json

        def find() -> str | None:
            for raw in client.zrange(settings.redis_key("members"), 0, -1):
                node = raw.decode()
                info = client.get(settings.redis_key("member", node))
                if info and _json.loads(info).get("pid") == self.pid:
                    return node
            return None

        return str(poll(find, timeout, what=f"worker pid {self.pid} to join"))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


WorkerFactory = Callable[..., WorkerProcess]


def _wants_none(client: redis.Redis, settings: Settings, pid: int) -> bool:
    """Whether the live member with this pid is assigned no partition by rendezvous."""
    import json as _json

    from keyq.cluster import Membership, assignment

    live = Membership(client, settings).live()
    for node in live:
        info = client.get(settings.redis_key("member", node))
        if info and _json.loads(info).get("pid") == pid:
            return not assignment(settings.partitions, live).get(node)
    return False



@pytest.fixture
def start_worker(
    settings: Settings, tmp_path: Path, redis_client: redis.Redis
) -> Iterator[WorkerFactory]:
    """Factory: start_worker(partitions="0-3", wait=True, env={...}) -> WorkerProcess.

    With wait=True it returns once the worker holds a lease (or, for a static set, all of
    them). Every worker is stopped at teardown.
    """
    started: list[WorkerProcess] = []

    def start(
        partitions: str | None = None,
        wait: bool = True,
        env: dict[str, str] | None = None,
        settings_override: Settings | None = None,
        hostname: str | None = None,
    ) -> WorkerProcess:
        s = settings_override or settings
        log_path = tmp_path / f"worker-{len(started)}.log"
        args = [sys.executable, "-m", "keyq", "worker", "--loglevel", "info"]
        if partitions:
            args += ["--partitions", partitions]
        if hostname:
            args += ["--hostname", hostname]
        full_env = settings_env(s)
        full_env.update(env or {})
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                args, env=full_env, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(ROOT)
            )
        w = WorkerProcess(proc, log_path, partitions, env or {})
        started.append(w)
        if wait:

            def holds_lease() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"worker exited early:\n{w.log()[-3000:]}")
                text = w.log()
                if " ready." not in text:
                    return False
                if "keyq ownership" in text and "acquired=[" in text:
                    return True
                # rendezvous may give a newcomer no partition at all (two nodes, 8 partitions:
                # about 1 start in 128): then it is ready once it is a member that wants none
                return partitions is None and _wants_none(redis_client, s, proc.pid)

            poll(holds_lease, 30.0, what="worker to take its partitions")
        return w

    yield start
    for w in started:
        w.kill()


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    c = Client(settings)
    yield c
    c.close()


@pytest.fixture
def repo(settings: Settings) -> Iterator[Repo]:
    r = Repo(settings.database_url)
    yield r
    r.dispose()


@pytest.fixture
def sup_settings(settings: Settings) -> Settings:
    """Settings whose workers also load tests.supervised_entities."""
    return settings.with_(entity_modules=SUPERVISED_ENTITY_MODULES)


@pytest.fixture
def sup_client(sup_settings: Settings) -> Iterator[Client]:
    c = Client(sup_settings)
    yield c
    c.close()
