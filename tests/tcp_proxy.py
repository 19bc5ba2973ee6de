"""A small threaded TCP proxy that a test controls: it relays bytes both ways until told to
stop, and it never closes a socket on its own, so the process behind it sees a connection that
simply hangs (a stopped server, a switch that drops everything, a peer that went silent).

- ``freeze()``: nothing is relayed any more, in either direction. What arrives stays in the
  kernel's buffers (the sender's writes succeed until they fill; TCP acknowledges them, so
  keepalives and ``tcp_user_timeout`` see a live peer). New connections are accepted and held
  without reaching the server. ``thaw()`` relays everything that waited, in order, nothing lost.
- ``hang()``: the connections open now stop relaying, for good (until ``thaw()``), like
  ``freeze()``; new connections work. A hung connection, not a hung server: a process that
  gives up on a connection after a timeout and opens a new one gets going again.
- ``cut()``: a black hole. Bytes are read and thrown away, nothing is closed; new connections
  are accepted and swallowed too. On ``thaw()`` every connection that lost bytes is reset (its
  stream is broken beyond repair, as after a real peer gave up); new ones work again.

The listening socket may live in another network namespace (``listen_netns``): it is created
by a short-lived thread that enters the namespace, so the proxy's own thread and its upstream
connections stay where the test process is.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

OPEN, FROZEN, CUT = "open", "frozen", "cut"
_POLL_S = 0.1  # how often an idle relay thread looks at the proxy's state


@dataclass
class _Link:
    """One accepted client connection and its upstream half (None until connected)."""

    client: socket.socket
    upstream: socket.socket | None = None
    tainted: bool = False  # bytes were thrown away: reset it on thaw
    hung: bool = False  # relays nothing until thawed (hang())
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self, reset: bool = False) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if reset:  # RST instead of FIN: the peer learns at once that the stream is gone
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """Relays listen_host:listen_port -> target_host:target_port; see the module docstring."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        listen_netns: str | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self._listen = (listen_host, listen_port)
        self._netns = listen_netns
        self._state = OPEN
        self._cond = threading.Condition()
        self._links: list[_Link] = []
        self._stopping = False
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.accepted = 0
        self.bytes_up = 0  # client -> server, relayed
        self.bytes_down = 0  # server -> client, relayed
        self.bytes_dropped = 0

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._listener = self._make_listener()
        self._listener.settimeout(_POLL_S)
        self._spawn(self._accept_loop, "proxy-accept")
        return self

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def host(self) -> str:
        assert self._listener is not None, "start() first"
        return str(self._listener.getsockname()[0])

    @property
    def port(self) -> int:
        assert self._listener is not None, "start() first"
        return int(self._listener.getsockname()[1])

    def url(self, scheme: str, path: str = "", user: str = "") -> str:
        """E.g. url("redis", "/3") or url("postgresql", "/db", "postgres")."""
        at = f"{user}@" if user else ""
        return f"{scheme}://{at}{self.host}:{self.port}{path}"

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            links = list(self._links)
        for link in links:
            link.close()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        for t in self._threads:
            t.join(timeout=2)

    # --- faults --------------------------------------------------------------------------

    def freeze(self) -> None:
        self._set(FROZEN)

    def cut(self) -> None:
        self._set(CUT)

    def hang(self) -> int:
        """Hang the connections open now (new ones work); returns how many were hung."""
        with self._cond:
            live = [link for link in self._links if not link.closed]
            for link in live:
                link.hung = True
            self._cond.notify_all()
        return len(live)

    def thaw(self) -> None:
        with self._cond:
            self._state = OPEN
            for link in self._links:
                link.hung = False
            broken = [link for link in self._links if link.tainted]
            self._cond.notify_all()
        for link in broken:
            link.close(reset=True)

    @property
    def state(self) -> str:
        return self._state

    def connections(self) -> int:
        """Connections open now (accepted and not yet closed by either side)."""
        with self._cond:
            self._links = [link for link in self._links if not link.closed]
            return len(self._links)

    def _set(self, state: str) -> None:
        with self._cond:
            self._state = state
            self._cond.notify_all()

    # --- relaying ------------------------------------------------------------------------

    def _make_listener(self) -> socket.socket:
        if self._netns is None:
            return _listen(self._listen)
        made: dict[str, object] = {}

        def inside() -> None:  # setns changes this thread only; it ends right after
            try:
                enter_netns(self._netns or "")
                made["sock"] = _listen(self._listen)
            except BaseException as e:  # handed to the caller below
                made["error"] = e

        t = threading.Thread(target=inside, name="proxy-netns")
        t.start()
        t.join()
        if "error" in made:
            raise made["error"]  # type: ignore[misc]
        sock = made["sock"]
        assert isinstance(sock, socket.socket)
        return sock

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            link = _Link(client)
            with self._cond:
                self._links.append(link)
            self._spawn(self._serve, "proxy-link", link)

    def _wait_open(self, link: _Link) -> bool:
        """Block while frozen; False once the proxy or the link is closing."""
        with self._cond:
            while (self._state == FROZEN or link.hung) and not self._stopping and not link.closed:
                self._cond.wait(_POLL_S)
            return not self._stopping and not link.closed

    def _serve(self, link: _Link) -> None:
        # a connection made while frozen waits here, before the server hears of it
        while True:
            if not self._wait_open(link):
                link.close()
                return
            if self._state == OPEN:
                break
            self._swallow(link)  # cut: read and drop until thawed
        try:
            link.upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            link.close(reset=True)
            return
        link.client.settimeout(_POLL_S)
        link.upstream.settimeout(_POLL_S)
        self._spawn(self._pump, "proxy-up", link, link.client, link.upstream, True)
        self._pump(link, link.upstream, link.client, False)

    def _swallow(self, link: _Link) -> None:
        link.client.settimeout(_POLL_S)
        while self._state == CUT and not self._stopping and not link.closed:
            try:
                data = link.client.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                link.close()
                return
            if not data:
                link.close()
                return
            link.tainted = True
            self.bytes_dropped += len(data)
        if link.tainted:  # thawed: the client's stream lost bytes, so it ends here
            link.close(reset=True)

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, up: bool) -> None:
        while True:
            if not self._wait_open(link):  # frozen: do not even read (bytes stay queued)
                link.close()
                return
            try:
                data = src.recv(65536)
            except TimeoutError:
                if link.tainted and self._state == OPEN:
                    link.close(reset=True)
                    return
                continue
            except OSError:
                link.close()
                return
            if not data:
                link.close()
                return
            # read just before a freeze: hold the bytes until thawed; a cut drops them
            if not self._wait_open(link):
                link.close()
                return
            if self._state == CUT or link.tainted:
                link.tainted = True
                self.bytes_dropped += len(data)
                continue
            try:
                dst.sendall(data)
            except OSError:
                link.close()
                return
            if up:
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)


def _listen(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    return sock


CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move the calling THREAD into the named network namespace (/run/netns/NAME); sockets it
    creates from now on belong there. Python 3.11 has no os.setns: libc's is called."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)
