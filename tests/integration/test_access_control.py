"""vsock-to-ip-transparent --allow/--deny, as a real process over emulated vsock.

The test plays the enclave: it connects to the emulated vsock listener, writes a destination
header and then payload. Denied destinations are loopback addresses with a real listener
behind them, so "never connected" is checked where it counts: that listener saw nothing.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import EchoServer, Proxy, running

pytestmark = pytest.mark.timeout(120)

VSOCK = "3:1200"


def header(address: str, port: int) -> bytes:
    """The destination header, written out by hand (not with the code under test)."""
    parsed = ipaddress.ip_address(address)
    marker, size = (4, 4) if parsed.version == 4 else (6, 16)
    return bytes([marker]) + int(parsed).to_bytes(size, "little") + port.to_bytes(2, "little")


@pytest.fixture
def vsock_dir(tmp_path: Path) -> Path:
    path = tmp_path / "vsock"
    path.mkdir()
    return path


class Target:
    """A listener nobody should reach: records whether anything connected."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]

    def was_connected(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True


@pytest.fixture
def targets() -> Iterator[dict[str, Target]]:
    made = {host: Target(host) for host in ("127.0.0.2", "127.0.0.3", "::1")}
    yield made
    for target in made.values():
        target.sock.close()


def transparent(vsock_dir: Path, log_dir: Path, *flags: str) -> Iterator[Proxy]:
    with running(
        "vsock-to-ip-transparent",
        "-v",
        VSOCK,
        *flags,
        log_dir=log_dir,
        env={"PF_PROXY_VSOCK_DIR": str(vsock_dir)},
    ) as proxy:
        yield proxy


def send_through(vsock_dir: Path, first: bytes, payload: bytes) -> bytes:
    """Connect as the enclave, send header and payload, half-close; return all received."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(vsock_dir / "3_1200.sock"))
        try:
            sock.sendall(first + payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may already have closed a denied connection
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def assert_denied(
    proxy: Proxy, vsock_dir: Path, target: Target, address: str, rule: str
) -> None:
    """The connection is closed unanswered, logged with the address and the deciding `rule`,
    and `target` never saw a connect."""
    text = str(ipaddress.ip_address(address))  # as Python spells it in the log
    shown = f"[{text}]:{target.port}" if ":" in text else f"{text}:{target.port}"
    received = send_through(vsock_dir, header(address, target.port), b"GET / HTTP/1.0\r\n\r\n")
    assert received == b""
    proxy.wait_for(
        f"Closing connection from vsock {VSOCK}: destination {shown} denied by {rule}",
        stream="stderr",
    )
    assert f"Proxying to: {shown}" not in proxy.stdout
    assert not target.was_connected()


def assert_allowed(vsock_dir: Path, echo: EchoServer, address: str = "127.0.0.1") -> None:
    payload = os.urandom(256 * 1024)
    assert send_through(vsock_dir, header(address, echo.port), payload) == payload


def test_deny_closes_before_connecting_and_allows_the_rest(
    vsock_dir: Path, tmp_path: Path, targets: dict[str, Target], echo: EchoServer
) -> None:
    for proxy in transparent(
        vsock_dir, tmp_path, "--deny", "127.0.0.2/32", "--deny", "127.0.0.3", "--deny", "::1/128"
    ):
        assert (
            "Destinations: denied: 127.0.0.2/32, 127.0.0.3/32, ::1/128; everything else allowed"
            in proxy.stdout
        )
        assert_denied(proxy, vsock_dir, targets["127.0.0.2"], "127.0.0.2", "--deny 127.0.0.2/32")
        assert_denied(proxy, vsock_dir, targets["127.0.0.3"], "127.0.0.3", "--deny 127.0.0.3/32")
        assert_denied(proxy, vsock_dir, targets["::1"], "::1", "--deny ::1/128")
        assert_allowed(vsock_dir, echo)
        assert proxy.process.poll() is None


def test_ipv4_mapped_destination_cannot_bypass_a_deny(
    vsock_dir: Path, tmp_path: Path, targets: dict[str, Target], echo: EchoServer
) -> None:
    """::ffff:127.0.0.2 would reach 127.0.0.2 over IPv4: it is denied as 127.0.0.2."""
    for proxy in transparent(vsock_dir, tmp_path, "--deny", "127.0.0.2/32"):
        assert_denied(
            proxy, vsock_dir, targets["127.0.0.2"], "::ffff:127.0.0.2", "--deny 127.0.0.2/32"
        )
        # ... while a mapped address that is not denied really is reached over IPv4
        assert_allowed(vsock_dir, echo, "::ffff:127.0.0.1")


def test_rules_with_a_port(
    vsock_dir: Path, tmp_path: Path, targets: dict[str, Target], echo: EchoServer
) -> None:
    """--deny NETWORK:PORT and [IPV6-NETWORK]:PORT deny that port only."""
    t2, t6 = targets["127.0.0.2"], targets["::1"]
    flags = ("--deny", f"127.0.0.0/8:{t2.port}", "--deny", f"[::1]:{t6.port}")
    for proxy in transparent(vsock_dir, tmp_path, *flags):
        assert (
            f"Destinations: denied: 127.0.0.0/8:{t2.port}, [::1/128]:{t6.port}; everything "
            "else allowed" in proxy.stdout
        )
        assert_denied(proxy, vsock_dir, t2, "127.0.0.2", f"--deny 127.0.0.0/8:{t2.port}")
        assert_denied(proxy, vsock_dir, t6, "::1", f"--deny [::1/128]:{t6.port}")
        assert_allowed(vsock_dir, echo)  # 127.0.0.1, on the echo server's port


@pytest.mark.parametrize(
    "address",
    [
        "::ffff:0:127.0.0.3",  # IPv4-translated
        "64:ff9b::127.0.0.3",  # NAT64
        "2002:7f00:3::1",  # 6to4
        "2001:0:4136:e378:8000:63bf:80ff:fffc",  # Teredo, client 127.0.0.3 (bits inverted)
    ],
)
def test_ipv6_forms_of_a_denied_address_are_denied(
    address: str, vsock_dir: Path, tmp_path: Path, targets: dict[str, Target]
) -> None:
    """An explicit --deny covers every IPv6 form that embeds an address it denies."""
    for proxy in transparent(vsock_dir, tmp_path, "--deny", "127.0.0.3/32"):
        assert_denied(proxy, vsock_dir, targets["127.0.0.3"], address, "--deny 127.0.0.3/32: ")


def test_allow_denies_everything_else(
    vsock_dir: Path, tmp_path: Path, targets: dict[str, Target], echo: EchoServer
) -> None:
    for proxy in transparent(vsock_dir, tmp_path, "--allow", "127.0.0.1/32"):
        assert "allowed: 127.0.0.1/32; everything else denied" in proxy.stdout
        not_allowed = "--allow: the address is in no --allow network"
        assert_denied(proxy, vsock_dir, targets["127.0.0.2"], "127.0.0.2", not_allowed)
        assert_denied(proxy, vsock_dir, targets["::1"], "::1", not_allowed)
        assert_allowed(vsock_dir, echo)


def test_deny_wins_over_allow(
    vsock_dir: Path, tmp_path: Path, targets: dict[str, Target], echo: EchoServer
) -> None:
    for proxy in transparent(
        vsock_dir, tmp_path, "--allow", "127.0.0.0/8", "--deny", "127.0.0.2/31"
    ):
        assert_denied(proxy, vsock_dir, targets["127.0.0.2"], "127.0.0.2", "--deny 127.0.0.2/31")
        assert_denied(proxy, vsock_dir, targets["127.0.0.3"], "127.0.0.3", "--deny 127.0.0.2/31")
        assert_allowed(vsock_dir, echo)


def test_default_allows_everything(
    vsock_dir: Path, tmp_path: Path, targets: dict[str, Target]
) -> None:
    """Without flags, as the originals: the same destination that was denied is connected."""
    target = targets["127.0.0.2"]
    for proxy in transparent(vsock_dir, tmp_path):
        assert "Destinations: everything allowed" in proxy.stdout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(vsock_dir / "3_1200.sock"))
            sock.sendall(header("127.0.0.2", target.port))
            proxy.wait_for(f"Proxying to: 127.0.0.2:{target.port}")
            target.sock.settimeout(30)
            conn, _ = target.sock.accept()
            conn.close()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--deny", "169.254.169.254/16"),
        ("--deny", "169.254.0.0/33"),
        ("--deny", "metadata"),
        ("--allow", "10.0.0/8"),
        ("--allow", "2001:db8::1/32"),
        ("--allow", ""),
        ("--deny", "10.0.0.0/8:0"),
        ("--deny", "10.0.0.0/8:http"),
        ("--allow", "2001:db8::/32:443"),
        ("--allow", "[2001:db8::/32]443"),
    ],
)
def test_malformed_cidr_exits_2_naming_the_flag(flag: str, value: str, vsock_dir: Path) -> None:
    result = subprocess.run(
        ["vsock-to-ip-transparent", "-v", VSOCK, flag, value],
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, "PF_PROXY_VSOCK_DIR": str(vsock_dir)},
    )
    assert result.returncode == 2, result
    assert f"Invalid value for '{flag}'" in result.stderr
    assert not (vsock_dir / "3_1200.sock").exists()  # it never started listening
