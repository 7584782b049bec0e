"""A vsock connect refused with ECONNRESET (a full backlog, or no listener yet) is tried again
within the connect timeout: the schedule itself (pure), then the engine's callback path and
the endpoints' own `connect` over the emulation, with descriptors counted before and after."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import socket
from pathlib import Path

import pytest

from pf_proxy.endpoints import (
    RETRY_CAP,
    RETRY_FIRST,
    ConnectError,
    ConnectRetries,
    Emulation,
    VsockAddress,
    VsockEndpoint,
)
from pf_proxy.tcp import engine
from pf_proxy.tcp.metrics import CLOSED_AT_DRAIN, COMPLETED, UPSTREAM_CONNECT_FAILED, Ended
from pf_proxy.tcp.relay import poller
from pf_proxy.tcp.routes import Upstream

WAIT = 5.0
REFUSED = "failed to connect to vsock endpoint 88:5000: nobody listens"


def reset_error() -> ConnectError:
    error = ConnectError(errno.ECONNRESET, REFUSED)
    error.retryable = True
    return error


# --- the schedule ----------------------------------------------------------------------------


def test_delays_double_from_the_first_to_the_cap_each_from_its_upper_half() -> None:
    retries = ConnectRetries(deadline=1000.0)
    bound, now = RETRY_FIRST, 0.0
    for _ in range(20):
        delay = retries.delay(reset_error(), now)
        assert delay is not None
        assert bound / 2 <= delay <= bound
        now += delay
        bound = min(bound * 2, RETRY_CAP)
    assert retries.count == 20
    assert bound == RETRY_CAP


def test_no_try_is_scheduled_past_the_deadline() -> None:
    retries = ConnectRetries(deadline=1.0)
    now = 0.0
    while (delay := retries.delay(reset_error(), now)) is not None:
        now += delay
        assert now < 1.0
    assert 1.0 - now <= RETRY_CAP  # it gave up only when the next wait would not fit
    assert retries.count > 10


def test_an_error_that_will_not_pass_and_a_caller_without_deadline_are_not_retried() -> None:
    refused = ConnectError(errno.ENODEV, "failed to connect to vsock endpoint 77:5000: no CID")
    retries = ConnectRetries(deadline=10.0)
    assert retries.delay(refused, 0.0) is None
    assert retries.final(refused, 0.0) is refused  # said as it was: never retried
    assert ConnectRetries(deadline=None).delay(reset_error(), 0.0) is None


def test_the_final_error_says_how_often_and_for_how_long_it_was_retried() -> None:
    retries = ConnectRetries(deadline=10.0)
    now = 2.0
    for _ in range(3):
        delay = retries.delay(reset_error(), now)
        assert delay is not None
        now += delay
    now = 3.25
    final = retries.final(reset_error(), now)
    assert final.errno == errno.ECONNRESET
    assert str(final) == f"[Errno 104] {REFUSED}; retried 3 times in 1.25 s"
    single = ConnectRetries(deadline=10.0)
    single.delay(reset_error(), 0.0)
    assert "; retried once in 0.50 s" in str(single.final(reset_error(), 0.5))


def test_retries_cut_short_by_the_deadline_still_say_what_they_met() -> None:
    """The connect timeout can fire while a retry is in progress: its line then says what
    the tries before met, and how often they were made."""
    assert ConnectRetries(deadline=10.0).interrupted(1.0) is None  # never failed
    retries = ConnectRetries(deadline=10.0)
    retries.delay(reset_error(), 2.0)
    retries.delay(reset_error(), 2.5)
    cut = retries.interrupted(3.0)
    assert cut is not None
    assert str(cut) == f"[Errno 104] {REFUSED}; retried 2 times in 1.00 s"


# --- the engine's connect without a task, over the emulation --------------------------------


def open_descriptors() -> int:
    gc.collect()  # an earlier test's event loop, whose epoll set closes when it is collected
    return len(os.listdir("/proc/self/fd"))


async def _connection(
    endpoint: VsockEndpoint, connect_timeout: float
) -> tuple[engine.Connection, asyncio.Future[Ended], socket.socket]:
    """A connection whose route is `endpoint`, started; (it, how it ended, the client end)."""
    loop = asyncio.get_running_loop()
    inbound, client = socket.socketpair()
    inbound.setblocking(False)
    ended: asyncio.Future[Ended] = loop.create_future()
    connection = engine.Connection(
        loop,
        inbound,
        "127.0.0.1:1",
        lambda _: Upstream(endpoint, str(endpoint)),
        engine.Settings("ip to vsock", "vsock to ip", connect_timeout=connect_timeout),
        lambda _, how: ended.set_result(how),
    )
    connection.start()
    return connection, ended, client


def test_a_listener_that_comes_late_is_reached_by_retrying(tmp_path: Path) -> None:
    endpoint = VsockEndpoint(VsockAddress(88, 5000), Emulation(tmp_path))

    async def scenario() -> tuple[Ended, bytes]:
        connection, ended, client = await _connection(endpoint, connect_timeout=WAIT)
        await asyncio.sleep(0.3)
        assert not ended.done() and connection.timer is not None  # waiting to try again
        with endpoint.listen() as listener, client:
            listener.settimeout(WAIT)
            upstream, _ = await asyncio.to_thread(listener.accept)
            with upstream:
                client.sendall(b"sent before the listener came")
                client.shutdown(socket.SHUT_WR)
                upstream.settimeout(WAIT)
                received = b""
                while chunk := await asyncio.to_thread(upstream.recv, 100):
                    received += chunk
            return await asyncio.wait_for(ended, WAIT), received

    how, received = asyncio.run(scenario())
    assert received == b"sent before the listener came"
    assert how.outcome == COMPLETED
    assert how.connect_retries > 3  # 0.3 s of retries: more than the first few milliseconds'


def test_no_listener_ever_ends_before_the_connect_timeout_saying_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = VsockEndpoint(VsockAddress(88, 5000), Emulation(tmp_path))

    async def scenario() -> Ended:
        poller(asyncio.get_running_loop())
        before = open_descriptors()
        _, ended, client = await _connection(endpoint, connect_timeout=0.5)
        how = await asyncio.wait_for(ended, WAIT)
        assert open_descriptors() == before + 1  # the client's end, and nothing else
        with client:
            client.settimeout(WAIT)
            assert client.recv(1) == b""
        return how

    with caplog.at_level(logging.ERROR, logger="pf_proxy"):
        how = asyncio.run(scenario())
    assert how.outcome == UPSTREAM_CONNECT_FAILED  # given up before the timeout, not at it
    assert how.connect_retries > 5
    message = caplog.records[-1].getMessage()
    assert message.startswith(f"Closing connection from 127.0.0.1:1: [Errno 104] {REFUSED}")
    assert f"; retried {how.connect_retries} times in " in message


def test_the_drain_ends_a_connection_waiting_to_retry(tmp_path: Path) -> None:
    endpoint = VsockEndpoint(VsockAddress(88, 5000), Emulation(tmp_path))

    async def scenario() -> Ended:
        loop = asyncio.get_running_loop()
        poller(loop)
        before = open_descriptors()
        connection, ended, client = await _connection(endpoint, connect_timeout=WAIT)
        await asyncio.sleep(0.1)
        connection.abort()
        how = await asyncio.wait_for(ended, WAIT)
        await asyncio.sleep(2 * RETRY_CAP)  # no try comes after the end
        assert connection.timer is None
        assert open_descriptors() == before + 1
        client.close()
        return how

    how = asyncio.run(scenario())
    assert how.outcome == CLOSED_AT_DRAIN
    assert how.connect_retries > 0


# --- the endpoint's own connect (the UDP plane, routes that take a task) ---------------------


def test_connect_with_retries_waits_for_a_late_listener(tmp_path: Path) -> None:
    endpoint = VsockEndpoint(VsockAddress(88, 5001), Emulation(tmp_path))

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        retries = ConnectRetries(loop.time() + WAIT)
        connecting = asyncio.ensure_future(endpoint.connect(retries))
        await asyncio.sleep(0.2)
        assert not connecting.done()
        with endpoint.listen():
            sock = await asyncio.wait_for(connecting, WAIT)
            sock.close()
        return retries.count

    assert asyncio.run(scenario()) > 3


def test_connect_with_retries_gives_up_inside_the_deadline(tmp_path: Path) -> None:
    endpoint = VsockEndpoint(VsockAddress(88, 5002), Emulation(tmp_path))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        before = open_descriptors()
        retries = ConnectRetries(loop.time() + 0.3)
        with pytest.raises(ConnectError) as failure:
            await endpoint.connect(retries)
        assert loop.time() < retries.deadline + 0.05  # type: ignore[operator]
        assert failure.value.errno == errno.ECONNRESET
        assert f"retried {retries.count} times in 0." in str(failure.value)
        assert open_descriptors() == before

    asyncio.run(scenario())
