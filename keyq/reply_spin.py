# mypy: disable-error-code="no-untyped-call"
# (redis-py's Connection methods are untyped; this module only wraps two of them)
"""Spin, then block: how keyq's own Redis connections wait for a reply that comes at once.

On a virtual machine (these 2-core ones, and most cloud hosts) a thread that blocks on its
socket lets its vCPU halt, and the reply then has to wake it across vCPUs, which the hypervisor
makes slow. Measured here with a raw-socket PING on an idle machine: 74-82 us a round trip when
the client blocks, 25-29 us when it polls its socket, for the same 29 us of CPU either way (the
halt and the wake-up cost the blocked side as much CPU as the polling does). A producer's send
is one such round trip: with the spin, one thread's ``Client.send`` went from 2.8-3.3 x Celery's
``apply_async`` to 4.1-5.0 x, for 10-35 % more CPU per send.

Workers do not spin (keyq.worker builds its clients without): their CPU is what drains the
queues, and their replies (scripts that move whole batches) take longer. Measured in
alternating runs, spinning workers drained 6 % slower (13,481 against 14,295 msg/s, medians of
three) and used 12 % more CPU per message at 1,000 msg/s, for about 0.5 ms off dispatch p95.

So a ``SpinningConnection`` first looks at its socket for the reply for up to
KEYQ_REPLY_SPIN_US (``Timeouts.redis_reply_spin_s``), giving the CPU away between looks
(``sched_yield``: on a busy core the Redis server, or any other process, runs first), and only
then blocks as any redis-py connection does. The spin is bounded, and it is learned
(keyq.learned): while most spins run out before their reply comes (a saturated machine, where
the polling only takes CPU from the server it waits for), the connection blocks at once and
spins only one reply in eight, to notice when replies are prompt again. Commands that wait on
the server by design (BLPOP, BRPOP, WAIT, ...) block at once: only the first reply after a
write is spun for, and never one that is already buffered. 0 turns it off.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import redis

from keyq.learned import LearnedGuess

# commands whose reply waits on the server (for data, replicas or time): never spun for
BLOCKING_COMMANDS = frozenset(
    {
        "BLPOP", "BRPOP", "BLMOVE", "BRPOPLPUSH", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
        "WAIT", "WAITAOF", "XREAD", "XREADGROUP", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE",
        "MONITOR",
    }
)
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def command_name(args: tuple[Any, ...]) -> str:
    """The command a send_command call sends, upper case ('' when there is none)."""
    if not args:
        return ""
    first = args[0]
    name = first.decode("ascii", "replace") if isinstance(first, bytes) else str(first)
    return name.split(" ", 1)[0].upper()


class SpinningConnection(redis.Connection):
    """redis-py's TCP connection, waiting for a prompt reply by polling before it blocks."""

    def __init__(self, *args: Any, reply_spin_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reply_spin_s = reply_spin_s
        self._spin_next = False  # the next read is the first reply after a write
        self._sent_at = 0.0  # when that write began: the budget counts from it
        self._pays = LearnedGuess()  # do spins find their reply within the budget?
        self.spins = 0  # spins made ...
        self.spun = 0  # ... and those that found their reply (the tests count both)

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self._sent_at = time.perf_counter()  # before: a process away after its write is late
        super().send_packed_command(command, check_health)
        self._spin_next = self.reply_spin_s > 0

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        super().send_command(*args, **kwargs)  # (it writes through send_packed_command)
        if self._spin_next and command_name(args) in BLOCKING_COMMANDS:
            self._spin_next = False

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if self._spin_next:
            self._spin_next = False
            self._spin()
        return super().read_response(*args, **kwargs)

    def _spin(self) -> None:
        """Poll the socket until a byte of the reply is there or the budget is spent; the
        read that follows takes it (or blocks, or raises, as redis-py does)."""
        reader = getattr(self._parser, "_reader", None)  # hiredis's: has_data() is buffered
        if self._sock is None or reader is None or reader.has_data() or not self._pays.ask():
            return
        self.spins += 1
        deadline = self._sent_at + self.reply_spin_s
        found = spin_until_readable(self._sock, deadline, self.socket_timeout)
        self._pays.learn(found)
        self.spun += found


def spin_until_readable(sock: socket.socket, deadline: float, timeout: float | None) -> bool:
    """Poll a socket until it has data (or EOF) to read or time.perf_counter() passes
    deadline, yielding the CPU between looks; True when a look that began by the deadline
    found data. A look that began late (the process was away, as on a saturated machine,
    where sched_yield hands over a whole time slice) says nothing about whether spinning
    pays, so it counts as run out. The socket's timeout is set back to `timeout`."""
    sock.settimeout(0.0)
    try:
        while True:
            looked_at = time.perf_counter()
            try:
                sock.recv(1, _PEEK)  # data or EOF: either way the read goes on now
                return looked_at <= deadline
            except (BlockingIOError, InterruptedError):
                pass
            if looked_at >= deadline:
                return False
            os.sched_yield()
    except OSError:
        return False  # a broken connection: the read raises the client's own error
    finally:
        sock.settimeout(timeout)
