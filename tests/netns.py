"""Network namespaces for tests: small "hosts" with their own links, made and removed by the
test itself (root and iproute2's `ip` needed). Every address lives inside the namespaces made
here; the machine's own namespace gets nothing but the namespace names in /run/netns."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence


def require_root_and_ip() -> None:
    """Fail (not skip) with a clear message where namespaces cannot be made."""
    if os.geteuid() != 0:
        raise AssertionError("network namespace tests need root (ip netns add)")
    if shutil.which("ip") is None:
        raise AssertionError("network namespace tests need iproute2's `ip` on PATH")


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Netns:
    """One network namespace with a unique name (kq<random>), loopback up."""

    def __init__(self, label: str) -> None:
        self.name = f"kq{uuid.uuid4().hex[:8]}{label}"[:15]
        ip("netns", "add", self.name)
        ip("-n", self.name, "link", "set", "lo", "up")

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv run inside this namespace (ip netns exec execs it: the pid is the program's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def link(self, ifname: str, up: bool) -> None:
        ip("-n", self.name, "link", "set", ifname, "up" if up else "down")

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, timeout=20)


def veth(a: Netns, a_if: str, a_addr: str, b: Netns, b_if: str, b_addr: str) -> None:
    """A cable between two namespaces: a_if (a_addr, CIDR) in a, b_if (b_addr) in b."""
    ip("-n", a.name, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    ip("-n", a.name, "addr", "add", a_addr, "dev", a_if)
    ip("-n", b.name, "addr", "add", b_addr, "dev", b_if)
    a.link(a_if, True)
    b.link(b_if, True)


def leftover_namespaces() -> list[str]:
    """Namespaces made by these helpers that still exist (kq... names)."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20)
    return [line.split()[0] for line in done.stdout.splitlines() if line.startswith("kq")]
