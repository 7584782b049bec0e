"""VsockToDevice sending runs of packets with one sendmmsg each: the edge cases of a batch.

The forwarder runs for real (its accept loop, stream reads, framing, checks, pauses and the
raw socket's reopening) on a Unix socket standing in for vsock; only the raw socket is a
stand-in, :class:`ScriptedSender`, which takes packets the way ``RawSender.send_batch`` does
(everything before the first refused packet, a refusal only when it comes first) and can be
told to refuse a packet, to fill up, or to break.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest

from pf_proxy.endpoints import HybridVsock, VsockAddress, VsockEndpoint
from pf_proxy.raw import forward
from pf_proxy.raw.policy import Drop
from pf_proxy.raw.rawsock import SEND_BATCH, PacketRejected

T = TypeVar("T")
POLICY_DROPPED_TOS = 0xFF  # packets with this TOS byte fail the check


def ipv4(size: int, tos: int = 0) -> bytes:
    """A `size`-byte IPv4 packet; its size tells packets apart."""
    return struct.pack("!BBH", 0x45, tos, size) + bytes(size - 4)


def check(packet: memoryview) -> Drop | None:
    return Drop.NOT_TCP if packet[1] == POLICY_DROPPED_TOS else None


class ScriptedSender:
    """Stands in for RawSender; records the sizes of the packets it sent and each call's
    batch length. Its fileno is writable unless :meth:`fill` made it full."""

    opened: ClassVar[list[ScriptedSender]] = []

    def __init__(self, device: str) -> None:
        self.device = device
        self.sent: list[int] = []
        self.calls: list[int] = []
        self.refused: set[int] = set()
        self.breaks_on: int | None = None
        self.room = math.inf
        self.closed = False
        self._writer, self._reader = socket.socketpair()
        self._writer.setblocking(False)
        self._reader.setblocking(False)
        ScriptedSender.opened.append(self)

    def fileno(self) -> int:
        return self._writer.fileno()

    def fill(self, room: int) -> None:
        """Take `room` more packets, then be full (and not writable) until :meth:`drain`."""
        self.room = room
        try:
            while True:
                self._writer.send(bytes(65536))
        except BlockingIOError:
            pass

    def drain(self) -> None:
        self.room = math.inf
        try:
            while self._reader.recv(1 << 20):
                pass
        except BlockingIOError:
            pass

    def send_batch(self, packets: Sequence[memoryview]) -> int:
        self.calls.append(len(packets))
        taken = 0
        for packet in packets[:SEND_BATCH]:
            size = len(packet)
            if size in self.refused or size == self.breaks_on or self.room == 0:
                if taken or self.room == 0:
                    return taken
                if size == self.breaks_on:
                    raise OSError(errno.ENODEV, "No such device")
                raise PacketRejected(OSError(errno.EMSGSIZE, "Message too long"), size, "10.0.0.2")
            self.room -= 1
            self.sent.append(size)
            taken += 1
        return taken

    def close(self) -> None:
        self.closed = True
        self._writer.close()
        self._reader.close()


class UnixListener:
    """Stands in for the vsock endpoint: a Unix stream socket listening at `path`."""

    half_close = True

    def __init__(self, path: Path) -> None:
        self.path = path

    def listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        sock.listen()
        sock.setblocking(False)
        return sock

    def __str__(self) -> str:
        return f"unix:{self.path}"


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def settle() -> None:
    """Give the loop time to run every callback that is ready (reads, sends)."""
    await asyncio.sleep(0.05)


def run_forwarder(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scenario: Callable[[forward.VsockToDevice, socket.socket], Awaitable[T]],
    hybrid: bool = False,
) -> T:
    """Run a VsockToDevice with scripted raw sockets, connect a client, play `scenario`.
    With `hybrid`, it listens on hybrid vsock, where the backend connects for the guest."""
    ScriptedSender.opened = []
    monkeypatch.setattr(forward, "RawSender", ScriptedSender)

    async def main() -> T:
        listener: Any = UnixListener(tmp_path / "link.sock")
        path = listener.path
        if hybrid:
            listener = VsockEndpoint(VsockAddress(2, 1200), HybridVsock(tmp_path / "vm.vsock"))
            path = tmp_path / "vm.vsock_1200"
        forwarder = forward.VsockToDevice(listener, "eth0", check)
        running = asyncio.ensure_future(forwarder.run())
        try:
            await until(lambda: path.exists(), "the listener")
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with client:
                client.connect(str(path))
                await until(lambda: forwarder.link_up, "the connection")
                return await scenario(forwarder, client)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    return asyncio.run(main())


def test_more_whole_packets_than_a_batch_go_in_runs_of_at_most_a_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = [100 + i for i in range(SEND_BATCH + 36)]

    async def scenario(forwarder: forward.VsockToDevice, client: socket.socket) -> None:
        client.sendall(b"".join(map(ipv4, sizes)))
        await until(lambda: forwarder.stats.packets == len(sizes), "every packet")
        sender = ScriptedSender.opened[0]
        assert sender.sent == sizes
        assert max(sender.calls) == SEND_BATCH
        assert forwarder.stats.bytes == sum(sizes)

    run_forwarder(tmp_path, monkeypatch, scenario)


def test_a_refused_packet_mid_batch_is_dropped_alone_and_the_rest_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sizes = [100 + i for i in range(10)]

    async def scenario(forwarder: forward.VsockToDevice, client: socket.socket) -> None:
        sender = ScriptedSender.opened[0]
        sender.refused = {105, 107}
        client.sendall(b"".join(map(ipv4, sizes)))
        await until(lambda: forwarder.stats.packets == 8, "the packets that were not refused")
        assert sender.sent == [100, 101, 102, 103, 104, 106, 108, 109]
        # the run, then the rest from the refused one (refused alone), then after it ...
        assert sender.calls == [10, 5, 4, 3, 2]
        assert forwarder.stats.drops["send-EMSGSIZE"] == 2
        assert forwarder.idle.is_set()

    with caplog.at_level(logging.WARNING, logger="pf_proxy"):
        run_forwarder(tmp_path, monkeypatch, scenario)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [  # the first of a kind is logged, the rest counted
        "raw send of 105-byte packet to 10.0.0.2 failed: [Errno 90] Message too long; "
        "dropped (further EMSGSIZE drops are counted, not logged)"
    ]


def test_policy_drops_in_the_middle_of_a_read_are_counted_and_never_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(forwarder: forward.VsockToDevice, client: socket.socket) -> None:
        packets = [
            ipv4(100),
            ipv4(101, POLICY_DROPPED_TOS),
            ipv4(102),
            ipv4(103, POLICY_DROPPED_TOS),
        ]
        client.sendall(b"".join(packets))
        await until(lambda: forwarder.stats.packets == 2, "the packets that pass")
        await settle()
        assert ScriptedSender.opened[0].sent == [100, 102]
        assert forwarder.stats.drops[Drop.NOT_TCP] == 2

    run_forwarder(tmp_path, monkeypatch, scenario)


def test_a_full_raw_socket_mid_batch_pauses_reading_until_it_is_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, later = [100 + i for i in range(10)], [200 + i for i in range(5)]

    async def scenario(forwarder: forward.VsockToDevice, client: socket.socket) -> None:
        sender = ScriptedSender.opened[0]
        sender.fill(room=3)
        client.sendall(b"".join(map(ipv4, first)))
        await until(lambda: len(sender.sent) == 3, "the room there was")
        await settle()
        assert sender.sent == first[:3]
        assert not forwarder.idle.is_set()  # packets in hand

        client.sendall(b"".join(map(ipv4, later)))
        await settle()
        assert sender.sent == first[:3]  # still full: nothing more taken

        sender.drain()  # writable again: the rest of the run, then what came later
        await until(lambda: forwarder.stats.packets == 15, "the rest")
        assert sender.sent == first + later
        assert forwarder.idle.is_set()
        assert forwarder.stats.drops.total == 0

    run_forwarder(tmp_path, monkeypatch, scenario)


def test_a_broken_raw_socket_drops_one_packet_and_the_reopened_one_sends_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = [100 + i for i in range(8)]

    async def scenario(forwarder: forward.VsockToDevice, client: socket.socket) -> None:
        broken = ScriptedSender.opened[0]
        broken.breaks_on = 103
        client.sendall(b"".join(map(ipv4, sizes)))
        await until(lambda: len(ScriptedSender.opened) == 2, "the raw socket reopened", 10)
        await until(lambda: forwarder.stats.packets == 7, "the rest, on the new socket")
        reopened = ScriptedSender.opened[1]
        assert (broken.sent, broken.closed) == ([100, 101, 102], True)
        assert reopened.sent == [104, 105, 106, 107]
        assert forwarder.stats.drops[forward.RAW_SOCKET_BROKEN] == 1
        client.sendall(ipv4(300))  # and reading goes on
        await until(lambda: reopened.sent[-1:] == [300], "a later packet")

    run_forwarder(tmp_path, monkeypatch, scenario)


def test_a_malformed_stream_after_a_full_socket_sends_what_came_before_then_drops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(forwarder: forward.VsockToDevice, client: socket.socket) -> None:
        sender = ScriptedSender.opened[0]
        sender.fill(room=1)
        client.sendall(ipv4(100) + ipv4(101) + ipv4(102) + b"\x60" + bytes(40))  # then IPv6
        await until(lambda: sender.sent == [100], "the room there was")
        await settle()
        assert forwarder.stats.malformed_streams == 0  # not reached yet: packets in hand
        sender.drain()
        await until(lambda: forwarder.stats.malformed_streams == 1, "the stream dropped")
        assert sender.sent == [100, 101, 102]
        assert not forwarder.link_up
        assert forwarder.idle.is_set()

    run_forwarder(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize("hybrid", [False, True], ids=["vsock", "hybrid"])
def test_the_link_is_shut_for_writing_where_that_does_not_end_the_peers_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hybrid: bool
) -> None:
    """Nothing goes back on the link: over vsock its writing side is shut down, and the peer
    reads EOF. On hybrid vsock a SHUT_WR would be a full shutdown for the guest, so it is
    not sent: the guest's stream stays open (and the packets flow either way)."""

    async def scenario(forwarder: forward.VsockToDevice, client: socket.socket) -> bool:
        client.sendall(ipv4(100))
        await until(lambda: forwarder.stats.packets == 1, "the packet")
        client.setblocking(False)
        try:
            return client.recv(1) == b""
        except BlockingIOError:
            return False

    assert run_forwarder(tmp_path, monkeypatch, scenario, hybrid) is not hybrid
