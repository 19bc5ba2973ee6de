"""The worker processes of a chaos run, supervised the way systemd or Kubernetes would: a
worker that exits is started again after a short backoff. Exits the schedule caused (kill -9)
are planned; any other exit is recorded as an unplanned death, with the end of its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from keyq.bench.procs import ROOT, Proc, wait_for
from keyq.cluster import Leases
from keyq.settings import Settings

RESTART_BACKOFF_S = 1.0  # an exited worker is started again after this long
READY_TIMEOUT_S = 90.0  # the first workers must hold every partition lease within this
LOG_TAIL_CHARS = 2000  # of an unplanned death's log, kept in the report


def worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings.to_env())
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


@dataclass
class Workers:
    """``count`` slots, each running one `keyq worker` process (dynamic partition sets)."""

    settings: Settings
    count: int
    logdir: Path
    slots: list[Proc | None] = field(default_factory=list)
    planned: set[int] = field(default_factory=set)  # pids the schedule killed
    exited_at: dict[int, float] = field(default_factory=dict)  # slot -> when its worker exited
    deaths: list[dict[str, Any]] = field(default_factory=list)  # unplanned exits
    started: int = 0

    def start(self) -> None:
        self.slots = [None] * self.count
        for i in range(self.count):
            self._spawn(i)

    def _spawn(self, slot: int) -> None:
        self.started += 1
        log_path = self.logdir / f"worker-{slot}-{self.started}.log"
        args = [sys.executable, "-m", "keyq", "worker", "--loglevel", "warning", "--no-migrate"]
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                args,
                env=worker_env(self.settings),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=str(ROOT),
                start_new_session=True,  # a Ctrl-C reaches the chaos tool only; it stops us
            )
        self.slots[slot] = Proc(proc, log_path, "keyq")
        self.exited_at.pop(slot, None)

    def wait_ready(self, client: redis.Redis) -> None:
        leases = Leases(client, self.settings)

        def ready() -> bool:
            for proc in self.slots:
                if proc is not None and not proc.alive():
                    raise RuntimeError(f"a worker exited while starting:\n{proc.log_tail()}")
            return len(leases.holders()) == self.settings.partitions

        wait_for(ready, READY_TIMEOUT_S, "every partition lease to be held")

    def check(self, elapsed_s: float) -> None:
        """Record exits and start replacements; call this often."""
        now = time.monotonic()
        for slot, proc in enumerate(self.slots):
            if proc is None or proc.alive():
                continue
            if slot not in self.exited_at:
                self.exited_at[slot] = now
                if proc.pid not in self.planned:
                    self.deaths.append(
                        {
                            "at_s": round(elapsed_s, 3),
                            "slot": slot,
                            "pid": proc.pid,
                            "returncode": proc.proc.returncode,
                            "log_tail": proc.log_tail(LOG_TAIL_CHARS),
                        }
                    )
            if now - self.exited_at[slot] >= RESTART_BACKOFF_S or proc.pid in self.planned:
                self._spawn(slot)

    def kill9(self, slot: int) -> int:
        """kill -9 the slot's worker (a replacement starts at once); returns its pid."""
        proc = self.slots[slot]
        if proc is None:
            return 0
        self.planned.add(proc.pid)
        if proc.alive():
            os.kill(proc.pid, signal.SIGCONT)  # a stopped process dies as well either way
            proc.kill9()
        self._spawn(slot)
        return proc.pid

    def signal(self, slot: int, sig: int) -> int:
        proc = self.slots[slot]
        if proc is None or not proc.alive():
            return 0
        os.kill(proc.pid, sig)
        return proc.pid

    def stop(self) -> None:
        """kill -9 every worker: the run is over and its state already read."""
        for proc in self.slots:
            if proc is not None and proc.alive():
                self.planned.add(proc.pid)
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill9()
