"""Failure paths through a vsock hop, the same code over the emulation and over real vsock.

Every test here takes the `vsock` fixture: on this machine it is the emulation, inside the
guest stage real AF_VSOCK (tests/vsocks.py). Each failure ends with the proxy holding the
sockets it held before it (counted in /proc/PID/fd) and no vsock connection established.

What vsock does to failures (vsock.md): it has no reset. However a peer closes, its reader gets
the bytes sent and then EOF, and its next send fails with EPIPE. So an upstream that dies behind
a vsock hop reaches a TCP client as an end of stream, and a TCP failure reaches a vsock client
as an end of stream whose own sends fail. A connect to a port nobody listens on, or to a full
backlog, fails at once with ECONNRESET; to a CID that does not exist, with ENODEV.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.integration.helpers import (
    EchoServer,
    Proxy,
    closed,
    echo_process,
    exchange_on,
    free_port,
    read_until_end,
    recv_exactly,
    running,
    steady_proxy,
    wait_until,
)
from tests.vsocks import SLOWDOWN, Vsock

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(300)]

MiB = 1 << 20
WAIT = 30.0 * SLOWDOWN  # the longest any single step may take before the test fails
_LINGER_RESET = struct.pack("ii", 1, 0)


def tcp_client(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def reset(sock: socket.socket) -> None:
    """Close a TCP socket with a reset."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def wait_for_bytes(sock: socket.socket, count: int) -> None:
    """Wait until `count` bytes are queued on `sock`, without reading them (MSG_PEEK: vsock
    has no FIONREAD in kernel 6.1)."""

    def queued() -> int:
        try:
            return len(sock.recv(count, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return 0

    wait_until(lambda: queued() >= count, f"{count} bytes at {sock}", timeout=WAIT)


# --- an upstream's failure across the hop -------------------------------------------------


def test_a_vsock_upstream_closing_with_bytes_unread_ends_the_stream(
    vsock: Vsock, tmp_path: Path
) -> None:
    """The upstream closes with the request unread. Over vsock that is an end of stream: the
    client gets the partial response and EOF (a vsock hop cannot carry a reset); its next
    bytes find the upstream gone, and then the client is reset."""
    port = free_port()
    with (
        vsock.listener(5000) as listener,
        steady_proxy(
            vsock, "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", vsock.address(5000),
            log_dir=tmp_path,
        ) as proxy,
        tcp_client(port) as client,
    ):  # fmt: skip
        client_port = client.getsockname()[1]
        upstream, _ = listener.accept()
        client.sendall(b"request the upstream never reads")
        wait_for_bytes(upstream, 32)
        upstream.sendall(b"partial response")
        upstream.close()  # with the request unread
        assert read_until_end(client) == (b"partial response", "eof")
        proxy.wait_for(f"vsock to ip IO copy done, from vsock {vsock.address(5000)}")
        client.sendall(b"more")  # the upstream is gone: the proxy's send fails (EPIPE)
        proxy.wait_for(
            "Failed to transfer data: error=[Errno 32] Broken pipe "
            f"(between 127.0.0.1:{client_port} and vsock {vsock.address(5000)}",
            stream="stderr",
        )
        with pytest.raises((ConnectionResetError, BrokenPipeError)):  # the client was reset
            for _ in range(50):
                client.sendall(b"more")
                time.sleep(0.1)


def test_a_tcp_upstream_reset_ends_an_uploading_vsock_client(
    vsock: Vsock, tmp_path: Path
) -> None:
    """The TCP upstream resets while the vsock client uploads: the proxy fails the relay and
    closes the vsock side. The client reads what came before and EOF (vsock has no reset),
    and its upload fails, so it cannot take the exchange for complete."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(WAIT)
        port = server.getsockname()[1]
        with (
            steady_proxy(
                vsock, "vsock-to-ip", "-v", vsock.listen_address(4000), "-i", f"127.0.0.1:{port}",
                log_dir=tmp_path,
            ) as proxy,
        ):  # fmt: skip
            client = vsock.client(4000)
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
                wait_for_bytes(upstream, 64 * 1024)
                upstream.sendall(b"partial response")
                reset(upstream)
                received, ending = read_until_end(client)
                uploader.join(WAIT)
            assert ending == "eof"
            assert b"partial response".startswith(received)
            assert errors and isinstance(errors[0], (BrokenPipeError, ConnectionResetError))
            proxy.wait_for("Failed to transfer data: error=[Errno 104]", stream="stderr")
            assert f"(between {vsock.inbound_name(4000)}" in proxy.stderr


def test_a_refused_tcp_upstream_closes_each_vsock_client(
    vsock: Vsock, tmp_path: Path
) -> None:
    dead_port = free_port()
    with (
        steady_proxy(
            vsock, "vsock-to-ip", "-v", vsock.listen_address(4000), "-i", f"127.0.0.1:{dead_port}",
            log_dir=tmp_path,
        ) as proxy,
    ):  # fmt: skip
        for _ in range(20):
            with vsock.client(4000) as client:
                try:
                    client.sendall(b"hello")
                except BrokenPipeError:
                    pass  # closed already: the refusal came first
                assert client.recv(10) == b""
    assert proxy.stderr.count(f"failed to connect to TCP endpoint 127.0.0.1:{dead_port}") == 20


# --- the client fails -----------------------------------------------------------------------


def test_a_tcp_client_reset_mid_stream_ends_the_vsock_upstream(
    vsock: Vsock, tmp_path: Path
) -> None:
    port = free_port()
    with (
        echo_process(*vsock.echo_args(5000), log_dir=tmp_path),
        steady_proxy(
            vsock, "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", vsock.address(5000),
            log_dir=tmp_path,
        ) as proxy,
    ):  # fmt: skip
        for _ in range(10):
            client = tcp_client(port)
            client.sendall(os.urandom(256 * 1024))
            assert len(client.recv(1024)) > 0  # streaming through the echo
            reset(client)
        wait_until(
            lambda: proxy.stderr.count("Failed to transfer data") == 10,
            "ten failures logged",
            timeout=WAIT,
        )
    assert "Connection reset by peer" in proxy.stderr


def test_a_vsock_client_leaving_mid_stream_ends_the_tcp_upstream(
    vsock: Vsock, echo: EchoServer, tmp_path: Path
) -> None:
    """The vsock client closes with echoed bytes unread: over vsock the proxy reads EOF, not
    a reset (and its next send back fails with EPIPE); every connection ends."""
    with (
        steady_proxy(
            vsock, "vsock-to-ip", "-v", vsock.listen_address(4000), "-i", f"127.0.0.1:{echo.port}",
            log_dir=tmp_path,
        ) as proxy,
    ):  # fmt: skip
        for _ in range(10):
            client = vsock.client(4000)
            client.sendall(os.urandom(256 * 1024))
            assert len(client.recv(1024)) > 0
            client.close()
    assert "Connection reset" not in proxy.stderr  # vsock has none, nor has the emulation


# --- connecting to vsock fails --------------------------------------------------------------


def assert_closed_at_once(port: int) -> float:
    """Connect through the proxy and wait until it closes the connection; how long it took."""
    started = time.monotonic()
    try:
        with tcp_client(port) as client:
            client.sendall(b"hello?")
            assert closed(client)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed (reset, as the proxy closes TCP clients) before we got so far
    return time.monotonic() - started


def test_no_listener_on_the_vsock_port_is_retried_then_named_in_the_log(
    vsock: Vsock, tmp_path: Path
) -> None:
    """ECONNRESET may be a full backlog: the connect is tried again until the connect timeout
    would run out, and the final line says so."""
    port = free_port()
    with (
        steady_proxy(
            vsock, "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", vsock.address(5009),
            "--connect-timeout", "1", log_dir=tmp_path,
        ) as proxy,
    ):  # fmt: skip
        for _ in range(3):
            assert assert_closed_at_once(port) < 5
    proxy.wait_for(
        f"failed to connect to vsock endpoint {vsock.address(5009)}: nobody listens on "
        f"vsock {vsock.address(5009)}, or its listen backlog is full (Connection reset by peer)"
        "; retried ",
        stream="stderr",
    )
    assert re.search(r"; retried \d+ times in 0\.\d\d s\n", proxy.stderr), proxy.stderr


def test_a_full_listen_backlog_is_retried_until_the_listener_accepts(
    vsock: Vsock, tmp_path: Path
) -> None:
    """A vsock listener whose backlog is full refuses a connect at once with ECONNRESET (the
    emulation used to take EAGAIN for 'in progress' and relay a socket that never connected):
    the proxy tries again, and once the listener accepts, the connection goes through with
    the bytes the client sent meanwhile."""
    port = free_port()
    with vsock.listener(5008, backlog=0) as listener:
        fillers: list[socket.socket] = []
        try:
            while True:  # fill the backlog
                try:
                    fillers.append(vsock.client(5008, timeout=1))
                except OSError as exc:
                    assert exc.errno in (errno.ECONNRESET, errno.EAGAIN), exc
                    break
                assert len(fillers) < 16, "the backlog never filled"
            with (
                steady_proxy(
                    vsock, "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", vsock.address(5008),
                    log_dir=tmp_path,
                ) as proxy,
                tcp_client(port) as client,
            ):  # fmt: skip
                client.sendall(b"waited for a place in the backlog")
                time.sleep(0.5 * SLOWDOWN)  # refused, and tried again, for a while
                for _ in fillers:  # make room
                    accepted, _ = listener.accept()
                    accepted.close()
                upstream, _ = listener.accept()  # the proxy's connect, tried again
                with upstream:
                    upstream.settimeout(WAIT)
                    expected = b"waited for a place in the backlog"
                    assert recv_exactly(upstream, len(expected)) == expected
                    upstream.sendall(b"served")
                    assert recv_exactly(client, 6) == b"served"
        finally:
            for filler in fillers:
                filler.close()
        listener.close()
    assert "Closing connection" not in proxy.stderr


@pytest.mark.guest
def test_a_cid_that_does_not_exist_is_enodev_at_once(vsock: Vsock, tmp_path: Path) -> None:
    """Real vsock only: the emulation has no notion of which CIDs exist."""
    port = free_port()
    with (
        steady_proxy(
            vsock, "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", "77:5000",
            log_dir=tmp_path,
        ) as proxy,
    ):  # fmt: skip
        assert assert_closed_at_once(port) < 5
    proxy.wait_for(
        "failed to connect to vsock endpoint 77:5000: no such CID: nothing at 77 is reachable "
        "over vsock (No such device)",
        stream="stderr",
    )


# --- timeouts and shutdown ------------------------------------------------------------------


def test_idle_timeout_closes_the_idle_connection_not_the_busy_one(
    vsock: Vsock, echo: EchoServer, tmp_path: Path
) -> None:
    with steady_proxy(
        vsock, "vsock-to-ip", "-v", vsock.listen_address(4000), "-i", f"127.0.0.1:{echo.port}",
        "--idle-timeout", "3", log_dir=tmp_path,
    ) as proxy:  # fmt: skip
        idle, busy = vsock.client(4000), vsock.client(4000)
        stop = threading.Event()
        sent = bytearray()
        received = bytearray()

        def keep_busy() -> None:  # a byte every 50 ms, far inside the 3 s idle timeout
            while not stop.is_set():
                byte = os.urandom(1)
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
            assert sent == received and len(sent) > 20
            busy.sendall(b"still here")
            assert recv_exactly(busy, 10) == b"still here"
    assert proxy.stderr.count("idle timeout") == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_lets_a_live_connection_finish(
    signum: int, vsock: Vsock, echo: EchoServer, tmp_path: Path
) -> None:
    proxy = Proxy(
        ["vsock-to-ip", "-v", vsock.listen_address(4000), "-i", f"127.0.0.1:{echo.port}",
         "--drain-timeout", "120"],
        tmp_path,
        vsock.env,
    )  # fmt: skip
    try:
        proxy.wait_ready()
        with vsock.client(4000) as live:
            live.sendall(b"before")
            assert recv_exactly(live, 6) == b"before"
            os.kill(proxy.process.pid, signum)
            proxy.wait_for(f"Shutting down: no longer accepting on {vsock.listener_name(4000)}")
            proxy.wait_for("Draining 1 connections for up to 120 s")
            with pytest.raises((ConnectionRefusedError, ConnectionResetError)):
                vsock.client(4000).close()
            payload = os.urandom(MiB)
            live.sendall(payload)  # the live connection still works both ways
            assert recv_exactly(live, len(payload)) == payload
            assert proxy.process.poll() is None
            live.shutdown(socket.SHUT_WR)
            assert live.recv(1) == b""
        # It exits as soon as the connection is done, long before the drain timeout.
        assert proxy.process.wait(WAIT) == 0
        assert f"vsock to ip IO copy done, from {vsock.inbound_name(4000)}" in proxy.stdout
        assert "still open after the drain" not in proxy.stderr
    finally:
        proxy.stop()
    wait_until(lambda: vsock.established() == 0, "no vsock connection left", timeout=WAIT)


def test_connections_still_open_after_the_drain_are_closed(
    vsock: Vsock, echo: EchoServer, tmp_path: Path
) -> None:
    """A TCP client cut off by the drain is reset; a vsock client reads EOF (no reset over
    vsock) and its next send fails. Both proxies exit 0 with nothing left established."""
    port = free_port()
    with echo_process(*vsock.echo_args(5000), log_dir=tmp_path):
        outer = Proxy(
            ["ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", vsock.address(5000),
             "--drain-timeout", "1"],
            tmp_path,
            vsock.env,
        )  # fmt: skip
        inner = Proxy(
            ["vsock-to-ip", "-v", vsock.listen_address(4000), "-i", f"127.0.0.1:{echo.port}",
             "--drain-timeout", "1"],
            tmp_path,
            vsock.env,
        )  # fmt: skip
        try:
            outer.wait_ready()
            inner.wait_ready()
            with tcp_client(port) as tcp_live, vsock.client(4000) as vsock_live:
                for live in (tcp_live, vsock_live):
                    live.sendall(b"hello")
                    assert recv_exactly(live, 5) == b"hello"
                for proxy in (outer, inner):
                    proxy.process.send_signal(signal.SIGTERM)
                for proxy in (outer, inner):
                    assert proxy.process.wait(WAIT) == 0
                with pytest.raises(ConnectionResetError):
                    tcp_live.recv(1)
                assert vsock_live.recv(1) == b""
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    for _ in range(3):
                        vsock_live.sendall(b"anyone?")
                        time.sleep(0.1)
            for proxy in (outer, inner):
                proxy.wait_for("Draining 1 connections for up to 1 s")
                proxy.wait_for("Closed 1 connections still open after the drain", stream="stderr")
        finally:
            outer.stop()
            inner.stop()
    wait_until(lambda: vsock.established() == 0, "no vsock connection left", timeout=WAIT)


# --- an upstream restarted in the middle of a transfer --------------------------------------


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
def test_upstream_restarted_mid_transfer(side: str, vsock: Vsock, tmp_path: Path) -> None:
    """The upstream is killed while a connection streams through, then starts again: that
    connection ends short of what was sent (over vsock a killed upstream is an EOF) and is
    logged; the next connection works."""
    port = free_port()
    if side == "tcp":  # vsock client -> vsock-to-ip -> TCP echo
        upstream_args = ["tcp", "127.0.0.1", str(port)]
        command = ["vsock-to-ip", "-v", vsock.listen_address(4000), "-i", f"127.0.0.1:{port}"]
        ended, refused = "Failed to transfer data: error=", "failed to connect to TCP endpoint"

        def connect() -> socket.socket:
            return vsock.client(4000)
    else:  # TCP client -> ip-to-vsock -> vsock echo
        upstream_args = vsock.echo_args(5000)
        command = ["ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", vsock.address(5000),
                   "--connect-timeout", "2"]  # fmt: skip
        ended = f"vsock {vsock.address(5000)}"  # EOF read from it, or EPIPE writing to it
        refused = f"failed to connect to vsock endpoint {vsock.address(5000)}"

        def connect() -> socket.socket:
            return tcp_client(port)

    with running(*command, log_dir=tmp_path, env=vsock.env) as proxy:
        with echo_process(*upstream_args, log_dir=tmp_path) as upstream:
            streamer = Streamer(connect())
            wait_until(lambda: streamer.received > 4 * MiB, "4 MiB echoed", timeout=WAIT)
            upstream.kill()
            upstream.wait(WAIT)
        streamer.join()
        assert streamer.ending in ("eof", "reset"), streamer.ending
        assert streamer.received < streamer.sent  # the stream was cut short
        wait_until(
            lambda: ended in proxy.stderr or (side == "vsock" and ended in proxy.stdout),
            "the cut connection logged",
            timeout=WAIT,
        )

        # While it is down: closed, and logged with the address.
        try:
            down = connect()
        except (ConnectionResetError, ConnectionRefusedError):
            pass  # closed before connect() even returned
        else:
            with down:
                assert closed(down)
        proxy.wait_for(refused, stream="stderr")

        with echo_process(*upstream_args, log_dir=tmp_path):
            payload = os.urandom(8 * MiB)
            assert exchange_on(connect(), None, payload) == payload
        assert proxy.process.poll() is None
