"""Helpers for tests across network namespaces: sockets made inside a namespace, the real
console scripts started inside one, and small servers and clients.

Clients and servers run in the test process: their sockets are created inside the namespaces
(a short-lived thread enters the namespace with setns(2), makes the socket and exits; a socket
keeps the namespace it was made in). Proxies are the real console scripts, started inside the
namespaces; their stdout/stderr go to files.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.integration.helpers import (
    Proxy,
    ThreadedServer,
    echo,
    listening_socket,
)
from tests.netns import Netns
from tests.vsocks import SLOWDOWN

WAIT = 15.0 * SLOWDOWN  # seconds any single step may take before the test fails
TRANSPARENT_PORT = 1200  # where the transparent listeners listen; REDIRECT rules point here

T = TypeVar("T")

# --- namespaces -----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000  # linux/sched.h


def in_netns(ns: Netns, make: Callable[[], T]) -> T:
    """Call `make` on a thread that has entered `ns`'s network namespace; return its result."""
    result: dict[str, Any] = {}

    def enter_and_make() -> None:
        try:
            fd = os.open(f"/var/run/netns/{ns.name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns.name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = make()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=enter_and_make)
    thread.start()
    thread.join(WAIT)
    if "error" in result:
        raise result["error"]
    return result["value"]  # type: ignore[no-any-return]


def enclave_namespace(ns: Netns, *, ipv6: bool = False) -> None:
    """Give an enclave-style namespace a default route over lo with a usable source."""
    ns.run("ip", "route", "add", "default", "dev", "lo", "src", "127.0.0.1")
    if ipv6:
        ns.run("ip", "-6", "route", "add", "default", "dev", "lo", "src", "::1")


def redirect(ns: Netns, destination: str, *extra: str, port: int = TRANSPARENT_PORT) -> None:
    """nat OUTPUT: TCP to `destination` goes to the local `port` instead."""
    tool = "ip6tables" if ":" in destination else "iptables"
    ns.run(
        tool,
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        destination,
        *extra,
        "-j",
        "REDIRECT",
        "--to-ports",
        str(port),
    )


# --- proxies as processes -------------------------------------------------------------------


def _script(name: str) -> str:
    """The console script next to this interpreter (a virtualenv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    assert found, f"console script {name} not found"
    return found


class NsProxy(Proxy):
    """A console script running inside a namespace (killed with it at the latest)."""

    def __init__(self, ns: Netns, args: Sequence[str], log_dir: Path, env: dict[str, str]):
        command = [_script(args[0]), *args[1:]]
        super().__init__(command, log_dir, env, prefix=ns.command([]), timeout=WAIT)
        self.args = list(args)
        ns.processes.append(self.process)


@contextmanager
def proxy(ns: Netns, *args: str, log_dir: Path, env: dict[str, str]) -> Iterator[NsProxy]:
    """Start a proxy in `ns`, wait for "Listening on:", stop it (SIGTERM) at the end."""
    running = NsProxy(ns, args, log_dir, env)
    try:
        running.wait_for("Listening on:")
        yield running
    finally:
        code = running.stop()
        assert code == 0, f"{args} exited {code} on SIGTERM:\n{running.stderr}"


# --- servers and clients --------------------------------------------------------------------


class Server(ThreadedServer):
    """A TCP server on a listening socket made in some namespace: each connection gets
    `greeting` first, then every byte it sends echoed back, then a half-close."""

    def __init__(self, listener: socket.socket, greeting: bytes = b"") -> None:
        self.greeting = greeting
        super().__init__(listener)

    def handle(self, conn: socket.socket) -> None:
        conn.sendall(self.greeting)
        echo(conn)


@contextmanager
def server_in(ns: Netns, host: str, greeting: bytes = b"") -> Iterator[Server]:
    server = Server(in_netns(ns, lambda: listening_socket(host)), greeting)
    try:
        yield server
    finally:
        server.close()


def tcp_socket_in(ns: Netns, family: int = socket.AF_INET) -> socket.socket:
    sock = in_netns(ns, lambda: socket.socket(family, socket.SOCK_STREAM))
    sock.settimeout(WAIT * 2)
    return sock


def closed_without_data(sock: socket.socket, send: bytes = b"", connect_to: Any = None) -> bool:
    """Connect to `connect_to` (if given), send `send` (if any); True when the peer closes
    (EOF or reset) without answering.

    The peer may close before connect() returns or while we send: a reset or broken pipe then
    counts as closed too.
    """
    try:
        if connect_to is not None:
            sock.connect(connect_to)
        if send:
            sock.sendall(send)
        return sock.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def same_bytes(received: bytes, expected: bytes) -> None:
    assert len(received) == len(expected)
    assert hashlib.sha256(received).digest() == hashlib.sha256(expected).digest()


@contextmanager
def etc_file(ns: Netns, name: str, text: str) -> Iterator[Path]:
    """/etc/netns/<ns>/<name>: what processes started in `ns` (`ip netns exec`) see as
    /etc/<name>, e.g. resolv.conf or hosts; removed (with the directory) at the end."""
    directory = Path("/etc/netns") / ns.name
    directory.mkdir(parents=True, exist_ok=True)
    try:
        (directory / name).write_text(text)
        yield directory / name
    finally:
        (directory / name).unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError:
            pass  # another file of this namespace is still there
