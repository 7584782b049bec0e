"""Hostile peers against every TCP listener: the proxy stays up, its memory stays flat, it
releases every descriptor, and an ordinary connection afterwards is relayed byte-exact.

The five listeners:

- vsock-to-ip and vsock-to-ip-transparent listen on emulated vsock (a Unix socket);
- ip-to-vsock listens on TCP on loopback;
- ip-to-vsock-transparent and transparent-port-to-vsock need SO_ORIGINAL_DST: they run in an
  "enclave" namespace whose nat OUTPUT rule redirects the server's address to them (root).

Each gets the same session: a connection that opens and never sends, random bytes ending in
a close, a reset or a half-close, a half-written destination header ending each of those ways
or left hanging, and 2000 connections opened at once and dropped at once (a third reset with
SO_LINGER 0, a third after a few bytes). The upstream is an echo server on its own event loop
(thousands of connections cost it little), so what came back is checked too. On
vsock-to-ip-transparent every one of these is a bad header: each is logged and closed, and
the connections that never complete theirs are closed at the connect timeout.

And one hostile upstream: a vsock peer of ip-to-vsock that accepts and never reads, while the
client pushes as fast as it can.

The random bytes never start with the header markers 4 or 6: vsock-to-ip-transparent would
connect wherever such bytes point, and these tests talk to loopback only.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.integration.helpers import free_port, open_fds, rss_kib, running, wait_until
from tests.integration.loopecho import echo_on, tcp_listener, unix_listener
from tests.integration.namespaced import (
    TRANSPARENT_PORT,
    WAIT,
    closed_without_data,
    enclave_namespace,
    in_netns,
    proxy,
    redirect,
)
from tests.netns import netns

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
FLOOD = 2000  # connections opened at once, then dropped at once
RSS_SLACK_KIB = 20 * 1024  # growth allowed: noise and allocator high-water, not 2000 buffers
FD_SLACK = 16  # the relay keeps up to 8 empty pipes (16 descriptors) for reuse
SERVER = "192.0.2.10"  # TEST-NET-1: only ever an original destination, redirected locally
SERVER_PORT = 80


# --- the listener under test ----------------------------------------------------------------


class Running(Protocol):
    process: Any

    @property
    def stderr(self) -> str: ...


@dataclass
class Target:
    """One listener under test, its upstream running, and how to reach it."""

    name: str
    proxy: Running
    address: Any
    make_sockets: Callable[[int], list[socket.socket]]
    reply: Callable[[bytes], bytes | None]  # what comes back for bytes sent then EOF
    preamble: bytes = b""  # what an ordinary client sends first (a destination header)
    closes_silent_connections: bool = False  # never-completed headers end at connect timeout

    def connect(self) -> socket.socket:
        sock = self.make_sockets(1)[0]
        connect(sock, self.address)
        return sock


def connect(sock: socket.socket, address: Any) -> None:
    """Connect, waiting while the listener's backlog is full (a Unix socket says EAGAIN)."""
    sock.settimeout(WAIT)
    deadline = time.monotonic() + WAIT
    while True:
        try:
            sock.connect(address)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def plain_sockets(family: int) -> Callable[[int], list[socket.socket]]:
    return lambda count: [socket.socket(family, socket.SOCK_STREAM) for _ in range(count)]


def ipv4_header(host: str, port: int) -> bytes:
    """reference.md: 0x04, the address as a little-endian u32, the port little-endian."""
    return b"\x04" + socket.inet_aton(host)[::-1] + struct.pack("<H", port)


@pytest.fixture
def vsock_dir() -> Iterator[Path]:
    """A short directory for the emulated vsock sockets (Unix socket paths max 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="pfp-hostile-") as name:
        yield Path(name)


@contextmanager
def target(name: str, vsock_dir: Path, log_dir: Path, *, splice: bool = True) -> Iterator[Target]:
    """Start the listener `name` in front of an echo server; stop both at the end."""
    env = {"PF_PROXY_VSOCK_DIR": str(vsock_dir)}
    if not splice:
        env["PF_PROXY_NO_SPLICE"] = "1"
    unix, tcp = plain_sockets(socket.AF_UNIX), plain_sockets(socket.AF_INET)
    if name == "vsock-to-ip":
        with (
            echo_on(tcp_listener()) as echo,
            running(
                name, "-v", "88:4000", "-i", f"127.0.0.1:{echo.port}", log_dir=log_dir, env=env
            ) as started,
        ):
            yield Target(name, started, str(vsock_dir / "88_4000.sock"), unix, lambda sent: sent)
    elif name == "ip-to-vsock":
        port = free_port()
        with (
            echo_on(unix_listener(vsock_dir / "88_4000.sock")),
            running(
                name, "-i", f"127.0.0.1:{port}", "-v", "88:4000", log_dir=log_dir, env=env
            ) as started,
        ):
            yield Target(name, started, ("127.0.0.1", port), tcp, lambda sent: sent)
    elif name == "vsock-to-ip-transparent":
        args = ["-v", "3:1200", "--connect-timeout", "3"]
        with (
            echo_on(tcp_listener()) as echo,
            running(name, *args, log_dir=log_dir, env=env) as started,
        ):
            yield Target(
                name,
                started,
                str(vsock_dir / "3_1200.sock"),
                unix,
                reply=lambda sent: None,  # never a valid header: closed without an answer
                preamble=ipv4_header("127.0.0.1", echo.port),
                closes_silent_connections=True,
            )
    else:
        if name == "ip-to-vsock-transparent":
            vsock_args = ["-v", "3:1200"]
            upstream = vsock_dir / "3_1200.sock"
            header = ipv4_header(SERVER, SERVER_PORT)  # the echo returns it first
        else:  # transparent-port-to-vsock: vsock 88:<original port>
            vsock_args = ["-v", "88"]
            upstream = vsock_dir / f"88_{SERVER_PORT}.sock"
            header = b""
        listen = f"127.0.0.1:{TRANSPARENT_PORT}"
        with echo_on(unix_listener(upstream)), netns("pfp-hostile") as enclave:
            enclave_namespace(enclave)
            redirect(enclave, SERVER)

            def sockets(count: int) -> list[socket.socket]:
                return in_netns(enclave, lambda: tcp(count))

            args = [name, "-i", listen, *vsock_args]
            with proxy(enclave, *args, log_dir=log_dir, env=env) as started:
                yield Target(
                    name, started, (SERVER, SERVER_PORT), sockets, lambda sent: header + sent
                )


# --- the hostile session --------------------------------------------------------------------


def proxy_pid(target: Target) -> int:
    """The proxy's own pid (`ip netns exec` execs the command: the same process)."""
    pid: int = target.proxy.process.pid
    assert target.name in Path(f"/proc/{pid}/cmdline").read_text(), "not the proxy itself"
    return pid


def garbage(rng: random.Random, size: int) -> bytes:
    """Random bytes that never start with a header marker (4, 6): no connect anywhere."""
    data = bytearray(rng.randbytes(size))
    if data and data[0] in (4, 6):
        data[0] |= 0x80
    return bytes(data)


def reset_on_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def read_to_end(sock: socket.socket) -> bytes | None:
    """Everything until EOF; None if the connection was reset."""
    chunks = []
    try:
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    except ConnectionResetError:
        return None
    return b"".join(chunks)


def send_and_end(target: Target, data: bytes, ending: str) -> None:
    """Connect, send `data`, then close, reset, or half-close and check what comes back."""
    with target.connect() as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            assert target.reply(data) is None, "cut off by a listener that relays"
            return
        if ending == "reset":
            reset_on_close(sock)
        elif ending == "half-close":
            sock.shutdown(socket.SHUT_WR)
            received, expected = read_to_end(sock), target.reply(data)
            if expected is None:
                assert received in (b"", None)
            else:
                assert received == expected


def ordinary_exchange(target: Target, size: int = MiB) -> None:
    """An ordinary client: (its header,) `size` random bytes, half-close; all come back."""
    payload = os.urandom(size)
    with target.connect() as sock:
        sender = threading.Thread(
            target=lambda: (sock.sendall(target.preamble + payload), sock.shutdown(socket.SHUT_WR))
        )
        sender.start()
        received = read_to_end(sock)
        sender.join(WAIT)
    expected = payload if target.preamble else target.reply(payload)
    assert received is not None, "ordinary connection reset"
    assert expected is not None
    assert len(received) == len(expected)
    assert received == expected


def flood(target: Target, rng: random.Random) -> None:
    """FLOOD connections opened at once, then all dropped: a third reset, a third after a
    few bytes, a third plainly closed."""
    sockets = target.make_sockets(FLOOD)
    try:
        for sock in sockets:
            connect(sock, target.address)
        for index, sock in enumerate(sockets):
            if index % 3 == 0:
                reset_on_close(sock)
            elif index % 3 == 1:
                try:
                    sock.send(garbage(rng, 100))
                except OSError:
                    pass  # a listener that rejects may have cut it off already
    finally:
        for sock in sockets:
            sock.close()


LISTENERS = [
    pytest.param("vsock-to-ip", "splice"),
    pytest.param("vsock-to-ip", "copy"),
    pytest.param("ip-to-vsock", "splice"),
    pytest.param("ip-to-vsock", "copy"),
    pytest.param("vsock-to-ip-transparent", "splice"),
    pytest.param("ip-to-vsock-transparent", "splice", marks=pytest.mark.root),
    pytest.param("transparent-port-to-vsock", "splice", marks=pytest.mark.root),
]


@pytest.mark.parametrize(("name", "path"), LISTENERS)
def test_hostile_peers(name: str, path: str, vsock_dir: Path, tmp_path: Path) -> None:
    """A hostile session against one listener (on the relay's splice or copy path, for those
    that relay the hostile bytes), then: still running, every descriptor released, resident
    memory within RSS_SLACK_KIB of where it started, an ordinary connection byte-exact."""
    rng = random.Random(f"hostile {name} {path}")
    with target(name, vsock_dir, tmp_path, splice=path == "splice") as listener:
        pid = proxy_pid(listener)
        ordinary_exchange(listener)  # warm up: pools, lazy imports, the logger
        rss_before, fds_before = rss_kib(pid), open_fds(pid)

        silent = listener.connect()  # opens and never sends

        first_bytes = set()
        for index in range(60):
            ending = ("close", "reset", "half-close")[index % 3]
            data = garbage(rng, rng.choice([1, 2, 7, 100, 4096, 65536]))
            first_bytes.add(data[0])
            send_and_end(listener, data, ending)

        half_headers = [ipv4_header("127.0.0.1", 80)[:3], b"\x06" + bytes(9)]
        for partial in half_headers:
            for ending in ("close", "reset", "half-close"):
                send_and_end(listener, partial, ending)
        hanging = listener.connect()
        hanging.sendall(half_headers[0])

        flood(listener, rng)

        ordinary_exchange(listener)  # works after all that, with the silent ones still open
        for sock in (silent, hanging):
            with sock:
                if listener.closes_silent_connections:
                    assert closed_without_data(sock)  # at the connect timeout
                else:
                    sock.sendall(b"still here")
                    sock.shutdown(socket.SHUT_WR)
                    sent = (b"" if sock is silent else half_headers[0]) + b"still here"
                    assert read_to_end(sock) == listener.reply(sent)

        wait_until(
            lambda: open_fds(pid) <= fds_before + FD_SLACK,
            f"descriptors back to {fds_before}",
            timeout=60,
        )
        rss_after = rss_kib(pid)
        assert rss_after - rss_before < RSS_SLACK_KIB, (
            f"resident memory {rss_before} -> {rss_after} KiB"
        )
        assert listener.proxy.process.poll() is None
        stderr = listener.proxy.stderr
        if name == "vsock-to-ip-transparent":
            for marker in first_bytes:  # each bad header logged with its marker
                assert f"malformed bytes or invalid IP version marker {marker}" in stderr
            assert "stream ended inside the destination header" in stderr
        assert "Traceback" not in stderr
        print(f"{name}/{path}: resident {rss_before} -> {rss_after} KiB, {FLOOD} dropped at once")


# --- a vsock peer that never reads ----------------------------------------------------------


@pytest.mark.parametrize("path", ["splice", "copy"])
def test_vsock_peer_that_never_reads(path: str, vsock_dir: Path, tmp_path: Path) -> None:
    """ip-to-vsock whose vsock peer accepts and never reads while the client pushes as fast
    as it can: the proxy holds at most a chunk per direction, so memory stays flat and TCP
    flow control stops the client after a few MiB of socket buffers. When the peer leaves
    with everything unread, the client's connection ends, the failure is logged, and the next
    connection (to a peer that echoes) works."""
    env = {"PF_PROXY_VSOCK_DIR": str(vsock_dir)}
    if path == "copy":
        env["PF_PROXY_NO_SPLICE"] = "1"
    port = free_port()
    upstream = vsock_dir / "88_4000.sock"
    stalled = unix_listener(upstream)
    stalled.settimeout(WAIT)
    args = ["-i", f"127.0.0.1:{port}", "-v", "88:4000"]
    with running("ip-to-vsock", *args, log_dir=tmp_path, env=env) as started:
        pid = started.process.pid
        rss_before = rss_kib(pid)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
            peer, _ = stalled.accept()
            client.setblocking(False)
            chunk, pushed, cap = os.urandom(MiB), 0, 1 << 30
            last_progress = time.monotonic()
            while time.monotonic() - last_progress < 1.0 and pushed < cap:
                try:
                    pushed += client.send(chunk)
                    last_progress = time.monotonic()
                except BlockingIOError:
                    time.sleep(0.01)
            growth = rss_kib(pid) - rss_before
            assert pushed < 64 * MiB, f"the proxy took {pushed} bytes its peer never read"
            assert growth < RSS_SLACK_KIB, f"resident memory grew {growth} KiB"

            peer.close()  # leaves with everything unread
            stalled.close()
            client.settimeout(WAIT)
            assert read_to_end(client) in (b"", None)
        started.wait_for("Failed to transfer data", stream="stderr")

        upstream.unlink()
        with echo_on(unix_listener(upstream)):
            payload = os.urandom(MiB)
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
                sender = threading.Thread(
                    target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR))
                )
                sender.start()
                assert read_to_end(sock) == payload
                sender.join(WAIT)
        assert started.process.poll() is None
        print(f"never-reading peer/{path}: {pushed} bytes pushed, rss grew {growth} KiB")
