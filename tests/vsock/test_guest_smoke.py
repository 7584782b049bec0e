"""Smoke test of the guest stage (`make test-guest`): real AF_VSOCK over vsock_loopback, and
network namespaces with iptables REDIRECT, NFQUEUE and ipset, inside the QEMU guest.

Marked `guest`: the host's `make test` deselects it (`-m "not guest"`), the guest stage selects
it. Outside the guest tests/conftest.py skips it (fails it with PF_PROXY_REQUIRE_GUEST=1) before
any AF_VSOCK socket is made: this machine's own vsock must never be touched.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import sys

import pytest

from tests.netns import netns

pytestmark = pytest.mark.guest

VMADDR_CID_LOCAL = 1  # vsock_loopback: this guest's own listeners


def vsock_socket() -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.settimeout(30)
    return sock


def test_vsock_loopback_stream_both_ways_and_half_close() -> None:
    with vsock_socket() as listener:
        listener.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
        listener.listen(8)
        port = listener.getsockname()[1]
        with vsock_socket() as client:
            client.connect((VMADDR_CID_LOCAL, port))
            server, peer = listener.accept()
            with server:
                server.settimeout(30)
                assert peer[0] == VMADDR_CID_LOCAL
                client.sendall(b"ping" * 10_000)
                received = b""
                while len(received) < 40_000:
                    received += server.recv(1 << 16)
                assert received == b"ping" * 10_000
                client.shutdown(socket.SHUT_WR)
                assert server.recv(1) == b""  # EOF after the half-close...
                server.sendall(b"still open the other way")  # ...and the other way still works
                server.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := client.recv(1024):
                    reply += chunk
                assert reply == b"still open the other way"


def test_vsock_connect_to_a_closed_port_is_reset() -> None:
    with vsock_socket() as listener:  # bound, not listening: a port nobody accepts on
        listener.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
        port = listener.getsockname()[1]
        with vsock_socket() as client, pytest.raises(OSError) as failure:
            client.connect((VMADDR_CID_LOCAL, port))
        assert failure.value.errno == errno.ECONNRESET


# Run in the namespace: listen on PORT, connect to port 81, which the nat rule redirects there;
# print what arrived, the port it arrived on and the original destination port.
REDIRECTED_CLIENT = """
import socket, struct, sys
port = int(sys.argv[1])
listener = socket.create_server(("127.0.0.1", port))
with socket.create_connection(("127.0.0.1", 81), timeout=30) as client:
    conn, _ = listener.accept()
    original = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST: a sockaddr_in
    client.sendall(b"hello")
    print(conn.recv(5).decode(), conn.getsockname()[1], struct.unpack_from("!H", original, 2)[0])
"""


def test_netns_iptables_redirect_nfqueue_ipset() -> None:
    with netns("pfp-guest-smoke") as ns:
        ns.run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1",
               "--dport", "81", "-j", "REDIRECT", "--to-ports", "1200")  # fmt: skip
        out = ns.run(sys.executable, "-c", REDIRECTED_CLIENT, "1200").stdout.split()
        assert out == ["hello", "1200", "81"]
        ns.run("ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "81",
               "-j", "REDIRECT", "--to-ports", "1200")  # fmt: skip
        # the kinds of rules the raw proxies' deployments use can be made
        ns.run("ipset", "create", "portfilter", "bitmap:port", "range", "0-65535")
        ns.run("iptables", "-A", "OUTPUT", "-p", "udp", "-m", "set", "--match-set",
               "portfilter", "dst", "-j", "NFQUEUE", "--queue-num", "0")  # fmt: skip
        rules = ns.run("iptables-save").stdout
        assert "REDIRECT" in rules and "NFQUEUE" in rules, rules
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ns.name not in names
