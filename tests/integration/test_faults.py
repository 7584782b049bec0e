"""Faults, as the real console scripts meet them over the emulation: a clean half-close,
descriptor exhaustion, connect timeouts and systemd readiness. Loopback only (plus one network
namespace of the test's own for a black-holed upstream).

The failures that cross a vsock hop (resets, refused and missing upstreams, idle and drain
timeouts, shutdown, restarted upstreams) are in test_vsock_failures.py, which runs over real
vsock in the guest stage too.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.helpers import (
    EchoServer,
    Proxy,
    closed,
    exchange,
    free_port,
    read_until_end,
    recv_exactly,
    running,
)
from tests.netns import netns

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
WAIT = 30.0  # the longest any single step may take before the test fails


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def vsock_env(tmp_path: Path) -> dict[str, str]:
    """Emulated vsock in a fresh directory (default relay path)."""
    vsock_dir = tmp_path / "vsock"
    vsock_dir.mkdir()
    return {"PF_PROXY_VSOCK_DIR": str(vsock_dir)}


def vsock_path(env: dict[str, str], cid: int, port: int) -> str:
    return str(Path(env["PF_PROXY_VSOCK_DIR"]) / f"{cid}_{port}.sock")


def unix_client(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(path)
    return sock


def unix_listener(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    sock.settimeout(WAIT)
    return sock


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- (a) resets are not clean ends ----------------------------------------------------------


def test_clean_eof_stays_a_half_close(env: dict[str, str], tmp_path: Path) -> None:
    """The upstream ends its side first: the client gets everything and a clean EOF, and can
    still send; the upstream receives it."""
    with unix_listener(vsock_path(env, 88, 5001)) as listener:
        port = free_port()
        with running(
            "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", "88:5001", log_dir=tmp_path, env=env
        ) as proxy:
            response = os.urandom(4 * MiB)
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
                upstream, _ = listener.accept()
                with upstream:
                    upstream.settimeout(WAIT)
                    client.sendall(b"request")
                    assert recv_exactly(upstream, 7) == b"request"

                    def respond() -> None:  # while the client reads: 4 MiB need not fit in buffers
                        upstream.sendall(response)
                        upstream.shutdown(socket.SHUT_WR)

                    responder = threading.Thread(target=respond)
                    responder.start()
                    received, ending = read_until_end(client)
                    responder.join(WAIT)
                    assert ending == "eof"
                    assert hashlib.sha256(received).digest() == hashlib.sha256(response).digest()
                    client.sendall(b"after the upstream's EOF")
                    assert recv_exactly(upstream, 24) == b"after the upstream's EOF"
                    client.shutdown(socket.SHUT_WR)
                    assert upstream.recv(1) == b""
            proxy.wait_for("vsock to ip IO copy done, from vsock 88:5001 to 127.0.0.1:")
            proxy.wait_for("ip to vsock IO copy done, from 127.0.0.1:")
            assert "Failed" not in proxy.stderr


# --- (b) descriptor exhaustion --------------------------------------------------------------


def test_connections_beyond_the_open_file_limit_wait_and_are_served(
    vsock_env: dict[str, str], echo: EchoServer, tmp_path: Path
) -> None:
    """Under RLIMIT_NOFILE 128, more connections than fit: the rest wait in the backlog (not
    accepted and reset), one line is logged, the proxy sleeps, and each is served in turn."""
    proxy = Proxy(
        ["vsock-to-ip", "-v", "88:4000", "-i", f"127.0.0.1:{echo.port}"],
        tmp_path,
        vsock_env,
        prefix=["prlimit", "--nofile=128:128"],
    )
    try:
        proxy.wait_ready()
        found = re.search(
            r"Accepting up to (\d+) connections at once \(open file limit 128,", proxy.stdout
        )
        assert found, proxy.stdout
        limit = int(found.group(1))
        assert 8 <= limit < 64  # what fits in 128 descriptors, two sockets each

        path = vsock_path(vsock_env, 88, 4000)
        clients = [unix_client(path) for _ in range(limit + 24)]
        for index, client in enumerate(clients):
            client.sendall(b"%05d" % index)
        for index, client in enumerate(clients[:limit]):
            assert recv_exactly(client, 5) == b"%05d" % index
        proxy.wait_for("Not accepting on vsock 88:4000 for now: ", stream="stderr")
        assert f"{limit} connections open, the limit" in proxy.stderr

        cpu_before, wall_before = cpu_seconds(proxy.process.pid), time.monotonic()
        time.sleep(2)
        cpu = cpu_seconds(proxy.process.pid) - cpu_before
        assert cpu < (time.monotonic() - wall_before) / 2, f"{cpu:.2f} s CPU while waiting"
        for client in clients[limit:]:  # still waiting: nothing echoed, nothing reset
            client.setblocking(False)
            with pytest.raises(BlockingIOError):
                client.recv(5)
            client.settimeout(WAIT)

        # As each served connection ends, the next waiting one is accepted and served.
        for index, client in enumerate(clients):
            if index >= limit:
                assert recv_exactly(client, 5) == b"%05d" % index
            client.close()
        proxy.wait_for("Accepting on vsock 88:4000 again: no connection waiting")
        assert proxy.stderr.count("Not accepting on") == 1
        assert "Closing connection" not in proxy.stderr
        assert "Failed" not in proxy.stderr
        assert exchange(path, b"afterwards", family=socket.AF_UNIX) == b"afterwards"
    finally:
        assert proxy.stop() == 0


# The real vsock-to-ip, plus one thing: SIGUSR1 makes it take every free descriptor, SIGUSR2
# gives them back. That brings about EMFILE in accept() and in the relay at a chosen moment.
_DESCRIPTOR_HOG = """
import os, signal, sys
from pf_proxy.cli.tcp import vsock_to_ip

held = []

def take(signum, frame):
    while True:
        try:
            held.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            break
    print(f"holding {len(held)} descriptors", flush=True)

def give_back(signum, frame):
    for fd in held:
        os.close(fd)
    print(f"gave back {len(held)} descriptors", flush=True)
    held.clear()

signal.signal(signal.SIGUSR1, take)
signal.signal(signal.SIGUSR2, give_back)
vsock_to_ip.main(sys.argv[1:], prog_name="vsock-to-ip")
"""


def test_emfile_in_accept_and_relay_pauses_logs_once_and_recovers(
    vsock_env: dict[str, str], echo: EchoServer, tmp_path: Path
) -> None:
    proxy = Proxy(
        [sys.executable, "-c", _DESCRIPTOR_HOG, "-v", "88:4000", "-i", f"127.0.0.1:{echo.port}"],
        tmp_path,
        vsock_env,
        prefix=["prlimit", "--nofile=4096:4096"],  # a bounded number of descriptors to take
    )
    path = vsock_path(vsock_env, 88, 4000)
    try:
        proxy.wait_ready()
        live = unix_client(path)  # connected upstream, but no byte relayed yet: no pipe
        proxy.wait_for(f"Proxying to: 127.0.0.1:{echo.port}")
        os.kill(proxy.process.pid, signal.SIGUSR1)
        proxy.wait_for("holding ")

        # A live connection still relays: no pipe to be had, so it copies instead.
        live.sendall(b"while out of descriptors")
        assert recv_exactly(live, 24) == b"while out of descriptors"

        waiting = [unix_client(path) for _ in range(5)]
        for client in waiting:
            client.sendall(b"ping")
        proxy.wait_for(
            "Not accepting on vsock 88:4000 for now: [Errno 24] Too many open files",
            stream="stderr",
        )
        cpu_before, wall_before = cpu_seconds(proxy.process.pid), time.monotonic()
        time.sleep(2)  # accept() is retried now and then, and fails each time
        cpu = cpu_seconds(proxy.process.pid) - cpu_before
        assert cpu < (time.monotonic() - wall_before) / 2, f"{cpu:.2f} s CPU while paused"
        assert proxy.stderr.count("Not accepting on") == 1

        os.kill(proxy.process.pid, signal.SIGUSR2)
        for client in waiting:
            assert recv_exactly(client, 4) == b"ping"
            client.close()
        live.close()
        proxy.wait_for("Accepting on vsock 88:4000 again: no connection waiting")
        assert proxy.stderr.count("Not accepting on") == 1
        assert "Failed" not in proxy.stderr
        assert "Closing connection" not in proxy.stderr
    finally:
        assert proxy.stop() == 0


# --- (c) connect timeout --------------------------------------------------------------------


def assert_connect_times_out(proxy: Proxy, path: str, upstream: str) -> None:
    started = time.monotonic()
    with unix_client(path) as client:
        client.sendall(b"hello?")
        assert closed(client)
    elapsed = time.monotonic() - started
    proxy.wait_for(
        "Closing connection from vsock 88:4000: no upstream within 1 s (connect timeout)",
        stream="stderr",
    )
    assert f"Proxying to: {upstream}" in proxy.stdout  # it did try
    assert elapsed >= 0.9  # not refused at once: it waited for the black hole
    assert proxy.process.poll() is None


def test_connect_timeout_against_a_full_backlog(vsock_env: dict[str, str], tmp_path: Path) -> None:
    """A listener whose accept queue is full drops every SYN: a black hole on loopback."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        address = hole.getsockname()
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(address)
            with running(
                "vsock-to-ip",
                "-v",
                "88:4000",
                "-i",
                f"127.0.0.1:{address[1]}",
                "--connect-timeout",
                "1",
                log_dir=tmp_path,
                env=vsock_env,
            ) as proxy:
                assert_connect_times_out(
                    proxy, vsock_path(vsock_env, 88, 4000), f"127.0.0.1:{address[1]}"
                )
        finally:
            for filler in fillers:
                filler.close()


@pytest.mark.root
def test_connect_timeout_against_a_dropping_firewall(
    vsock_env: dict[str, str], tmp_path: Path
) -> None:
    """In a namespace of its own, iptables drops every SYN to the upstream port."""
    with netns("pfp-ops") as ns:
        ns.run("iptables", "-A", "INPUT", "-p", "tcp", "--dport", "9", "--syn", "-j", "DROP")
        proxy = Proxy(
            ["vsock-to-ip", "-v", "88:4000", "-i", "127.0.0.1:9", "--connect-timeout", "1"],
            tmp_path,
            vsock_env,
            prefix=ns.command([]),
        )
        try:
            proxy.wait_ready()
            assert_connect_times_out(proxy, vsock_path(vsock_env, 88, 4000), "127.0.0.1:9")
        finally:
            assert proxy.stop() == 0


# --- (f) systemd notify ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["path", "abstract"])
def test_systemd_notify_ready_and_stopping(
    where: str, vsock_env: dict[str, str], echo: EchoServer, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        if where == "path":
            address = str(tmp_path / "notify.sock")
            notify.bind(address)
            notify_env = address
        else:
            name = f"pfp-ops-notify-{secrets.token_hex(4)}"
            notify.bind("\0" + name)
            notify_env = "@" + name
        notify.settimeout(WAIT)
        proxy = Proxy(
            ["vsock-to-ip", "-v", "88:4000", "-i", f"127.0.0.1:{echo.port}"],
            tmp_path,
            {**vsock_env, "NOTIFY_SOCKET": notify_env},
        )
        try:
            assert notify.recv(4096) == b"READY=1"
            # ready means listening: a connection right now is served
            path = vsock_path(vsock_env, 88, 4000)
            assert exchange(path, b"ready?", family=socket.AF_UNIX) == b"ready?"
            proxy.process.send_signal(signal.SIGTERM)
            assert notify.recv(4096) == b"STOPPING=1"
            assert proxy.process.wait(WAIT) == 0
            assert "systemd notify" not in proxy.stderr  # no failed sends
        finally:
            proxy.stop()


# --- (e) signals until the very end -----------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["vsock-to-ip", "-v", "88:4000", "-i", "127.0.0.1:9"],
        ["ip-to-vsock", "-i", "127.0.0.1:{port}", "-v", "88:4000", "--workers", "2"],
        ["udp-to-vsock", "-i", "127.0.0.1:{port}", "-v", "88:53"],
        ["vsock-to-ip-raw-outgoing", "-v", "88:1200", "--device", "lo"],
    ],
    ids=["tcp", "tcp-workers", "udp", "raw"],
)
def test_sigterms_after_the_drain_are_ignored_until_exit(
    command: list[str], vsock_env: dict[str, str], tmp_path: Path
) -> None:
    """A second SIGTERM (or SIGINT) is ignored during the drain and after it: the proxy exits
    0 however many come, and whenever, until it is gone (not 143, SIGTERM's default death,
    when one lands between the drain's end and the exit)."""
    args = [part.format(port=free_port()) for part in command]
    for attempt in range(5):
        proxy = Proxy(args, tmp_path, vsock_env)
        try:
            proxy.wait_ready()
            sent = 0
            deadline = time.monotonic() + WAIT
            while proxy.process.poll() is None and time.monotonic() < deadline:
                os.kill(proxy.process.pid, signal.SIGTERM if sent % 2 == 0 else signal.SIGINT)
                sent += 1
                time.sleep(0.0005)
            assert proxy.process.wait(WAIT) == 0, (
                f"try {attempt + 1}, {sent} signals:\n{proxy.stdout}\n{proxy.stderr}"
            )
            assert sent > 1
        finally:
            proxy.stop()
