"""The relay under a burst of failures: a pump whose write fails drops its chunk at once."""

from __future__ import annotations

import asyncio
import errno
import socket
import tracemalloc

import pytest

from pf_proxy.tcp import relay as relay_module
from pf_proxy.tcp.relay import COPY_CHUNK, Relay

MiB = 1 << 20


async def relay_to_departed_clients(count: int) -> tuple[list[BaseException | None], int]:
    """`count` relays on the copy path whose clients have gone while their upstreams have
    bytes for them, all started at once: every write back fails (EPIPE) in one turn of the
    loop. Returns each relay's outcome and the peak of memory allocated while they ran."""
    relays, keep = [], []
    for _ in range(count):
        inbound, client = socket.socketpair()
        upstream, server = socket.socketpair()
        server.sendall(b"reply" * 200)
        client.close()
        relays.append(Relay(inbound, upstream, "forward done", "backward done", use_splice=False))
        keep.append(server)
    tracemalloc.start()
    try:
        outcomes = await asyncio.gather(*(relay.run() for relay in relays), return_exceptions=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        for sock in keep:
            sock.close()
    return outcomes, peak


def test_failed_writes_do_not_each_hold_a_chunk_buffer() -> None:
    """Found by the hostile-peer test: vsock-to-ip on the copy path went from 26 MiB to
    360 MiB resident when thousands of vsock clients left at once. Each failed pump kept its
    1 MiB buffer until the relay was torn down on a later turn of the loop, so each next
    read found the pool empty and allocated another."""
    count = 32
    outcomes, peak = asyncio.run(relay_to_departed_clients(count))
    assert all(isinstance(outcome, BrokenPipeError) for outcome in outcomes), outcomes
    assert peak < 4 * COPY_CHUNK, f"{peak / MiB:.1f} MiB allocated for {count} failed relays"


def refuse_splice(monkeypatch: pytest.MonkeyPatch, source: socket.socket, after: int) -> None:
    """Make splice(2) out of `source` fail with EINVAL once `after` reads brought bytes, as it
    does for a socket type without splice support."""
    reads = 0
    real_splice = relay_module._splice

    def splice(
        src: int, dst: int, count: int, src_offset: None, dst_offset: None, flags: int
    ) -> int:
        nonlocal reads
        if src == source.fileno() and reads >= after:
            raise OSError(errno.EINVAL, "Invalid argument")
        moved = real_splice(src, dst, count, src_offset, dst_offset, flags)
        if src == source.fileno() and moved:
            reads += 1
        return moved

    monkeypatch.setattr(relay_module, "_splice", splice)


async def splice_relay(
    monkeypatch: pytest.MonkeyPatch, refuse_after: int, messages: list[bytes]
) -> tuple[list[bytes], Relay]:
    """Relay `messages` client -> server, then b"response" back, with splice refused for the
    client's side after `refuse_after` reads; what the server received, and the relay."""
    inbound, client = socket.socketpair()
    upstream, server = socket.socketpair()
    refuse_splice(monkeypatch, inbound, refuse_after)
    relay = Relay(inbound, upstream, "forward done", "backward done", use_splice=True)
    running = asyncio.ensure_future(relay.run())
    loop = asyncio.get_running_loop()
    received = []
    try:
        for sock in (client, server):
            sock.setblocking(False)
        for message in messages:
            await loop.sock_sendall(client, message)
            got = b""
            while len(got) < len(message):
                got += await asyncio.wait_for(loop.sock_recv(server, 1 << 20), 5)
            received.append(got)
        await loop.sock_sendall(server, b"response")
        assert await asyncio.wait_for(loop.sock_recv(client, 100), 5) == b"response"
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(running, 5)
    finally:
        running.cancel()
        client.close()
        server.close()
    return received, relay


@pytest.fixture
def splice_from_the_first_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every direction moves from copying to splice after its first read (SPLICE_FROM = 1)."""
    monkeypatch.setattr(relay_module, "SPLICE_FROM", 1)


def test_a_socket_that_refuses_splice_is_copied_instead(
    monkeypatch: pytest.MonkeyPatch, splice_from_the_first_byte: None
) -> None:
    received, relay = asyncio.run(splice_relay(monkeypatch, 0, [b"request", b"more"]))
    assert received == [b"request", b"more"]
    # forward: copied, moved to splice, refused at once, copied again for good
    assert [type(pump).__name__ for pump in relay.pumps] == ["_CopyPump", "_SplicePump"]
    assert relay.pumps[0].may_splice is False  # type: ignore[attr-defined]
    assert (relay.bytes_forward, relay.bytes_backward) == (11, 8)


def test_a_large_read_moves_a_direction_to_splice_and_small_ones_stay_copied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "SPLICE_FROM", 1000)
    messages = [b"small", b"x" * 5000, b"more"]
    received, relay = asyncio.run(splice_relay(monkeypatch, 10**9, messages))
    assert received == messages
    assert [type(pump).__name__ for pump in relay.pumps] == ["_SplicePump", "_CopyPump"]


async def splice_refused_after_first_read(monkeypatch: pytest.MonkeyPatch) -> OSError:
    inbound, client = socket.socketpair()
    upstream, server = socket.socketpair()
    refuse_splice(monkeypatch, inbound, 1)
    relay = Relay(inbound, upstream, "forward done", "backward done", use_splice=True)
    running = asyncio.ensure_future(relay.run())
    loop = asyncio.get_running_loop()
    try:
        for sock in (client, server):
            sock.setblocking(False)
        for message in (b"request", b"second"):  # copied, then spliced
            await loop.sock_sendall(client, message)
            assert await asyncio.wait_for(loop.sock_recv(server, 100), 5) == message
        await loop.sock_sendall(client, b"more")
        with pytest.raises(OSError) as failure:
            await asyncio.wait_for(running, 5)
        # Closed without "more" (a Unix socket has no reset to send; TCP peers get one).
        assert await asyncio.wait_for(loop.sock_recv(server, 100), 5) == b""
        return failure.value
    finally:
        running.cancel()
        client.close()
        server.close()


def test_splice_refused_mid_stream_fails_the_relay(
    monkeypatch: pytest.MonkeyPatch, splice_from_the_first_byte: None
) -> None:
    """After bytes moved, EINVAL is a real error: the relay must not carry on as if whole."""
    failure = asyncio.run(splice_refused_after_first_read(monkeypatch))
    assert failure.errno == errno.EINVAL
