"""The four raw proxies end to end, in the tuna images' deployment (see tests/integration/tuna.py):
an enclave, a host and an "internet" namespace, MTU 9001, the reference's iptables rules, and
emulated vsock between enclave and host."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.helpers import ThreadedServer, listening_socket
from tests.integration.namespaced import WAIT, NsProxy, in_netns, same_bytes, tcp_socket_in
from tests.integration.prometheus import prometheus
from tests.integration.tuna import (
    MTU,
    RESERVED_SERVER,
    SERVER,
    SHARED,
    deployment,
)
from tests.netns import Netns
from tests.vsocks import Vsock, in_guest

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

MiB = 1 << 20

# --- servers and clients --------------------------------------------------------------------


class Server(ThreadedServer):
    """Per connection: read a request (8 bytes: how many bytes to send back), then send that
    many deterministic bytes and close."""

    def handle(self, conn: socket.socket) -> None:
        request = b""
        while len(request) < 8:
            chunk = conn.recv(8 - len(request))
            if not chunk:
                return
            request += chunk
        conn.sendall(payload(int.from_bytes(request, "big")))


def payload(size: int) -> bytes:
    block = hashlib.sha256(size.to_bytes(8, "big")).digest() * 2048  # 64 KiB, size-dependent
    return (block * (size // len(block) + 1))[:size]


@contextmanager
def server(ns: Netns, address: str, port: int) -> Iterator[Server]:
    running = Server(in_netns(ns, lambda: listening_socket(address, port)))
    try:
        yield running
    finally:
        running.close()


def fetch(ns: Netns, address: str, port: int, size: int, source_port: int = 0) -> bytes:
    """From `ns`, ask the server at address:port for `size` bytes; return what arrived."""
    sock = tcp_socket_in(ns)
    sock.settimeout(WAIT)
    with sock:
        if source_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", source_port))
        sock.connect((address, port))
        sock.sendall(size.to_bytes(8, "big"))
        chunks = []
        while chunk := sock.recv(MiB):
            chunks.append(chunk)
        return b"".join(chunks)


def cannot_connect(ns: Netns, address: str, port: int, source_port: int = 0) -> bool:
    """True when a connection from `ns` to address:port fails (timeout, reset, refused)."""
    sock = tcp_socket_in(ns)
    sock.settimeout(3)
    with sock:
        if source_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", source_port))
        try:
            sock.connect((address, port))
        except OSError:
            return True
        return False


def wait_for_count(running: NsProxy, reason: str, at_least: int = 1) -> None:
    """Wait for a periodic counters line reporting `reason`=N with N >= at_least."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for line in reversed(running.stdout.splitlines()):
            if f"{reason}=" in line:
                count = int(line.split(f"{reason}=")[1].split(",")[0].split(")")[0])
                if count >= at_least:
                    return
                break
        time.sleep(0.1)
    raise AssertionError(f"no {reason}>={at_least} in:\n{running.stdout}\n{running.stderr}")


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.vsock
def test_enclave_fetches_from_the_internet_and_is_reached_from_it(
    tmp_path: Path, vsock_link: Vsock
) -> None:
    with (
        deployment(tmp_path, vsock=vsock_link) as deployed,
        server(deployed.internet, SERVER, 8080) as outside,
        server(deployed.enclave, "0.0.0.0", 8443) as inside,
    ):
        # Outgoing: the enclave's client, several MiB back through both pairs, byte-exact.
        same_bytes(fetch(deployed.enclave, SERVER, 8080, 8 * MiB), payload(8 * MiB))
        # Incoming: a client on the internet reaches the enclave's server at the shared address.
        same_bytes(fetch(deployed.internet, SHARED, 8443, 3 * MiB), payload(3 * MiB))
        assert (outside.connections, inside.connections) == (1, 1)


@contextmanager
def largest_received(ns: Netns, device: str, source: str) -> Iterator[list[int]]:
    """The size of the largest IPv4 packet from `source` that `device` in `ns` receives
    while the block runs."""
    largest = [0]

    def sniff() -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
        sock.bind((device, 0x0800))
        sock.settimeout(0.2)
        return sock

    sniffer = in_netns(ns, sniff)
    stop = threading.Event()

    def collect() -> None:
        while not stop.is_set():
            try:
                packet, (*_, kind, _, _) = sniffer.recvfrom(65536)
            except TimeoutError:
                continue
            if kind == socket.PACKET_HOST and packet[12:16] == socket.inet_aton(source):
                largest[0] = max(largest[0], len(packet))

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        yield largest
    finally:
        stop.set()
        collector.join()
        sniffer.close()


def test_jumbo_packets_cross_whole(tmp_path: Path) -> None:
    """9001-byte packets cross both ways: the enclave's server sends them out through the
    outgoing pair, the internet's server into the enclave through the incoming pair. (The
    host's eth0 sees larger ones: GRO merges what arrives, and nfqueue splits it again.)"""
    with (
        deployment(tmp_path) as deployed,
        server(deployed.internet, SERVER, 8080),
        server(deployed.enclave, "0.0.0.0", 8443),
        largest_received(deployed.enclave, "lo", SERVER) as toward_enclave,
        largest_received(deployed.internet, "eth0", SHARED) as from_enclave,
    ):
        same_bytes(fetch(deployed.enclave, SERVER, 8080, 2 * MiB), payload(2 * MiB))
        same_bytes(fetch(deployed.internet, SHARED, 8443, 2 * MiB), payload(2 * MiB))
    assert (toward_enclave[0], from_enclave[0]) == (MTU, MTU)


def test_forbidden_port_and_reserved_destination_do_not_get_through(tmp_path: Path) -> None:
    with (
        deployment(tmp_path) as deployed,
        server(deployed.enclave, "0.0.0.0", 62000) as host_range_server,
        server(deployed.internet, RESERVED_SERVER, 8080) as reserved,
        server(deployed.internet, SERVER, 8080) as allowed,
    ):
        # A port the host keeps (61440-65535) is never queued to the enclave.
        assert cannot_connect(deployed.internet, SHARED, 62000)
        # A reserved destination is not queued by the enclave's rule: it goes nowhere.
        assert cannot_connect(deployed.enclave, RESERVED_SERVER, 8080)
        # A source port the host keeps is not queued either.
        assert cannot_connect(deployed.enclave, SERVER, 8080, source_port=61500)
        assert (host_range_server.connections, reserved.connections, allowed.connections) == (
            0,
            0,
            0,
        )
        # ...while the same server on an allowed path answers.
        same_bytes(fetch(deployed.enclave, SERVER, 8080, 1000), payload(1000))
        assert allowed.connections == 1


def test_the_proxy_filters_even_when_the_enclave_queues_everything(tmp_path: Path) -> None:
    """With a careless enclave rule (all TCP queued), vsock-to-ip-raw-outgoing still drops
    packets to reserved destinations and from the host's ports, and counts them."""
    with (
        deployment(tmp_path, enclave_rule="all-tcp") as deployed,
        server(deployed.internet, RESERVED_SERVER, 8080) as reserved,
        server(deployed.internet, SERVER, 8080) as allowed,
    ):
        outgoing = deployed.proxies["vsock-to-ip-raw-outgoing"]
        assert cannot_connect(deployed.enclave, RESERVED_SERVER, 8080)
        wait_for_count(outgoing, "reserved-destination")
        assert cannot_connect(deployed.enclave, SERVER, 8080, source_port=61500)
        wait_for_count(outgoing, "forbidden-source-port")
        assert (reserved.connections, allowed.connections) == (0, 0)
        same_bytes(fetch(deployed.enclave, SERVER, 8080, MiB), payload(MiB))


# In the guest (software emulation: about a minute each) one listener and one connecting side.
RESTARTED = (
    ["vsock-to-ip-raw-outgoing", "ip-to-vsock-raw-incoming"]
    if in_guest()
    else [
        "vsock-to-ip-raw-outgoing",
        "vsock-to-ip-raw-incoming",
        "ip-to-vsock-raw-outgoing",
        "ip-to-vsock-raw-incoming",
    ]
)


@pytest.mark.parametrize("command", RESTARTED)
@pytest.mark.vsock
def test_a_proxy_killed_and_restarted_mid_connection(
    tmp_path: Path, command: str, vsock_link: Vsock
) -> None:
    """The others reconnect by themselves; an open TCP connection carries on (TCP retransmits
    what was lost while the proxy was down) and new connections work."""
    with (
        deployment(tmp_path, vsock=vsock_link) as deployed,
        server(deployed.internet, SERVER, 8080),
    ):
        sock = tcp_socket_in(deployed.enclave)
        sock.settimeout(WAIT * 2)
        with sock:
            sock.connect((SERVER, 8080))
            deployed.kill(command)
            sock.sendall((4 * MiB).to_bytes(8, "big"))  # sent while the proxy is down
            time.sleep(0.5)
            deployed.start(command)
            chunks = []
            while chunk := sock.recv(MiB):
                chunks.append(chunk)
        same_bytes(b"".join(chunks), payload(4 * MiB))
        same_bytes(fetch(deployed.enclave, SERVER, 8080, MiB), payload(MiB))


def test_garbage_on_the_outgoing_listener_is_dropped_and_the_link_recovers(
    tmp_path: Path,
) -> None:
    with deployment(tmp_path) as deployed, server(deployed.internet, SERVER, 8080):
        outgoing = deployed.proxies["vsock-to-ip-raw-outgoing"]
        path = deployed.vsock.path(deployed.to_host[0])
        garbage = {
            "IP version 6 is not 4": b"\x60" + bytes(40),
            "total length 5 is under 20": b"\x45\x00\x00\x05" + bytes(30),
            "header length 4 words is under 5": b"\x44\x00\x00\x28" + bytes(40),
        }
        for count, (complaint, data) in enumerate(garbage.items(), start=1):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as intruder:
                intruder.connect(str(path))
                intruder.sendall(data)
                outgoing.wait_for(complaint, stream="stderr")
            assert outgoing.stderr.count("malformed packet stream") == count
        # The enclave's own link was replaced by the intruders; it reconnects on its next send.
        same_bytes(fetch(deployed.enclave, SERVER, 8080, 2 * MiB), payload(2 * MiB))
        assert outgoing.process.poll() is None


def test_prometheus_scrapes_the_host_side_raw_proxies(tmp_path: Path) -> None:
    """Known traffic through the deployment; a Prometheus server in the host namespace reads
    what ip-to-vsock-raw-incoming and vsock-to-ip-raw-outgoing forwarded, their links' state
    and reconnects, and the kernel's counters of the nfqueue."""
    ports = {"ip-to-vsock-raw-incoming": 9101, "vsock-to-ip-raw-outgoing": 9102}
    extra = {command: ["--metrics", f"127.0.0.1:{port}"] for command, port in ports.items()}
    incoming, outgoing = (f'instance="127.0.0.1:{port}"' for port in ports.values())
    targets = [f"127.0.0.1:{port}" for port in ports.values()]
    with (
        deployment(tmp_path, extra_args=extra) as deployed,
        server(deployed.internet, SERVER, 8080),
        prometheus(tmp_path, targets, deployed.host) as ask,
    ):
        same_bytes(fetch(deployed.enclave, SERVER, 8080, MiB), payload(MiB))
        for instance in (incoming, outgoing):
            ask.wait_for(f"pf_proxy_raw_link_up{{{instance}}}", 1)
            ask.wait_for(f"pf_proxy_raw_link_connects_total{{{instance}}}", 1)
            forwarded = ask.value(f"pf_proxy_raw_forwarded_bytes_total{{{instance}}}") or 0
            assert forwarded > (MiB if instance == incoming else 0), (instance, forwarded)
        ask.wait_for(f'pf_proxy_nfqueue_dropped_packets_total{{{incoming},cause="user"}}', 0)
        assert ask.value(f"pf_proxy_nfqueue_waiting_packets{{{incoming}}}") is not None
        ask.wait_for(f'pf_proxy_info{{{outgoing},command="vsock-to-ip-raw-outgoing"}}', 1)

        # The enclave's listener goes away: the host's link breaks at its next packet (the
        # answer to a SYN from the enclave), and is made again once the listener is back.
        deployed.kill("vsock-to-ip-raw-incoming")
        assert cannot_connect(deployed.enclave, SERVER, 8080)
        ask.wait_for(f"pf_proxy_raw_link_up{{{incoming}}}", 0)
        lost = f'pf_proxy_raw_dropped_packets_total{{{incoming},reason="vsock-link-down"}}'
        ask.wait_for(f"clamp_max({lost}, 1)", 1)  # at least one packet in hand was lost
        deployed.start("vsock-to-ip-raw-incoming")
        ask.wait_for(f"pf_proxy_raw_link_up{{{incoming}}}", 1)
        ask.wait_for(f"pf_proxy_raw_link_connects_total{{{incoming}}}", 2)
