"""Faults, as the real console scripts meet them: resets, descriptor exhaustion, timeouts,
shutdown, systemd readiness and restarted upstreams. Emulated vsock, loopback only (plus one
network namespace of the test's own for a black-holed upstream).

About resets across vsock: a vsock stream has no reset that its reader can tell from an end
(virtio-vsock delivers RST as EOF), and the emulation behaves alike: closing a Unix socket
gives its peer EOF, or ECONNRESET only if the closing side left bytes unread. So a reset is
carried to TCP peers (SO_LINGER 0), and to a vsock peer only as far as vsock can carry it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.helpers import EchoServer, Proxy, exchange, free_port, running, wait_until
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


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return data


def read_until_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything received, and how the stream ended: "eof" or "reset"."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), "reset"
    return b"".join(chunks), "eof"


def closed(sock: socket.socket) -> bool:
    """True once the peer has closed (EOF or reset); waits up to the socket's timeout."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def queued_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's receive queue (FIONREAD)."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    value: int = struct.unpack("i", raw)[0]
    return value


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def echo_process(*args: str, log_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """tests.integration.echo_process as a process of its own, killed (by pid) at the end."""
    errors = open(log_dir / f"echo-{time.monotonic_ns()}.err", "w")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.echo_process", *args],
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(WAIT)
        errors.close()


# --- (a) resets are not clean ends ----------------------------------------------------------


def test_reset_by_the_vsock_upstream_reaches_the_tcp_client_as_a_reset(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The upstream dies with bytes unread (ECONNRESET at the proxy): the client is reset."""
    with unix_listener(vsock_path(env, 88, 5000)) as listener:
        port = free_port()
        with running(
            "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", "88:5000", log_dir=tmp_path, env=env
        ) as proxy:
            client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            client_port = client.getsockname()[1]
            with client:
                upstream, _ = listener.accept()
                client.sendall(b"request the upstream never reads")
                wait_until(
                    lambda: queued_bytes(upstream) == 32,
                    "the request at the upstream",
                    timeout=WAIT,
                )
                upstream.sendall(b"partial response")
                upstream.close()  # with the request unread: the proxy's next read fails
                received, ending = read_until_end(client)
            assert ending == "reset", f"clean EOF after {received!r}: truncation looks complete"
            assert b"partial response".startswith(received)
            proxy.wait_for(
                "Failed to transfer data: error=[Errno 104] Connection reset by peer "
                f"(between 127.0.0.1:{client_port} and vsock 88:5000",
                stream="stderr",
            )


def test_reset_by_the_tcp_upstream_reaches_an_uploading_vsock_client(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The upstream resets (SO_LINGER 0) while the vsock client uploads: the client, whose
    bytes the proxy holds unread, sees ECONNRESET, not a clean end."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(WAIT)
        port = server.getsockname()[1]
        with running(
            "vsock-to-ip", "-v", "88:4000", "-i", f"127.0.0.1:{port}", log_dir=tmp_path, env=env
        ) as proxy:
            client = unix_client(vsock_path(env, 88, 4000))
            errors: list[BaseException] = []

            def upload() -> None:
                try:
                    client.sendall(os.urandom(64 * MiB))
                except OSError as exc:
                    errors.append(exc)

            uploader = threading.Thread(target=upload)
            with client:
                uploader.start()
                upstream, _ = server.accept()
                # Never read: wait until the upload has filled every buffer on the way.
                last, steady_since = -1, time.monotonic()
                while time.monotonic() - steady_since < 1.0:
                    now = queued_bytes(upstream)
                    if now != last:
                        last, steady_since = now, time.monotonic()
                    time.sleep(0.05)
                upstream.sendall(b"partial response")
                upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                upstream.close()
                received, ending = read_until_end(client)
                uploader.join(WAIT)
            assert ending == "reset", f"clean EOF after {received!r}"
            assert b"partial response".startswith(received)
            assert errors and isinstance(errors[0], (ConnectionResetError, BrokenPipeError))
            proxy.wait_for("Failed to transfer data: error=", stream="stderr")
            assert f"(between vsock 88:4000 and 127.0.0.1:{port}," in proxy.stderr


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
            r"Accepting up to (\d+) connections at once \(open file limit 128\)", proxy.stdout
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


# --- (d) idle timeout -----------------------------------------------------------------------


def test_idle_timeout_closes_the_idle_connection_not_the_busy_one(
    vsock_env: dict[str, str], echo: EchoServer, tmp_path: Path
) -> None:
    with running(
        "vsock-to-ip",
        "-v",
        "88:4000",
        "-i",
        f"127.0.0.1:{echo.port}",
        "--idle-timeout",
        "3",
        log_dir=tmp_path,
        env=vsock_env,
    ) as proxy:
        path = vsock_path(vsock_env, 88, 4000)
        idle, busy = unix_client(path), unix_client(path)
        stop = threading.Event()
        sent = bytearray()
        received = bytearray()

        def keep_busy() -> None:  # a byte every 50 ms, far inside the 3 s idle timeout
            while not stop.is_set():
                byte = secrets.token_bytes(1)
                busy.sendall(byte)
                sent.extend(byte)
                received.extend(recv_exactly(busy, 1))
                time.sleep(0.05)

        with idle, busy:
            idle.sendall(b"once")
            assert recv_exactly(idle, 4) == b"once"
            worker = threading.Thread(target=keep_busy)
            worker.start()
            try:
                started = time.monotonic()
                assert closed(idle)  # waits for the idle timeout (or fails after WAIT)
                assert time.monotonic() - started >= 2.5
                proxy.wait_for("no traffic for 3 s (idle timeout)", stream="stderr")
                time.sleep(4)  # longer than the idle timeout again: busy stays open
            finally:
                stop.set()
                worker.join(WAIT)
            assert sent == received and len(sent) > 50
            busy.sendall(b"still here")
            assert recv_exactly(busy, 10) == b"still here"
        assert proxy.stderr.count("idle timeout") == 1


# --- (e) clean shutdown ---------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_lets_a_live_connection_finish(
    signum: int, vsock_env: dict[str, str], echo: EchoServer, tmp_path: Path
) -> None:
    path = vsock_path(vsock_env, 88, 4000)
    proxy = Proxy(
        [
            "vsock-to-ip",
            "-v",
            "88:4000",
            "-i",
            f"127.0.0.1:{echo.port}",
            "--drain-timeout",
            "120",
        ],
        tmp_path,
        vsock_env,
    )
    try:
        proxy.wait_ready()
        with unix_client(path) as live:
            live.sendall(b"before")
            assert recv_exactly(live, 6) == b"before"
            os.kill(proxy.process.pid, signum)
            proxy.wait_for("Shutting down: no longer accepting on vsock 88:4000")
            proxy.wait_for("Draining 1 connections for up to 120 s")
            with pytest.raises(ConnectionRefusedError):
                unix_client(path).close()
            payload = os.urandom(MiB)
            live.sendall(payload)  # the live connection still works both ways
            assert recv_exactly(live, len(payload)) == payload
            assert proxy.process.poll() is None
            live.shutdown(socket.SHUT_WR)
            assert live.recv(1) == b""
        # It exits as soon as the connection is done, long before the drain timeout.
        assert proxy.process.wait(WAIT) == 0
        assert "vsock to ip IO copy done, from vsock 88:4000" in proxy.stdout
        assert "still open after the drain" not in proxy.stderr
    finally:
        proxy.stop()


def test_connections_still_open_after_the_drain_are_reset(
    vsock_env: dict[str, str], tmp_path: Path
) -> None:
    with echo_process("unix", vsock_path(vsock_env, 88, 5000), log_dir=tmp_path):
        port = free_port()
        proxy = Proxy(
            ["ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", "88:5000", "--drain-timeout", "1"],
            tmp_path,
            vsock_env,
        )
        try:
            proxy.wait_ready()
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as live:
                live.sendall(b"hello")
                assert recv_exactly(live, 5) == b"hello"
                proxy.process.send_signal(signal.SIGTERM)
                assert proxy.process.wait(WAIT) == 0
                # cut off, so reset: the client cannot take it for a complete exchange
                with pytest.raises(ConnectionResetError):
                    live.recv(1)
            proxy.wait_for("Draining 1 connections for up to 1 s")
            proxy.wait_for("Closed 1 connections still open after the drain", stream="stderr")
        finally:
            proxy.stop()


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


# --- (g) upstream restarted in the middle of a transfer -------------------------------------


class Streamer:
    """A client that sends random bytes without end and counts the echo, until the stream
    breaks; `sent` and `received` say how far each side got."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = self.received = 0
        self.ending = ""
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._sender.start()
        self._receiver.start()

    def _send(self) -> None:
        chunk = os.urandom(64 * 1024)
        try:
            while self.sent < 4096 * MiB:
                self.sock.sendall(chunk)
                self.sent += len(chunk)
        except OSError:
            pass

    def _receive(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 20):
                self.received += len(chunk)
            self.ending = "eof"
        except ConnectionResetError:
            self.ending = "reset"
        except OSError as exc:
            self.ending = f"error {exc}"

    def join(self) -> None:
        """Wait until both directions broke; the client never ends the stream itself."""
        self._receiver.join(WAIT)
        self._sender.join(WAIT)
        assert not self._receiver.is_alive() and not self._sender.is_alive()
        self.sock.close()


@pytest.mark.parametrize("side", ["tcp", "vsock"])
def test_upstream_restarted_mid_transfer(
    side: str, vsock_env: dict[str, str], tmp_path: Path
) -> None:
    """The upstream is killed while a connection streams through, then starts again: that
    connection fails and is logged with the upstream's address; the next one works."""
    port = free_port()
    if side == "tcp":
        upstream_args = ("tcp", "127.0.0.1", str(port))
        command = ["vsock-to-ip", "-v", "88:4000", "-i", f"127.0.0.1:{port}"]
        upstream_name, client_address, family = (
            f"127.0.0.1:{port}",
            vsock_path(vsock_env, 88, 4000),
            socket.AF_UNIX,
        )
    else:
        upstream_args = ("unix", vsock_path(vsock_env, 88, 5000))
        command = ["ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", "88:5000"]
        upstream_name, client_address, family = (
            "vsock 88:5000",
            ("127.0.0.1", port),
            socket.AF_INET,
        )

    def connect() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(WAIT)
        sock.connect(client_address)
        return sock

    with running(*command, log_dir=tmp_path, env=vsock_env) as proxy:
        with echo_process(*upstream_args, log_dir=tmp_path) as upstream:
            streamer = Streamer(connect())
            wait_until(lambda: streamer.received > 4 * MiB, "4 MiB echoed", timeout=WAIT)
            upstream.kill()
            upstream.wait(WAIT)
        streamer.join()
        assert streamer.ending in ("eof", "reset"), streamer.ending
        assert streamer.received < streamer.sent  # the stream was cut short
        proxy.wait_for("Failed to transfer data: error=", stream="stderr")
        failure = next(
            line for line in proxy.stderr.splitlines() if "Failed to transfer data" in line
        )
        assert upstream_name in failure

        # While it is down: refused, and logged with the address.
        try:
            refused = connect()
        except ConnectionResetError:
            pass  # reset before connect() even returned: closed all the same
        else:
            with refused:
                assert closed(refused)
        proxy.wait_for(
            f"failed to connect to {'TCP' if side == 'tcp' else 'vsock'} endpoint",
            stream="stderr",
        )

        with echo_process(*upstream_args, log_dir=tmp_path):
            payload = os.urandom(8 * MiB)
            assert exchange(client_address, payload, family=family) == payload
        assert proxy.process.poll() is None
