"""Network namespaces for tests: created by the test, removed when it ends.

    with netns("pfp-enclave") as ns:
        ns.run("ip", "addr", "add", "10.0.0.1/24", "dev", "lo")
        proc = ns.popen(["vsock-to-ip", ...], stdout=subprocess.PIPE)

Every process started with `popen` is killed (by its pid) when the block ends, then the
namespace is deleted. Names get a random suffix so parallel or leftover runs never collide.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen[Any]] = []

    def command(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace; raise with its output if it fails."""
        result = subprocess.run(self.command(args), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"in netns {self.name}: {' '.join(args)} exited {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside the namespace; it is killed when the namespace goes."""
        proc = subprocess.Popen(self.command(args), **kwargs)
        self.processes.append(proc)
        return proc

    def stop_processes(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()


@contextmanager
def netns(prefix: str) -> Iterator[Netns]:
    """A fresh namespace with `lo` up, removed (with its processes) at exit."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    ns = Netns(name)
    try:
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        ns.stop_processes()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def veth(a: Netns, a_name: str, b: Netns, b_name: str, mtu: int = 1500) -> None:
    """Link two namespaces with a veth pair, both ends up (no addresses)."""
    tmp = f"v{secrets.token_hex(4)}"
    subprocess.run(
        [
            "ip",
            "link",
            "add",
            tmp,
            "netns",
            a.name,
            "type",
            "veth",
            "peer",
            "name",
            b_name,
            "netns",
            b.name,
        ],
        check=True,
        capture_output=True,
    )
    a.run("ip", "link", "set", tmp, "name", a_name)
    for ns, dev in ((a, a_name), (b, b_name)):
        ns.run("ip", "link", "set", dev, "mtu", str(mtu), "up")
