"""The proxies across a real hybrid vsock: vhost-device-vsock, and a QEMU guest behind it.

Host-side proxies run here with --vsock-uds on the backend's uds_path; guest-side proxies run
in the guest (through tests.hybrid.agent) over real AF_VSOCK, where the host is CID 2. One
guest boot serves every test; the guest's long-running processes start once, together
(`guest_side`). What each pitfall of the protocol (/work/shared/hybrid/README.md) does to the
proxies is a test of its own. The backend's death is the last test: the guest's vsock does
not come back from it.

    host                                   guest (CID 3)
    client -> ip-to-vsock --vsock-uds  ->  vsock-to-ip :6000 -> echo :7000
                                       ->  vsock-to-ip :6001 -> reply :7001
    echo <- vsock-to-ip --vsock-uds    <-  ip-to-vsock :7100 -> CID 2:6100 <- client
    echo <- vsock-to-ip-transparent    <-  ip-to-vsock-transparent :7200 <- REDIRECT <- client
    dnsmasq <- vsock-to-udp            <-  udp-to-vsock :5353 -> CID 2:6053 <- dig
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hybrid import AGENT_ENV, BACKEND_PID_ENV, CID_ENV, UDS_ENV
from tests.hybrid.agent import GuestAgent, GuestProcess
from tests.integration.dnsserver import dnsmasq
from tests.integration.echo_process import reply_for
from tests.integration.helpers import (
    EchoServer,
    Proxy,
    closed,
    exchange,
    free_port,
    read_until_end,
    recv_exactly,
    round_trip,
    running,
    socket_fds,
    wait_until,
)
from tests.integration.namespaced import NsProxy
from tests.netns import netns

pytestmark = [pytest.mark.hybrid, pytest.mark.timeout(900)]

WAIT = 120.0  # a step that involves the guest (under TCG a Python start takes seconds)
ANY = 4294967295
REQUEST_SIZE = 1000
MiB = 1 << 20


@pytest.fixture(scope="module")
def guest() -> GuestAgent:
    return GuestAgent(Path(os.environ[AGENT_ENV]), timeout=WAIT)


@pytest.fixture(scope="module")
def uds() -> str:
    return os.environ[UDS_ENV]


@pytest.fixture(scope="module")
def cid() -> int:
    return int(os.environ[CID_ENV])


@dataclass
class GuestSide:
    processes: dict[str, GuestProcess]


GUEST_PROCESSES = {  # name: (argv, what it prints once it serves)
    "echo": (["python", "-m", "tests.integration.echo_process", "tcp-loop", "127.0.0.1",
              "7000"], "ready"),
    "reply": (["python", "-m", "tests.integration.echo_process", "tcp-reply", "127.0.0.1",
               "7001", str(REQUEST_SIZE)], "ready"),
    "to echo": (["vsock-to-ip", "-v", f"{ANY}:6000", "-i", "127.0.0.1:7000"], "Listening on:"),
    "to reply": (["vsock-to-ip", "-v", f"{ANY}:6001", "-i", "127.0.0.1:7001"], "Listening on:"),
    "to host": (["ip-to-vsock", "-i", "127.0.0.1:7100", "-v", "2:6100"], "Listening on:"),
    "transparent": (["ip-to-vsock-transparent", "-i", "127.0.0.1:7200", "-v", "2:6200"],
                    "Listening on:"),
    "dns": (["udp-to-vsock", "-i", "127.0.0.1:5353", "-v", "2:6053"], "Listening on:"),
}  # fmt: skip


@pytest.fixture(scope="module")
def guest_side(guest: GuestAgent) -> Iterator[GuestSide]:
    """The guest's servers and proxies, started together (each Python start costs seconds
    under TCG) and stopped at the end."""
    started = {name: guest.start(*argv) for name, (argv, _) in GUEST_PROCESSES.items()}
    try:
        for name, (_, ready) in GUEST_PROCESSES.items():
            started[name].wait_for(ready, timeout=WAIT)
        yield GuestSide(started)
    finally:
        for process in started.values():
            process.stop()


GUEST_CLIENT = """
import hashlib, socket, sys, threading
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = bytes(range(256)) * (size // 256)
with socket.create_connection((host, port), timeout=60) as sock:
    sender = threading.Thread(target=sock.sendall, args=(data,))
    sender.start()
    got = bytearray()
    while len(got) < len(data) and (chunk := sock.recv(1 << 16)):
        got += chunk
    sender.join()
print(len(got), hashlib.sha256(got).digest() == hashlib.sha256(data).digest())
"""


def guest_exchange(guest: GuestAgent, host: str, port: int, size: int) -> str:
    """A client in the guest sends `size` bytes to host:port and reads as many back (no
    half-close: it does not cross hybrid vsock); what it printed."""
    done = guest.run("python", "-c", GUEST_CLIENT, host, str(port), str(size), timeout=WAIT)
    assert done.returncode == 0, done
    return done.stdout.strip()


@contextmanager
def host_proxy(*args: str, log_dir: Path) -> Iterator[Proxy]:
    with running(*args, log_dir=log_dir) as proxy:
        proxy.timeout = WAIT
        yield proxy


@contextmanager
def ip_to_guest(guest_port: int, *extra: str, log_dir: Path) -> Iterator[tuple[int, Proxy]]:
    """ip-to-vsock here on a free port, to the guest's `guest_port` over hybrid vsock."""
    port = free_port()
    address = f"{os.environ[CID_ENV]}:{guest_port}"
    with host_proxy(
        "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", address,
        "--vsock-uds", os.environ[UDS_ENV], *extra, log_dir=log_dir,
    ) as proxy:  # fmt: skip
        yield port, proxy


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
        text: str = response.read().decode()
        return text


def handshakes(port: int, outcome: str) -> int:
    found = re.search(
        rf'^pf_proxy_vsock_hybrid_handshakes_total{{outcome="{outcome}"}} (\d+)\.0$',
        scrape(port),
        re.M,
    )
    assert found, scrape(port)
    return int(found.group(1))


# --- both ways across the VM boundary --------------------------------------------------------


def test_ip_to_vsock_on_the_host_reaches_vsock_to_ip_in_the_guest(
    guest_side: GuestSide, uds: str, cid: int, tmp_path: Path
) -> None:
    metrics = free_port()
    with ip_to_guest(6000, "--metrics", f"127.0.0.1:{metrics}", log_dir=tmp_path) as (port, proxy):
        for size in (1, 64 * 1024, 8 * MiB):
            payload = os.urandom(size)
            assert round_trip(port, payload) == payload
        proxy.wait_for(f"Proxying to: hybrid vsock {cid}:6000 ({uds})")
        assert handshakes(metrics, "connected") == 3
    guest_side.processes["to echo"].wait_for("vsock to ip IO copy done, from vsock 2:")


def test_ip_to_vsock_in_the_guest_reaches_vsock_to_ip_on_the_host(
    guest_side: GuestSide, guest: GuestAgent, uds: str, echo: EchoServer, tmp_path: Path
) -> None:
    with host_proxy(
        "vsock-to-ip", "-v", "2:6100", "-i", f"127.0.0.1:{echo.port}", "--vsock-uds", uds,
        log_dir=tmp_path,
    ) as proxy:  # fmt: skip
        proxy.wait_for(f"Listening on: hybrid vsock 2:6100 ({uds})")
        assert guest_exchange(guest, "127.0.0.1", 7100, 4 * MiB) == f"{4 * MiB} True"
        proxy.wait_for("ip to vsock IO copy done")  # the echo's end, passed to the guest
    assert echo.connections == 1


def test_the_transparent_pair_from_the_guest_to_the_host(
    guest_side: GuestSide, guest: GuestAgent, uds: str, echo: EchoServer, tmp_path: Path
) -> None:
    """A guest client's connection to 127.0.0.1:<the host echo's port> is redirected to
    ip-to-vsock-transparent, which sends it with its original destination to the host's
    vsock-to-ip-transparent, which connects there: to the host's echo server."""
    rule = ["OUTPUT", "-p", "tcp", "-d", "127.0.0.1", "--dport", str(echo.port),
            "-j", "REDIRECT", "--to-ports", "7200"]  # fmt: skip
    assert guest.run("iptables", "-t", "nat", "-A", *rule).returncode == 0
    try:
        with host_proxy(
            "vsock-to-ip-transparent", "-v", "2:6200", "--vsock-uds", uds, log_dir=tmp_path
        ) as proxy:
            assert guest_exchange(guest, "127.0.0.1", echo.port, MiB) == f"{MiB} True"
            proxy.wait_for(f"Proxying to: 127.0.0.1:{echo.port}")
        guest_side.processes["transparent"].wait_for(f"Original destination: 127.0.0.1:{echo.port}")
    finally:
        guest.run("iptables", "-t", "nat", "-D", *rule)


@pytest.mark.root
def test_dns_through_udp_to_vsock_in_the_guest_and_vsock_to_udp_on_the_host(
    guest_side: GuestSide, guest: GuestAgent, uds: str, tmp_path: Path
) -> None:
    """dig in the guest asks udp-to-vsock, whose stream crosses to the host's vsock-to-udp
    (in a namespace of its own, with dnsmasq; the uds_path reaches into it)."""
    with (
        netns("pfp-hybrid-dns") as ns,
        dnsmasq(ns, "127.0.0.1", tmp_path, hosts={"api.example.test": ["192.0.2.80"]}) as dns,
    ):
        proxy = NsProxy(ns, ["vsock-to-udp", "-v", "2:6053", "-i", f"127.0.0.1:{dns.port}",
                             "--vsock-uds", uds], tmp_path, {})  # fmt: skip
        try:
            proxy.wait_for("Listening on:")
            done = guest.run(
                "dig", "@127.0.0.1", "-p", "5353", "+short", "+tries=1", "+time=60",
                "api.example.test", timeout=WAIT,
            )  # fmt: skip
            assert done.stdout.strip() == "192.0.2.80", done
        finally:
            assert proxy.stop() == 0


# --- the protocol's pitfalls, one test each ----------------------------------------------------


def test_connect_before_the_guest_listens_is_retried_until_it_does(
    guest_side: GuestSide, guest: GuestAgent, uds: str, cid: int, tmp_path: Path
) -> None:
    """The client's connection waits while nothing listens on the guest port (the backend
    closes each CONNECT: no listener); once the guest's proxy is up, it goes through with the
    bytes the client sent meanwhile."""
    metrics = free_port()
    with ip_to_guest(
        6002, "--connect-timeout", str(WAIT), "--metrics", f"127.0.0.1:{metrics}", log_dir=tmp_path
    ) as (port, _):
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
            client.sendall(b"sent before anyone listened")
            wait_until(lambda: handshakes(metrics, "no_listener") > 0, "a refused CONNECT")
            late = guest.start("vsock-to-ip", "-v", f"{ANY}:6002", "-i", "127.0.0.1:7000")
            try:
                assert recv_exactly(client, 27) == b"sent before anyone listened"
            finally:
                late.stop()
        assert handshakes(metrics, "connected") == 1
        assert handshakes(metrics, "no_listener") > 1


def test_a_guest_port_with_no_listener_ends_the_connection_saying_so(
    uds: str, cid: int, tmp_path: Path
) -> None:
    with ip_to_guest(6999, "--connect-timeout", "2", log_dir=tmp_path) as (port, proxy):
        before = socket_fds(proxy.process.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
            client.sendall(b"anyone there?")
            assert closed(client)
        proxy.wait_for(
            f"failed to connect to hybrid vsock {cid}:6999 ({uds}): no listener: CONNECT 6999: "
            "the backend closed without answering (nothing listens on guest port 6999, or not "
            "yet); retried ",
            stream="stderr",
        )
        wait_until(lambda: socket_fds(proxy.process.pid) == before, "the sockets released")


def test_data_waits_for_ok(guest_side: GuestSide, uds: str, cid: int, tmp_path: Path) -> None:
    """The backend drops what comes with the CONNECT line (shown first, on the socket
    itself); the proxy sends nothing before OK, so a client's first bytes, sent at once,
    all arrive."""
    with socket.socket(socket.AF_UNIX) as direct:
        direct.settimeout(WAIT)
        direct.connect(uds)
        direct.sendall(b"CONNECT 6000\nsent too early")
        assert direct.recv(64) == b"OK 6000\n"
        direct.sendall(b"then")
        assert recv_exactly(direct, 4) == b"then"  # "sent too early" never reached the guest
    with ip_to_guest(6000, log_dir=tmp_path) as (port, _):
        payload = os.urandom(MiB)  # all of it on its way before the handshake can be done
        assert round_trip(port, payload) == payload


def test_a_client_half_close_still_gets_the_whole_reply(
    guest_side: GuestSide, uds: str, cid: int, tmp_path: Path
) -> None:
    """The client sends its request and half-closes. Passed on, that would be a full
    shutdown for the guest, and its reply would fail; held, the reply comes back whole. The
    guest's end does not cross either (vsock-to-ip in the guest half-closes after the
    reply), so the idle timeout ends the connection, cleanly."""
    request = os.urandom(REQUEST_SIZE)
    with ip_to_guest(6001, "--idle-timeout", "3", log_dir=tmp_path) as (port, proxy):
        assert exchange(("127.0.0.1", port), request, timeout=WAIT) == reply_for(request)
        proxy.wait_for("(end held: the upstream cannot take a half-close")
        proxy.wait_for("idle for 3 s with the client's end held")
    assert "Failed to transfer data" not in proxy.stderr


# --- last: the backend dies, and the guest's vsock with it -------------------------------------


def test_the_backend_dying_mid_stream_ends_the_connection_and_frees_its_sockets(
    guest_side: GuestSide, uds: str, cid: int, tmp_path: Path
) -> None:
    with ip_to_guest(6000, "--connect-timeout", "2", log_dir=tmp_path) as (port, proxy):
        before = socket_fds(proxy.process.pid)
        client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        received = bytearray()
        stop = threading.Event()

        chunk = os.urandom(64 * 1024)

        def stream() -> None:
            try:
                while not stop.is_set():
                    client.sendall(chunk)
            except OSError:
                pass

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        with client:
            while len(received) < 4 * MiB:
                received += client.recv(1 << 20)
            os.kill(int(os.environ[BACKEND_PID_ENV]), signal.SIGKILL)
            rest, ending = read_until_end(client)
            stop.set()
        sender.join(WAIT)
        assert ending in ("eof", "reset"), ending
        wait_until(lambda: socket_fds(proxy.process.pid) == before, "the sockets released")
        # The VM's vsock is gone: a new connection is refused, saying why, and costs nothing.
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as late:
            assert closed(late)
        proxy.wait_for(f"failed to connect to hybrid vsock {cid}:6000 ({uds}): not up:",
                       stream="stderr")  # fmt: skip
        wait_until(lambda: socket_fds(proxy.process.pid) == before, "the sockets released")
        assert proxy.process.poll() is None
    # What came back before the end is the echo of what was sent, in order: the backend's
    # death cut the stream, it did not garble it. (Whether anything was still in flight after
    # the kill is chance: the reads may stop on a chunk boundary with nothing queued.)
    echoed = bytes(received + rest)
    whole = chunk * (len(echoed) // len(chunk) + 1)
    assert echoed == whole[: len(echoed)]
