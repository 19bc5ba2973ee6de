"""Private servers of a chaos run, on free loopback ports, to kill and restart at will.

Redis keeps an append-only file fsynced on every write (``--appendfsync always``), so a kill -9
loses nothing the broker acknowledged and a restart on the same port brings it all back.
PostgreSQL is a fresh cluster (initdb); run as the ``postgres`` OS user when we are root, since
it refuses to run as root. Both run in sessions of their own, so a Ctrl-C at the terminal
reaches only the chaos tool, which then stops them itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from keyq.embedded import EmbeddedRedis, free_port, redis_server_binary

START_TIMEOUT_S = 60.0  # how long a server may take to answer after a (re)start
PG_OS_USER = "postgres"  # PostgreSQL refuses root: the OS user it runs as when we are root


class PrivateRedis(EmbeddedRedis):
    """keyq's embedded Redis, but durable: AOF fsynced on every write, restartable in place."""

    def start(self) -> PrivateRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "yes", "--appendfsync", "always"),
            *("--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")),
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        client = redis.Redis.from_url(self.url, socket_timeout=2)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                try:
                    client.ping()  # raises while the AOF is loading
                    return self
                except (redis.RedisError, OSError):
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server on port {self.port} did not start; see "
                            f"{self.workdir / 'redis.log'}"
                        ) from None
                time.sleep(0.05)
        finally:
            client.close()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


class PrivatePostgres:
    """A fresh PostgreSQL cluster under workdir on 127.0.0.1:<free port>, trust auth."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.data = workdir / "data"
        self.sockets = workdir / "sockets"
        self.user = PG_OS_USER if os.geteuid() == 0 else None
        self.started = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        binary = shutil.which(args[0])
        if binary is None:
            raise RuntimeError(f"{args[0]} is not on PATH: install PostgreSQL's server binaries")
        done = subprocess.run(
            [binary, *args[1:]],
            user=self.user,
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            timeout=START_TIMEOUT_S + 30,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:1])} failed: {done.stdout.decode()[-2000:]}")

    def init(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if self.user is not None:
            for path in (self.workdir, self.sockets):
                shutil.chown(path, self.user, self.user)
            os.chmod(self.workdir.parent, 0o755)  # let the postgres user reach its directory
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.workdir / "postgres.log"),
            "-w",
            "-t",
            str(int(START_TIMEOUT_S)),
            "-o",
            options,
            "start",
        )
        self.started = True

    def stop_immediate(self) -> None:
        """Stop without a checkpoint, as a crash would: the next start replays the WAL."""
        if self.started:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.started = False

    def stop(self) -> None:
        try:
            self.stop_immediate()
        except (RuntimeError, subprocess.TimeoutExpired):
            pid_file = self.data / "postmaster.pid"
            if pid_file.exists():  # pg_ctl failed: kill the postmaster by its recorded pid
                with contextlib.suppress(ValueError, OSError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
