"""The servers and the machine a benchmark runs on: its own PostgreSQL database and Redis
namespace (both removed at the end), and the versions and hardware to print beside the figures."""

from __future__ import annotations

import os
import platform
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy as sa

from keyq.errors import ConfigurationError
from keyq.mailbox import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, KOMBU_UNACKED_MUTEX, drop_unacked
from keyq.repo import Repo, normalize_url
from keyq.settings import ENV_VARIABLES, Settings

BENCH_ENTITY_MODULES = ("keyq.examples",)  # the counter entity is the benchmark's workload
# kombu keys that are not named after a queue; removed when nothing else is left in the database
KOMBU_BOOKKEEPING = frozenset(
    {
        KOMBU_UNACKED,
        KOMBU_UNACKED_INDEX,
        KOMBU_UNACKED_MUTEX,
        "_kombu.binding_deadlines",
        "_kombu.binding.celery.pidbox",
        "_kombu.binding.reply.celery.pidbox",
        "_kombu.binding.celeryev",
    }
)


# what BenchServers.settings sets for every run: not for --setting to change
BENCH_OWNED = frozenset({"broker_url", "redis_url", "database_url", "namespace", "entity_modules"})


def setting_changes(pairs: Sequence[str]) -> dict[str, Any]:
    """scripts/bench's --setting KEYQ_NAME=VALUE pairs as Settings field changes, read as a
    worker reads them (Settings.from_env), so a misspelt variable or a bad value is refused
    before the run starts, naming it."""
    fields = {variable: name for name, variable in ENV_VARIABLES.items()}
    env: dict[str, str] = {}
    for pair in pairs:
        variable, sep, value = pair.partition("=")
        variable = variable.strip()
        if not sep or variable not in fields:
            raise ConfigurationError(
                f"--setting {pair!r}: write KEYQ_NAME=VALUE with one of keyq's variables "
                "(README: Configuration)"
            )
        if fields[variable] in BENCH_OWNED:
            raise ConfigurationError(
                f"--setting {pair!r}: the benchmark sets {variable} itself (its own servers, "
                "namespace and entities); use --redis-url or --pg-admin-url for the servers"
            )
        env[variable] = value
    parsed = Settings.from_env(env)
    return {fields[variable]: getattr(parsed, fields[variable]) for variable in env}


@dataclass
class BenchServers:
    """A PostgreSQL database and a Redis namespace owned by one benchmark run."""

    redis_url: str
    pg_admin_url: str
    namespace: str
    database: str
    created: bool = False

    @classmethod
    def new(cls, redis_url: str, pg_admin_url: str) -> BenchServers:
        tag = uuid.uuid4().hex[:8]
        return cls(redis_url, pg_admin_url, f"bench{tag}", f"keyq_bench_{tag}")

    @property
    def database_url(self) -> str:
        return f"{self.pg_admin_url.rsplit('/', 1)[0]}/{self.database}"

    def settings(self, **changes: Any) -> Settings:
        base = Settings(
            broker_url=self.redis_url,
            redis_url=self.redis_url,
            database_url=self.database_url,
            namespace=self.namespace,
            entity_modules=BENCH_ENTITY_MODULES,
            call_timeout_s=30.0,
        )
        return base.with_(**changes) if changes else base

    def create(self) -> None:
        """Create the PostgreSQL database and bring its schema up to date."""
        with _admin(self.pg_admin_url) as admin:
            admin.execute(sa.text(f'CREATE DATABASE "{self.database}"'))
        self.created = True
        repo = Repo(self.database_url)
        try:
            repo.migrate()
        finally:
            repo.dispose()

    def drop(self) -> None:
        """Drop the database and delete every Redis key of this run's namespace."""
        if self.created:
            with _admin(self.pg_admin_url) as admin:
                admin.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name"
                    ),
                    {"name": self.database},
                )
                admin.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.database}"'))
            self.created = False
        clean_redis(self.redis_url, self.namespace)


@contextmanager
def _admin(url: str) -> Iterator[sa.Connection]:
    """An autocommit connection to the maintenance database (CREATE/DROP DATABASE)."""
    engine = sa.create_engine(normalize_url(url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def clean_redis(redis_url: str, namespace: str) -> int:
    """Delete this run's keys (queues, bindings, leases, cache, results) and its entries in
    kombu's shared unacked table; other data in the database is left alone."""
    client = redis.Redis.from_url(redis_url)
    deleted = 0
    try:
        batch = list(client.scan_iter(match=f"*{namespace}*", count=1000))
        for start in range(0, len(batch), 500):
            deleted += int(client.delete(*batch[start : start + 500]))
        drop_unacked(client, namespace)
        left = {k.decode() if isinstance(k, bytes) else str(k) for k in client.scan_iter()}
        if left and left <= KOMBU_BOOKKEEPING:  # only what our workers' kombu left behind
            deleted += int(client.delete(*left))
    finally:
        client.close()
    return deleted


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import psutil

    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
    }


def versions(redis_url: str, pg_admin_url: str) -> dict[str, str]:
    import celery
    import kombu
    import sqlalchemy

    out = {
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis_py": redis.__version__,
        "sqlalchemy": sqlalchemy.__version__,
    }
    client = redis.Redis.from_url(redis_url)
    try:
        out["redis_server"] = str(client.info("server").get("redis_version", "unknown"))
    finally:
        client.close()
    with _admin(pg_admin_url) as admin:
        out["postgres_server"] = str(admin.execute(sa.text("SHOW server_version")).scalar())
    return out
