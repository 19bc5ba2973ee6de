"""Worker CPU per applied message: CPU time of worker processes read with psutil.

A worker burns most of a second of CPU starting up (imports, app, connections), so a reading
taken before it starts would charge that to the messages. The drains read each worker's CPU
at the moment it begins consuming (the first message of its own queues taken: keyq) or once
a tenth of the shared queue is gone (plain Celery: both workers are at work by then), read it
again when the last message is applied, and divide by the messages applied in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and its live children, in seconds."""
    try:
        proc = psutil.Process(pid)
        total = _own(proc)
        for child in proc.children(recursive=True):
            try:
                total += _own(child)
            except psutil.Error:
                continue
        return total
    except psutil.Error:
        return 0.0


def _own(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


@dataclass
class CpuWindow:
    """CPU spent by some processes between two readings, and the messages applied meanwhile."""

    cpu_s: float = 0.0
    messages: int = 0

    def add(self, cpu_s: float, messages: int) -> None:
        self.cpu_s += max(0.0, cpu_s)
        self.messages += messages

    @property
    def us_per_msg(self) -> float | None:
        return self.cpu_s / self.messages * 1e6 if self.messages > 0 else None
