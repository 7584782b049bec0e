"""Failure paths with sockets that behave as vsock does, on both relay paths.

`VsockLike` stands in for an AF_VSOCK socket where no real one may be opened: a Unix socket
that reports itself as AF_VSOCK and, as CPython does for every AF_VSOCK option, refuses a
`bytes` value with TypeError. Over real vsock, the old cleanup's `SO_LINGER` raised exactly
that, escaped, and left both sockets of the connection open with the client hanging.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from pf_proxy.endpoints import (
    ConnectError,
    Connecting,
    Emulation,
    Endpoint,
    VsockAddress,
    VsockEndpoint,
    close_abortively,
    peer_close_is_eof,
)
from pf_proxy.tcp import engine
from pf_proxy.tcp.metrics import CLOSED_AT_DRAIN, Ended
from pf_proxy.tcp.relay import Relay
from pf_proxy.tcp.routes import Upstream

WAIT = 5.0


class VsockLike(socket.socket):
    """A Unix stream socket answering as AF_VSOCK, with CPython's AF_VSOCK option rule."""

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_VSOCK

    def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:
        if not isinstance(value, int):
            raise TypeError("'bytes' object cannot be interpreted as an integer (AF_VSOCK)")
        super().setsockopt(level, option, value, *rest)


class ConnectedAlready:
    """An upstream endpoint whose connect is done: `sock`."""

    half_close = True

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def start_connect(self) -> Connecting:
        return Connecting(self.sock, True)


def vsock_like_pair() -> tuple[VsockLike, socket.socket]:
    """(the proxy's end, answering as AF_VSOCK; the peer's end, a plain Unix socket)."""
    ours, peer = socket.socketpair()
    return VsockLike(fileno=ours.detach()), peer


def test_the_stand_in_refuses_a_struct_linger_as_cpython_does_for_vsock() -> None:
    ours, peer = vsock_like_pair()
    with ours, peer:
        assert ours.family == socket.AF_VSOCK
        with pytest.raises(TypeError):
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")


def test_close_abortively_resets_tcp_and_closes_vsock_without_an_option() -> None:
    ours, peer = vsock_like_pair()
    close_abortively(ours)  # the old cleanup raised TypeError here
    assert ours.fileno() == -1
    assert peer.recv(1) == b""  # vsock has no reset: the peer reads EOF
    peer.close()

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        close_abortively(accepted)
        with client, pytest.raises(ConnectionResetError):
            client.recv(1)


def test_an_emulated_peer_left_with_unread_bytes_reads_eof_not_a_reset() -> None:
    ours, peer = socket.socketpair()
    with peer:
        peer.sendall(b"the proxy never read this")
        ours.sendall(b"partial")
        close_abortively(ours)  # drains first, as over vsock the peer sees an end
        assert peer.recv(100) == b"partial"
        assert peer.recv(100) == b""
    assert peer_close_is_eof(ours)


async def _relay_failure(use_splice: bool) -> tuple[BaseException | None, list[socket.socket]]:
    """An idle timeout on a relay between a vsock-like inbound and a TCP-like upstream."""
    inbound, client = vsock_like_pair()
    upstream, server = socket.socketpair()
    relay = Relay(inbound, upstream, "fwd", "back", use_splice=use_splice, idle_timeout=0.2)
    outcome: BaseException | None = None
    try:
        await asyncio.wait_for(relay.run(), WAIT)
    except BaseException as exc:
        outcome = exc
    return outcome, [inbound, upstream, client, server]


@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])
def test_a_failed_relay_with_a_vsock_side_closes_both_sockets(use_splice: bool) -> None:
    outcome, (inbound, upstream, client, server) = asyncio.run(_relay_failure(use_splice))
    with client, server:
        assert isinstance(outcome, TimeoutError), repr(outcome)  # not TypeError
        assert inbound.fileno() == -1 and upstream.fileno() == -1
        client.settimeout(WAIT)
        server.settimeout(WAIT)
        assert client.recv(1) == b""
        assert server.recv(1) == b""


async def _connection(route: Callable[[socket.socket], Awaitable[Upstream]]) -> socket.socket:
    """Run one vsock-like connection through the engine; return the client's end."""
    inbound, client = vsock_like_pair()
    inbound.setblocking(False)
    settings = engine.Settings("vsock to ip", "ip to vsock", connect_timeout=WAIT)
    await asyncio.wait_for(engine.handle_connection(inbound, "vsock 1:4000", route, settings), WAIT)
    assert inbound.fileno() == -1
    return client


def test_a_refused_upstream_closes_the_vsock_inbound(caplog: pytest.LogCaptureFixture) -> None:
    async def refused(_: socket.socket) -> Upstream:
        raise ConnectError(errno.ECONNREFUSED, "failed to connect to TCP endpoint 127.0.0.1:9")

    caplog.set_level(logging.INFO, logger="pf_proxy")
    client = asyncio.run(_connection(refused))
    with client:
        assert client.recv(1) == b""
    assert "Closing connection from vsock 1:4000: [Errno 111] failed to connect" in caplog.text


def test_a_cancel_at_the_drain_closes_every_socket() -> None:
    async def scenario() -> list[socket.socket]:
        inbound, client = vsock_like_pair()
        upstream, server = socket.socketpair()
        upstream.setblocking(False)

        def route(_: socket.socket) -> Upstream:
            return Upstream(cast(Endpoint, ConnectedAlready(upstream)), "127.0.0.1:80")

        settings = engine.Settings("vsock to ip", "ip to vsock")
        task = asyncio.ensure_future(
            engine.handle_connection(inbound, "vsock 1:4000", route, settings)
        )
        await asyncio.sleep(0.1)  # relaying, nothing moves
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert inbound.fileno() == -1 and upstream.fileno() == -1
        return [client, server]

    client, server = asyncio.run(scenario())
    with client, server:
        assert client.recv(1) == b""
        assert server.recv(1) == b""


@pytest.mark.parametrize("steps", [1, 2])
def test_a_cancel_while_the_route_reads_closes_the_inbound_socket(steps: int) -> None:
    """Cancelled while its route waits in a task (or before that task took a step): the
    connection ends, closed, and the cancel does not hang."""

    async def scenario() -> socket.socket:
        inbound, client = vsock_like_pair()

        async def slow_route(_: socket.socket) -> Upstream:
            await asyncio.sleep(60)
            raise AssertionError("not reached")

        settings = engine.Settings("vsock to ip", "ip to vsock")
        task = asyncio.ensure_future(
            engine.handle_connection(inbound, "vsock 1:4000", slow_route, settings)
        )
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
        assert inbound.fileno() == -1
        return client

    client = asyncio.run(scenario())
    with client:
        client.settimeout(WAIT)
        assert client.recv(1) == b""


def test_a_connection_aborted_before_its_route_task_ran_ends_closed_at_drain() -> None:
    """The drain's end can abort a connection accepted in the same turn of the loop, whose
    route task has not taken its first step (so none of its handlers can run)."""

    async def scenario() -> tuple[list[Ended], socket.socket]:
        inbound, client = vsock_like_pair()

        async def slow_route(_: socket.socket) -> Upstream:
            await asyncio.sleep(60)
            raise AssertionError("not reached")

        ended: list[Ended] = []
        settings = engine.Settings("vsock to ip", "ip to vsock")
        connection = engine.Connection(
            asyncio.get_running_loop(),
            inbound,
            "vsock 1:4000",
            slow_route,
            settings,
            lambda _, how: ended.append(how),
        )
        connection.start()
        connection.abort()
        for _ in range(3):
            await asyncio.sleep(0)
        assert inbound.fileno() == -1
        return ended, client

    ended, client = asyncio.run(scenario())
    assert ended == [Ended(CLOSED_AT_DRAIN)]
    with client:
        client.settimeout(WAIT)
        assert client.recv(1) == b""


@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])
def test_an_emulated_reset_is_the_end_of_that_direction(use_splice: bool) -> None:
    """The vsock-side client sends, then closes with a reply unread: over vsock the proxy
    reads its bytes and EOF. The relay half-closes the upstream and ends cleanly once the
    upstream ends too; nothing is lost and nothing fails."""

    async def scenario() -> tuple[bytes, BaseException | None]:
        inbound, client = socket.socketpair()
        upstream, server = socket.socketpair()
        relay = Relay(inbound, upstream, "fwd", "back", use_splice=use_splice)
        running = asyncio.ensure_future(relay.run())
        loop = asyncio.get_running_loop()
        server.setblocking(False)
        client.sendall(b"request")
        await asyncio.sleep(0.05)
        await loop.sock_sendall(server, b"reply the client never reads")
        await asyncio.sleep(0.05)
        client.sendall(b" and more")
        client.close()  # with the reply unread: a Unix socket reports ECONNRESET
        received = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(server, 100), WAIT):
            received += chunk
        server.shutdown(socket.SHUT_WR)
        outcome: BaseException | None = None
        try:
            await asyncio.wait_for(running, WAIT)
        except BaseException as exc:
            outcome = exc
        server.close()
        return received, outcome

    received, outcome = asyncio.run(scenario())
    assert received == b"request and more"
    # The reply the client never read cannot be written: EPIPE, as over vsock, or a clean end
    # when the relay saw both EOFs first.
    assert outcome is None or (isinstance(outcome, OSError) and outcome.errno == errno.EPIPE)


# --- the emulation connects as vsock does -----------------------------------------------


def test_no_emulated_listener_is_a_reset_naming_the_address(tmp_path: Path) -> None:
    endpoint = VsockEndpoint(VsockAddress(88, 5000), Emulation(tmp_path))
    with pytest.raises(ConnectError) as failure:
        asyncio.run(endpoint.connect())
    assert failure.value.errno == errno.ECONNRESET
    assert str(failure.value) == (
        "[Errno 104] failed to connect to vsock endpoint 88:5000: nobody listens on "
        "vsock 88:5000, or its listen backlog is full (Connection reset by peer)"
    )


def test_a_full_emulated_backlog_is_a_reset_at_once_not_a_socket_that_never_connected(
    tmp_path: Path,
) -> None:
    """A non-blocking connect to a full Unix backlog says EAGAIN; it used to be taken for
    'in progress' and relayed, failing later with EINVAL on a socket that never connected."""
    endpoint = VsockEndpoint(VsockAddress(88, 5001), Emulation(tmp_path))
    listener = endpoint.listen(backlog=0)
    queued = []
    try:
        while True:  # fill the backlog (a Unix listener queues backlog + 1)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            queued.append(sock)
            path = Emulation(tmp_path).socket_path(endpoint.address)
            if sock.connect_ex(str(path)) == errno.EAGAIN:
                break
            assert len(queued) < 10, "the backlog never filled"

        async def connect() -> float:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ConnectError) as failure:
                await endpoint.connect()
            assert failure.value.errno == errno.ECONNRESET
            return loop.time() - started

        assert asyncio.run(connect()) < 1.0  # at once, as vsock; no wait for a timeout
    finally:
        for sock in queued:
            sock.close()
        listener.close()


def test_a_listener_on_cid_any_takes_every_cid_in_the_emulation(tmp_path: Path) -> None:
    listener = VsockEndpoint(VsockAddress(0xFFFFFFFF, 5002), Emulation(tmp_path)).listen()
    try:
        sock = asyncio.run(VsockEndpoint(VsockAddress(88, 5002), Emulation(tmp_path)).connect())
        with sock:
            conn, _ = listener.accept()
            conn.close()
    finally:
        listener.close()
