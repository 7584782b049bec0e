"""A connect that is still in progress when its connection has to end: the engine waits for
it in the relay's epoll set, so the timeout, the drain and a refusal each have to close the
upstream socket, take it out of that set and close the inbound one. Real TCP sockets on
loopback; a listener whose accept queue is full leaves a connect in progress (its SYNs are
dropped). Descriptors are counted before and after."""

from __future__ import annotations

import asyncio
import os
import select
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from pf_proxy.endpoints import IpAddress, IpEndpoint
from pf_proxy.tcp import engine
from pf_proxy.tcp.metrics import CLOSED_AT_DRAIN, CONNECT_TIMEOUT, UPSTREAM_CONNECT_FAILED, Ended
from pf_proxy.tcp.relay import poller
from pf_proxy.tcp.routes import Upstream

WAIT = 5.0


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def unanswering_listener() -> Iterator[int]:
    """A loopback port whose listener never accepts and whose queue is full: a new connect
    to it stays in progress."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        while True:  # fill the accept queue until a connect stays in progress
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            fillers.append(filler)
            filler.connect_ex(("127.0.0.1", port))
            if not select.select([], [filler], [], 0.2)[1]:
                break
            assert len(fillers) < 16, "the listener's queue never filled"
        yield port
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def _run(
    port: int, *, connect_timeout: float | None, abort_after: float | None, in_progress: bool
) -> Ended:
    async def scenario() -> Ended:
        loop = asyncio.get_running_loop()
        poller(loop)  # its epoll descriptor is the loop's, not the connection's
        inbound, client = socket.socketpair()
        inbound.setblocking(False)
        before = open_descriptors()
        ended: asyncio.Future[Ended] = loop.create_future()
        endpoint = IpEndpoint(IpAddress("127.0.0.1", port))

        def route(_: socket.socket) -> Upstream:
            return Upstream(endpoint, str(endpoint))

        connection = engine.Connection(
            loop,
            inbound,
            "127.0.0.1:1",
            route,
            engine.Settings("ip to vsock", "vsock to ip", connect_timeout=connect_timeout),
            lambda _, how: ended.set_result(how),
        )
        connection.start()
        upstream = None
        if in_progress:
            await asyncio.sleep(0.1)
            assert connection.connecting is not None  # still waiting for the connect
            upstream = connection.connecting[1]  # held here: closed explicitly, or counted
        if abort_after is not None:
            await asyncio.sleep(abort_after)
            connection.abort()
        how = await asyncio.wait_for(ended, WAIT)
        assert inbound.fileno() == -1
        assert upstream is None or upstream.fileno() == -1
        assert open_descriptors() == before - 1  # the inbound socket, and nothing else
        with client:
            client.settimeout(WAIT)
            assert client.recv(1) == b""
        return how

    return asyncio.run(scenario())


def test_a_connect_in_progress_ends_at_the_connect_timeout_with_every_socket_closed() -> None:
    with unanswering_listener() as port:
        assert _run(port, connect_timeout=0.3, abort_after=None, in_progress=True) == Ended(
            CONNECT_TIMEOUT
        )


def test_a_connect_in_progress_ends_at_the_drain_with_every_socket_closed() -> None:
    with unanswering_listener() as port:
        assert _run(port, connect_timeout=None, abort_after=0.1, in_progress=True) == Ended(
            CLOSED_AT_DRAIN
        )


def test_a_refused_connect_ends_the_connection_with_every_socket_closed() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]  # bound, never listening: refused
    with probe:
        assert _run(port, connect_timeout=WAIT, abort_after=None, in_progress=False) == Ended(
            UPSTREAM_CONNECT_FAILED
        )
