"""The commands with --vsock-uds against a fake hybrid vsock backend (tests/hybridfake.py):
fast coverage of the failure paths, with real processes and real sockets. The real backend
(vhost-device-vsock and a QEMU guest) is the hybrid stage's: tests/hybrid."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.request import urlopen

import pytest

from tests.hybridfake import REPLY, REQUEST_SIZE, fake_backend
from tests.integration.helpers import (
    EchoServer,
    Proxy,
    closed,
    exchange,
    free_port,
    proxy_commands,
    round_trip,
    run_briefly,
    running,
    socket_fds,
    wait_until,
)
from tests.integration.namespaced import NsProxy, in_netns
from tests.netns import netns

pytestmark = pytest.mark.timeout(120)

WAIT = 15.0


@contextmanager
def ip_to_vsock(tmp_path: Path, *extra: str) -> Iterator[tuple[int, Proxy]]:
    port = free_port()
    with running(
        "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", "3:5000",
        "--vsock-uds", str(tmp_path / "vm.vsock"), *extra, log_dir=tmp_path,
    ) as proxy:  # fmt: skip
        yield port, proxy


def scraped(port: int) -> str:
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
        text: str = response.read().decode()
        return text


def test_ip_to_vsock_relays_through_the_handshake_sending_nothing_before_ok(
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    with (
        fake_backend(tmp_path, lambda port, attempt: "ok") as backend,
        ip_to_vsock(tmp_path, "--metrics", f"127.0.0.1:{metrics_port}") as (port, proxy),
    ):
        for payload in (b"first bytes, sent before any OK", os.urandom(4 << 20)):
            assert round_trip(port, payload) == payload
        proxy.wait_for(f"Proxying to: hybrid vsock 3:5000 ({tmp_path}/vm.vsock)")
        text = scraped(metrics_port)
    assert backend.early == []  # not a byte came with a CONNECT line
    assert backend.lines == [b"CONNECT 5000\n"] * 2
    assert f'pf_proxy_vsock_hybrid_info{{uds_path="{tmp_path}/vm.vsock"}} 1.0' in text
    assert 'pf_proxy_vsock_hybrid_handshakes_total{outcome="connected"} 2.0' in text


def test_a_client_half_close_still_gets_the_whole_reply(tmp_path: Path) -> None:
    """The client sends its request and half-closes. Passed on, that EOF would be a full
    shutdown for the guest, whose reply would fail; the relay holds it, and the reply comes
    back whole, then the end of the stream once the guest closes."""
    request = os.urandom(REQUEST_SIZE)
    with (
        fake_backend(tmp_path, lambda port, attempt: "reply") as backend,
        ip_to_vsock(tmp_path) as (port, proxy),
    ):
        assert exchange(("127.0.0.1", port), request, timeout=WAIT) == REPLY
        proxy.wait_for("ip to vsock IO copy done, from 127.0.0.1:")
        proxy.wait_for("(end held: the upstream cannot take a half-close, which would cut its")
        proxy.wait_for("vsock to ip IO copy done")
    assert backend.replies_lost == 0


def test_with_the_end_held_the_idle_timeout_ends_the_connection_cleanly(tmp_path: Path) -> None:
    """The guest replies but its end never comes (a guest's half-close does not cross; a
    pf-proxy in the guest closes only once it has seen both ends): with --idle-timeout the
    client gets the reply and then a clean end of stream, not a reset."""
    with (
        fake_backend(tmp_path, lambda port, attempt: "reply+open"),
        ip_to_vsock(tmp_path, "--idle-timeout", "1") as (port, proxy),
    ):
        assert exchange(("127.0.0.1", port), os.urandom(REQUEST_SIZE), timeout=WAIT) == REPLY
        proxy.wait_for("idle for 1 s with the client's end held")
    assert "Failed to transfer data" not in proxy.stderr


def test_no_listener_in_the_guest_is_retried_then_logged_with_the_outcome(
    tmp_path: Path,
) -> None:
    with (
        fake_backend(tmp_path, lambda port, attempt: "eof") as backend,
        ip_to_vsock(tmp_path, "--connect-timeout", "1") as (port, proxy),
    ):
        before = socket_fds(proxy.process.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
            client_port = client.getsockname()[1]
            client.sendall(b"anyone?")
            assert closed(client)
        # The retries give up before the connect timeout, or are cut short by it in the middle
        # of a try (on a loaded machine): either way the line says what the backend answered,
        # and that it was retried.
        proxy.wait_for(f"Closing connection from 127.0.0.1:{client_port}: ", stream="stderr")
        assert (
            f"failed to connect to hybrid vsock 3:5000 ({tmp_path}/vm.vsock): no listener: "
            "CONNECT 5000: the backend closed without answering (nothing listens on guest port "
            "5000, or not yet); retried "
        ) in proxy.stderr, proxy.stderr
        wait_until(lambda: socket_fds(proxy.process.pid) == before, "the sockets released")
    assert backend.attempts[5000] > 5


def test_a_guest_listener_that_comes_late_is_reached(tmp_path: Path) -> None:
    with (
        fake_backend(tmp_path, lambda port, attempt: "eof" if attempt < 20 else "ok") as backend,
        ip_to_vsock(tmp_path) as (port, proxy),
    ):
        assert round_trip(port, b"patience") == b"patience"
    assert backend.attempts[5000] == 21
    assert "Closing connection" not in proxy.stderr


def test_vsock_to_ip_listens_at_uds_path_and_port_for_the_guest(
    tmp_path: Path, echo: EchoServer
) -> None:
    """A guest's connect to the host's port 5001 reaches uds_path_5001 (the backend connects
    there): the listener. The upstream's end reaches the guest as the end of its stream."""
    with running(
        "vsock-to-ip", "-v", "2:5001", "-i", f"127.0.0.1:{echo.port}",
        "--vsock-uds", str(tmp_path / "vm.vsock"), log_dir=tmp_path,
    ) as proxy:  # fmt: skip
        proxy.wait_for(f"Listening on: hybrid vsock 2:5001 ({tmp_path}/vm.vsock)")
        payload = os.urandom(1 << 20)
        received = exchange(str(tmp_path / "vm.vsock_5001"), payload, family=socket.AF_UNIX)
        assert received == payload


def test_udp_to_vsock_flows_cross_the_handshake(tmp_path: Path) -> None:
    port = free_port()
    with (
        fake_backend(tmp_path, lambda port, attempt: "ok"),
        running(
            "udp-to-vsock", "-i", f"127.0.0.1:{port}", "-v", "3:53",
            "--vsock-uds", str(tmp_path / "vm.vsock"), log_dir=tmp_path,
        ),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):  # fmt: skip
        client.settimeout(WAIT)
        client.sendto(b"a query", ("127.0.0.1", port))
        # The fake guest echoes the stream: the frame comes back, as a reply would.
        assert client.recv(100) == b"a query"


@pytest.mark.parametrize(
    ("args", "env", "flag", "problem"),
    [
        (["ip-to-vsock", "-i", "127.0.0.1:1", "-v", "2:5000"], {}, "'-v' / '--vsock-addr'",
         "its CID is 3 or more, not 2"),
        (["vsock-to-ip", "-v", "3:5000", "-i", "127.0.0.1:1"], {}, "'-v' / '--vsock-addr'",
         "a listener is the host side of one VM"),
        (["transparent-port-to-vsock", "-i", "127.0.0.1:1", "-v", "1"], {}, "'-v' / '--vsock'",
         "'1': with --vsock-uds the upstream is the guest"),
        (["vsock-to-udp", "-v", "2:53", "-i", "127.0.0.1:1"],
         {"PF_PROXY_VSOCK_DIR": "/tmp"}, "'--vsock-uds'",
         "hybrid vsock and the emulation (PF_PROXY_VSOCK_DIR) exclude each other"),
        (["vsock-to-ip-raw-outgoing", "-v", "2:1200"], {}, "'--vsock-uds'",
         "is too long for a Unix socket (107 bytes at most)"),
    ],
)  # fmt: skip
def test_a_cid_or_path_hybrid_vsock_cannot_use_is_a_usage_error(
    tmp_path: Path, args: list[str], env: dict[str, str], flag: str, problem: str
) -> None:
    uds = tmp_path / ("x" * 120 if "too long" in problem else "vm.vsock")
    result = run_briefly(*args, "--vsock-uds", str(uds), env=env)
    assert result.returncode == 2, result
    assert f"Invalid value for {flag}" in result.stderr, result.stderr
    assert problem in " ".join(result.stderr.split()), result.stderr


@pytest.mark.root
def test_the_raw_link_keeps_both_ways_of_a_hybrid_stream_open(tmp_path: Path) -> None:
    """ip-to-vsock-raw-outgoing over hybrid vsock: packets reach the guest through the
    handshake, and the link's reading side is not shut down (on a hybrid socket that would
    end the guest's stream: here its byte back would fail)."""
    with (
        fake_backend(tmp_path, lambda port, attempt: "sink") as backend,
        netns("pfp-rawhybrid") as ns,
    ):
        ns.run("iptables", "-A", "OUTPUT", "-p", "udp", "--dport", "9999",
               "-j", "NFQUEUE", "--queue-num", "3")  # fmt: skip
        proxy = NsProxy(ns, ["ip-to-vsock-raw-outgoing", "-v", "3:1200", "-q", "3",
                             "--vsock-uds", str(tmp_path / "vm.vsock")], tmp_path, {})  # fmt: skip
        try:
            proxy.wait_for(f"Connected to hybrid vsock 3:1200 ({tmp_path}/vm.vsock)")
            sender = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            with sender:
                sender.sendto(b"through the handshake", ("127.0.0.1", 9999))
            wait_until(lambda: b"through the handshake" in backend.received, "the packet")
            wait_until(lambda: backend.sent_back is not None, "the guest's byte back")
            assert backend.sent_back is True
            assert backend.received[0] == 0x45  # the packet, from its IPv4 header on
        finally:
            assert proxy.stop() == 0
    assert backend.lines == [b"CONNECT 1200\n"]


def test_every_command_takes_vsock_uds() -> None:
    commands = proxy_commands()
    assert len(commands) == 12
    for name, command in commands.items():
        assert any("--vsock-uds" in param.opts for param in command.params), name
