"""The transparent proxies in network namespaces, with real iptables/ip6tables REDIRECT rules.

Two namespaces stand for the two sides of a Nitro enclave, linked only by emulated vsock
(Unix sockets in a directory both can see):

- "enclave": only `lo`, a default route `dev lo src 127.0.0.1` (and `src ::1`), and a nat
  OUTPUT rule redirecting the server's address to the transparent listener on port 1200. The
  enclave has no other way to reach the server: it knows it only as the original destination.
- "host": the server's address on its own `lo`, the server, and the vsock side of the proxy.

The clients and servers run in this test process: their sockets are created inside the
namespaces (a short-lived thread enters the namespace with setns(2), makes the socket and
exits; a socket keeps the namespace it was made in). The proxies are the real console
scripts, started inside the namespaces; their stdout/stderr go to files.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.integration.helpers import exchange_on
from tests.integration.namespaced import (
    TRANSPARENT_PORT,
    WAIT,
    Server,
    closed_without_data,
    enclave_namespace,
    proxy,
    redirect,
    same_bytes,
    server_in,
    tcp_socket_in,
)
from tests.netns import Netns, netns
from tests.vsocks import Vsock

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]

MiB = 1 << 20
SERVER_V4 = "192.0.2.10"  # TEST-NET-1: in the host namespace only
SERVER_V6 = "2001:db8::10"  # documentation prefix: in the host namespace only


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def vsock_dir() -> Iterator[Path]:
    """A short directory for the emulated vsock sockets (Unix socket paths max 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="pfp-vsock-") as name:
        yield Path(name)


@pytest.fixture
def plain_env(vsock_dir: Path) -> dict[str, str]:
    return {"PF_PROXY_VSOCK_DIR": str(vsock_dir)}


@pytest.fixture
def enclave() -> Iterator[Netns]:
    with netns("pfp-enclave") as ns:
        yield ns


@pytest.fixture
def host() -> Iterator[Netns]:
    with netns("pfp-host") as ns:
        yield ns


# --- 1, 2: end to end through the transparent pair ------------------------------------------


@pytest.mark.parametrize(
    ("server_address", "listen", "family"),
    [
        (SERVER_V4, f"127.0.0.1:{TRANSPARENT_PORT}", socket.AF_INET),
        (SERVER_V6, f"[::1]:{TRANSPARENT_PORT}", socket.AF_INET6),
    ],
    ids=["ipv4", "ipv6"],
)
@pytest.mark.vsock
def test_enclave_reaches_host_server_by_original_destination(
    enclave: Netns,
    host: Netns,
    vsock: Vsock,
    tmp_path: Path,
    server_address: str,
    listen: str,
    family: int,
) -> None:
    """client (enclave) -> REDIRECT -> ip-to-vsock-transparent -> vsock :1200 ->
    vsock-to-ip-transparent (host) -> the server at the original destination; 4 MiB echoed
    byte-exact, with half-close."""
    ipv6 = family == socket.AF_INET6
    prefix = "128" if ipv6 else "32"
    host.run("ip", "addr", "add", f"{server_address}/{prefix}", "dev", "lo")
    enclave_namespace(enclave, ipv6=ipv6)
    redirect(enclave, server_address)

    with server_in(host, server_address) as server:
        # Without the proxies the enclave cannot reach the server: the rule sends it nowhere.
        with tcp_socket_in(enclave, family) as probe, pytest.raises(ConnectionRefusedError):
            probe.connect((server_address, server.port))
        through_the_pair(enclave, host, vsock, tmp_path, server, server_address, listen)


def through_the_pair(
    enclave: Netns,
    host: Netns,
    vsock: Vsock,
    tmp_path: Path,
    server: Server,
    server_address: str,
    listen: str,
) -> None:
    family = socket.AF_INET6 if ":" in server_address else socket.AF_INET
    ipv6 = family == socket.AF_INET6
    env = vsock.env
    with (
        proxy(
            host, "vsock-to-ip-transparent", "-v", vsock.listen_address(1200),
            log_dir=tmp_path, env=env,
        ) as inner,
        proxy(
            enclave, "ip-to-vsock-transparent", "-i", listen, "-v", vsock.address(1200),
            log_dir=tmp_path, env=env,
        ) as outer,
    ):  # fmt: skip
        payload = os.urandom(4 * MiB)
        received = exchange_on(
            tcp_socket_in(enclave, family), (server_address, server.port), payload
        )
        same_bytes(received, payload)
        assert server.connections == 1

        original = (
            f"[{server_address}]:{server.port}" if ipv6 else f"{server_address}:{server.port}"
        )
        outer.wait_for(f"Original destination: {original}")
        outer.wait_for(f"with original_dst={original} from inbound TCP stream")
        outer.wait_for("ip to vsock IO copy done")
        outer.wait_for("vsock to ip IO copy done")
        inner.wait_for(f"Proxying to: {original}")
        inbound = vsock.inbound_name(1200)
        inner.wait_for(f"vsock to ip IO copy done, from {inbound}")
        inner.wait_for(f"ip to vsock IO copy done, from {original} to {inbound}")
    assert "Failed" not in outer.stderr + inner.stderr, outer.stderr + inner.stderr


# --- 3: the header on the wire --------------------------------------------------------------


class HeaderCatcher:
    """Stands in for vsock-to-ip-transparent at the emulated path: records what arrives."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.listener.settimeout(WAIT)
        self.reply = reply
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve_one, daemon=True)
        self.thread.start()

    def _serve_one(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(WAIT)
            chunks = []
            while chunk := conn.recv(1 << 16):
                chunks.append(chunk)
            self.received.append(b"".join(chunks))
            conn.sendall(self.reply)

    def result(self) -> bytes:
        self.thread.join(WAIT)
        assert self.received, "nothing reached the emulated vsock listener"
        return self.received[0]

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize(
    ("destination", "listen", "family", "header"),
    [
        (
            "1.2.3.4",
            f"127.0.0.1:{TRANSPARENT_PORT}",
            socket.AF_INET,
            bytes.fromhex("04 04030201 5000"),
        ),
        (
            "2001:db8::1:2:3",
            f"[::1]:{TRANSPARENT_PORT}",
            socket.AF_INET6,
            bytes.fromhex("06 0300 0200 0100 0000 0000 0000 b80d 0120 5000"),
        ),
    ],
    ids=["ipv4", "ipv6"],
)
def test_destination_header_bytes_on_the_wire(
    enclave: Netns,
    plain_env: dict[str, str],
    vsock_dir: Path,
    tmp_path: Path,
    destination: str,
    listen: str,
    family: int,
    header: bytes,
) -> None:
    """The first 7 (IPv4) or 19 (IPv6) bytes on the vsock stream are reference.md's header
    for the original destination, then the client's bytes unchanged; the reply comes back."""
    assert len(header) == (7 if family == socket.AF_INET else 19)
    enclave_namespace(enclave, ipv6=family == socket.AF_INET6)
    redirect(enclave, destination)
    catcher = HeaderCatcher(vsock_dir / "3_1200.sock", reply=b"reply from the host side")
    try:
        with proxy(
            enclave,
            "ip-to-vsock-transparent",
            "-i",
            listen,
            "-v",
            "3:1200",
            log_dir=tmp_path,
            env=plain_env,
        ):
            payload = b"GET / HTTP/1.0\r\n\r\n" + os.urandom(100_000)
            received = exchange_on(tcp_socket_in(enclave, family), (destination, 80), payload)
            wire = catcher.result()
    finally:
        catcher.close()
    assert wire[: len(header)].hex(" ") == header.hex(" ")
    assert wire[len(header) :] == payload
    assert received == b"reply from the host side"


# --- 4: transparent-port-to-vsock routes by original port -----------------------------------


@pytest.mark.parametrize(
    ("target", "listen"),
    [
        ("192.0.2.20", f"127.0.0.1:{TRANSPARENT_PORT}"),
        ("2001:db8::20", f"[::1]:{TRANSPARENT_PORT}"),
    ],
    ids=["ipv4", "ipv6"],
)
@pytest.mark.vsock
def test_transparent_port_to_vsock_routes_by_original_port(
    enclave: Netns, host: Netns, vsock: Vsock, tmp_path: Path, target: str, listen: str
) -> None:
    """Connections redirected from the target's port 80 and 8080 reach vsock CID:80 and
    CID:8080, each a vsock-to-ip in the host namespace in front of its own server; a port
    nobody listens on (9090) is closed and logged, and the others keep working."""
    plain_env = vsock.env
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    shown = f"[{target}]" if family == socket.AF_INET6 else target
    enclave_namespace(enclave, ipv6=family == socket.AF_INET6)
    redirect(enclave, target)
    with ExitStack() as stack:
        servers = {
            port: stack.enter_context(server_in(host, "127.0.0.1", greeting=f"<{port}>".encode()))
            for port in (80, 8080)
        }
        inners = {
            port: stack.enter_context(
                proxy(
                    host,
                    "vsock-to-ip",
                    "-v",
                    vsock.listen_address(port),
                    "-i",
                    f"127.0.0.1:{server.port}",
                    log_dir=tmp_path,
                    env=plain_env,
                )
            )
            for port, server in servers.items()
        }
        outer = stack.enter_context(
            proxy(
                enclave,
                "transparent-port-to-vsock",
                "-i",
                listen,
                "-v",
                str(vsock.cid),
                "--connect-timeout",  # no listener on 9090: retried until then
                "2",
                log_dir=tmp_path,
                env=plain_env,
            )
        )

        for round_ in range(2):
            for port in (8080, 80):
                payload = f"to port {port}, round {round_}: ".encode() + os.urandom(256 * 1024)
                received = exchange_on(tcp_socket_in(enclave, family), (target, port), payload)
                greeting = f"<{port}>".encode()
                assert received[: len(greeting)] == greeting
                same_bytes(received[len(greeting) :], payload)
        assert {port: server.connections for port, server in servers.items()} == {80: 2, 8080: 2}

        outer.wait_for(f"Original destination: {shown}:80")
        outer.wait_for(f"Original destination: {shown}:8080")
        outer.wait_for(f"Proxying to: vsock {vsock.address(80)}")
        outer.wait_for(f"Proxying to: vsock {vsock.address(8080)}")
        outer.wait_for("port to vsock IO copy done")
        outer.wait_for("vsock to port IO copy done")
        for port, inner in inners.items():
            inner.wait_for(f"vsock to ip IO copy done, from {vsock.inbound_name(port)}")

        # No vsock listener on CID:9090: that one connection is closed and logged.
        with tcp_socket_in(enclave, family) as sock:
            assert closed_without_data(sock, b"anyone there?", connect_to=(target, 9090))
        outer.wait_for(
            f"failed to connect to vsock endpoint {vsock.address(9090)}: nobody listens",
            stream="stderr",
        )
        received = exchange_on(tcp_socket_in(enclave, family), (target, 80), b"still there")
        assert received == b"<80>still there"


# --- 5: a connection that was never redirected ----------------------------------------------


LOCAL_LISTEN_SERVER = pytest.mark.parametrize(
    ("local", "listen", "server_address"),
    [
        ("127.0.0.1", f"127.0.0.1:{TRANSPARENT_PORT}", SERVER_V4),
        ("::1", f"[::1]:{TRANSPARENT_PORT}", SERVER_V6),
    ],
    ids=["ipv4", "ipv6"],
)


@pytest.mark.parametrize("command", ["ip-to-vsock-transparent", "transparent-port-to-vsock"])
@LOCAL_LISTEN_SERVER
def test_connection_without_nat_is_closed_and_logged(
    enclave: Netns,
    host: Netns,
    plain_env: dict[str, str],
    tmp_path: Path,
    command: str,
    local: str,
    listen: str,
    server_address: str,
) -> None:
    """In a namespace with no NAT rule at all (no conntrack), SO_ORIGINAL_DST fails: the
    direct connection is closed and logged. Then a REDIRECT rule is added and a proper
    connection goes through."""
    family = socket.AF_INET6 if ":" in local else socket.AF_INET
    enclave_namespace(enclave, ipv6=family == socket.AF_INET6)
    prefix = "128" if family == socket.AF_INET6 else "32"
    host.run("ip", "addr", "add", f"{server_address}/{prefix}", "dev", "lo")
    with server_in(host, server_address) as server:
        if command == "ip-to-vsock-transparent":
            inner_args = ["vsock-to-ip-transparent", "-v", "3:1200"]
            outer_args = [command, "-i", listen, "-v", "3:1200"]
        else:
            shown = f"[{server_address}]" if family == socket.AF_INET6 else server_address
            inner_args = ["vsock-to-ip", "-v", f"88:{server.port}", "-i", f"{shown}:{server.port}"]
            outer_args = [command, "-i", listen, "-v", "88"]
        with (
            proxy(host, *inner_args, log_dir=tmp_path, env=plain_env),
            proxy(enclave, *outer_args, log_dir=tmp_path, env=plain_env) as outer,
        ):
            with tcp_socket_in(enclave, family) as sock:
                assert closed_without_data(sock, b"hello?", connect_to=(local, TRANSPARENT_PORT))
            outer.wait_for("Failed to retrieve original destination", stream="stderr")
            assert server.connections == 0

            redirect(enclave, server_address)
            payload = os.urandom(MiB)
            address = (server_address, server.port)
            received = exchange_on(tcp_socket_in(enclave, family), address, payload)
            same_bytes(received, payload)
            assert server.connections == 1


@pytest.mark.parametrize("command", ["ip-to-vsock-transparent", "transparent-port-to-vsock"])
@LOCAL_LISTEN_SERVER
def test_direct_connection_with_conntrack_active_is_not_forwarded(
    enclave: Netns,
    plain_env: dict[str, str],
    vsock_dir: Path,
    tmp_path: Path,
    command: str,
    local: str,
    listen: str,
    server_address: str,
) -> None:
    """With a NAT rule in place for other traffic, conntrack tracks the direct connection too
    and SO_ORIGINAL_DST succeeds, naming the listener itself. That is no original destination:
    the connection must be closed and logged, not forwarded (ip-to-vsock-transparent would
    ask the far side to connect to its own 127.0.0.1:1200; transparent-port-to-vsock would go
    to vsock CID:1200)."""
    family = socket.AF_INET6 if ":" in local else socket.AF_INET
    enclave_namespace(enclave, ipv6=family == socket.AF_INET6)
    redirect(enclave, server_address)  # for other traffic: conntrack now runs
    if command == "ip-to-vsock-transparent":
        args = [command, "-i", listen, "-v", "3:1200"]
        far_side = vsock_dir / "3_1200.sock"
    else:
        args = [command, "-i", listen, "-v", "88"]
        far_side = vsock_dir / f"88_{TRANSPARENT_PORT}.sock"
    catcher = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    catcher.bind(str(far_side))
    catcher.listen(8)
    catcher.setblocking(False)
    try:
        with proxy(enclave, *args, log_dir=tmp_path, env=plain_env) as outer:
            with tcp_socket_in(enclave, family) as sock:
                assert closed_without_data(sock, b"hello?", connect_to=(local, TRANSPARENT_PORT))
            outer.wait_for("Failed to retrieve original destination", stream="stderr")
            outer.wait_for("the connection was not redirected", stream="stderr")
            with pytest.raises(BlockingIOError):
                catcher.accept()  # nothing was forwarded
    finally:
        catcher.close()


# --- 6: vsock-to-ip-transparent fed garbage -------------------------------------------------


def _unix_connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(str(path))
    return sock


def test_bad_headers_close_only_their_connection(
    host: Netns, plain_env: dict[str, str], vsock_dir: Path, tmp_path: Path
) -> None:
    """A bad marker byte and a stream ending inside the header each close that connection
    with a log line, while a good connection opened before them keeps relaying."""
    host.run("ip", "addr", "add", f"{SERVER_V4}/32", "dev", "lo")
    with (
        server_in(host, SERVER_V4) as server,
        proxy(
            host, "vsock-to-ip-transparent", "-v", "3:1200", log_dir=tmp_path, env=plain_env
        ) as inner,
    ):
        path = vsock_dir / "3_1200.sock"
        header = (
            bytes([4])
            + int.from_bytes(socket.inet_aton(SERVER_V4), "big").to_bytes(4, "little")
            + server.port.to_bytes(2, "little")
        )
        with _unix_connect(path) as good:
            good.sendall(header + b"first half, ")
            assert good.recv(100) == b"first half, "

            with _unix_connect(path) as bad_marker:
                assert closed_without_data(bad_marker, b"\x05" + bytes(18) + b"payload")
            inner.wait_for("invalid IP version marker 5", stream="stderr")

            with _unix_connect(path) as truncated:
                truncated.sendall(header[:3])
                truncated.shutdown(socket.SHUT_WR)
                assert closed_without_data(truncated)
            inner.wait_for("ended inside the destination header", stream="stderr")

            with _unix_connect(path) as empty:
                empty.shutdown(socket.SHUT_WR)
                assert closed_without_data(empty)

            good.sendall(b"second half")
            good.shutdown(socket.SHUT_WR)
            rest = b""
            while chunk := good.recv(100):
                rest += chunk
            assert rest == b"second half"
        assert server.connections == 1
        inner.wait_for(f"vsock to ip IO copy done, from vsock 3:1200 to {SERVER_V4}:{server.port}")
