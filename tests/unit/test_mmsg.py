"""recvmmsg/sendmmsg through ctypes, over real sockets: AF_UNIX datagram pairs and UDP on loopback.

Each test checks what came out of the other end (bytes, sizes, order, flags) and the errors as
the socket module would raise them.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections.abc import Iterator

import pytest

from pf_proxy.raw.mmsg import (
    MSG_DONTWAIT,
    MSG_TRUNC,
    UIO_MAXIOV,
    Iovec,
    Mmsghdr,
    Msghdr,
    ReceiveBatch,
    SendBatch,
)

SOCKADDR_IN = struct.Struct("=H2s4s8x")  # family (host order), port and address (network order)


def numbered(count: int, size: int = 32) -> list[bytes]:
    """`count` datagrams, each `size` bytes that say which one it is."""
    return [(b"%04d" % index * size)[:size] for index in range(count)]


def field_offset(structure: type[ctypes.Structure], name: str) -> int:
    offset: int = getattr(structure, name).offset  # the class attribute is ctypes' descriptor
    return offset


def received(batch: ReceiveBatch, sizes: list[int]) -> list[bytes]:
    return [bytes(batch.datagram(index, size)) for index, size in enumerate(sizes)]


@pytest.fixture
def unix_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with left, right:
        yield left, right


@pytest.fixture
def udp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A UDP sender connected to a UDP receiver, both on 127.0.0.1."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.bind(("127.0.0.1", 0))
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sender.connect(receiver.getsockname())
        yield sender, receiver


def test_the_structures_have_the_c_layout() -> None:
    pointer = ctypes.sizeof(ctypes.c_void_p)
    assert ctypes.sizeof(Iovec) == 2 * pointer
    # name, namelen (padded to a pointer), iov, iovlen, control, controllen, flags (padded)
    assert ctypes.sizeof(Msghdr) == 7 * pointer
    assert field_offset(Msghdr, "msg_iov") == 2 * pointer
    assert field_offset(Msghdr, "msg_flags") == 6 * pointer
    assert field_offset(Mmsghdr, "msg_len") == ctypes.sizeof(Msghdr)
    assert ctypes.sizeof(Mmsghdr) == 8 * pointer


def test_many_datagrams_each_way_in_one_call(
    unix_pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = unix_pair
    datagrams = numbered(8, 100)
    assert SendBatch(8).send(left.fileno(), datagrams) == 8

    batch = ReceiveBatch(16, 2048)
    sizes = batch.receive(right.fileno())
    assert sizes == [100] * 8
    assert received(batch, sizes) == datagrams
    assert not any(batch.truncated(index) for index in range(8))


def test_buffers_of_every_kind_are_sent_where_they_lie_or_copied(
    udp_pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = udp_pair
    whole = bytearray(b"abcdefgh")
    datagrams: list[bytes | bytearray | memoryview] = [
        b"bytes",
        whole,
        memoryview(whole)[2:5],
        memoryview(b"read-only view"),
        b"",
    ]
    assert SendBatch(8).send(sender.fileno(), datagrams) == 5

    batch = ReceiveBatch(8, 64)
    sizes = batch.receive(receiver.fileno())
    assert received(batch, sizes) == [b"bytes", b"abcdefgh", b"cde", b"read-only view", b""]


def test_a_batch_takes_at_most_its_slots_and_the_rest_waits(
    udp_pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = udp_pair
    datagrams = numbered(10)
    sent = SendBatch(4)
    assert sent.send(sender.fileno(), datagrams) == 4  # the first four slots' worth
    assert sent.send(sender.fileno(), datagrams[4:]) == 4
    assert sent.send(sender.fileno(), datagrams[8:]) == 2  # a partial batch

    batch = ReceiveBatch(6, 64)
    first = received(batch, batch.receive(receiver.fileno()))
    second = received(batch, batch.receive(receiver.fileno()))
    assert (first, second) == (datagrams[:6], datagrams[6:])


def test_nothing_waiting_is_blocking_io_error(
    unix_pair: tuple[socket.socket, socket.socket],
) -> None:
    _, right = unix_pair
    with pytest.raises(BlockingIOError) as raised:
        ReceiveBatch(4, 64).receive(right.fileno())
    assert raised.value.errno == errno.EAGAIN
    assert raised.value.strerror == "Resource temporarily unavailable"


def test_a_full_peer_takes_part_of_a_batch_then_blocking_io_error(
    unix_pair: tuple[socket.socket, socket.socket],
) -> None:
    """The sender's buffer, at its smallest, holds a few datagrams not yet received."""
    left, right = unix_pair
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # raised to the kernel's minimum
    datagrams = numbered(64, 1000)
    batch = SendBatch(64)
    sent = batch.send(left.fileno(), datagrams)
    assert 0 < sent < 64
    with pytest.raises(BlockingIOError):
        batch.send(left.fileno(), datagrams[sent:])

    receiving = ReceiveBatch(64, 1000)
    assert received(receiving, receiving.receive(right.fileno())) == datagrams[:sent]


def test_a_datagram_longer_than_its_slot_is_cut_and_flagged(
    unix_pair: tuple[socket.socket, socket.socket],
) -> None:
    left, right = unix_pair
    SendBatch(4).send(left.fileno(), [b"0123456789", b"fits", b"abcdefgh"])
    batch = ReceiveBatch(4, 8)
    sizes = batch.receive(right.fileno())
    assert sizes == [8, 4, 8]
    assert received(batch, sizes) == [b"01234567", b"fits", b"abcdefgh"]
    assert [batch.truncated(index) for index in range(3)] == [True, False, False]


def test_msg_trunc_in_the_flags_reports_each_datagrams_own_length(
    udp_pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = udp_pair
    SendBatch(4).send(sender.fileno(), [b"x" * 100, b"y" * 8])
    batch = ReceiveBatch(4, 8)
    sizes = batch.receive(receiver.fileno(), MSG_DONTWAIT | MSG_TRUNC)
    assert sizes == [100, 8]  # over slot_size: cut
    assert batch.truncated(0) and not batch.truncated(1)
    assert bytes(batch.datagram(0, sizes[0])) == b"x" * 8  # the slot holds what fitted


def test_each_datagram_goes_to_the_address_in_its_name_slot() -> None:
    receivers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender, receivers[0], receivers[1], receivers[2]:
        for receiver in receivers:
            receiver.bind(("127.0.0.1", 0))
        batch = SendBatch(4, SOCKADDR_IN.size)
        order = [2, 0, 1, 2]
        for slot, which in enumerate(order):
            host, port = receivers[which].getsockname()
            address = (socket.AF_INET, struct.pack("!H", port), socket.inet_aton(host))
            SOCKADDR_IN.pack_into(batch.names, slot * SOCKADDR_IN.size, *address)
        assert batch.send(sender.fileno(), [b"a", b"b", b"c", b"d"]) == 4

        receiving = ReceiveBatch(4, 16)
        got = [received(receiving, receiving.receive(r.fileno())) for r in receivers]
        assert got == [[b"b"], [b"c"], [b"a", b"d"]]


def test_a_refused_datagram_ends_the_batch_and_is_reported_by_the_next_call(
    udp_pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = udp_pair
    too_long = bytes(70000)  # over UDP's 65507: EMSGSIZE
    datagrams = [b"one", b"two", too_long, b"four"]
    batch = SendBatch(8)
    assert batch.send(sender.fileno(), datagrams) == 2
    with pytest.raises(OSError) as raised:
        batch.send(sender.fileno(), datagrams[2:])
    assert raised.value.errno == errno.EMSGSIZE
    assert str(raised.value) == "[Errno 90] Message too long"
    assert batch.send(sender.fileno(), datagrams[3:]) == 1

    receiving = ReceiveBatch(8, 64)
    assert received(receiving, receiving.receive(receiver.fileno())) == [b"one", b"two", b"four"]


def test_errors_are_oserrors_with_the_errno_as_the_socket_module_raises_them() -> None:
    unconnected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with unconnected:
        with pytest.raises(OSError) as raised:
            SendBatch(2).send(unconnected.fileno(), [b"nowhere to go"])
        assert raised.value.errno == errno.EDESTADDRREQ
    closed = unconnected.fileno()  # -1 once closed
    with pytest.raises(OSError) as raised:
        ReceiveBatch(2, 16).receive(closed)
    assert (raised.value.errno, raised.value.strerror) == (errno.EBADF, "Bad file descriptor")
    with pytest.raises(OSError) as raised:
        SendBatch(2).send(closed, [b"x"])
    assert raised.value.errno == errno.EBADF


def test_an_empty_send_is_no_call() -> None:
    assert SendBatch(2).send(-1, []) == 0  # -1 would be EBADF: no system call was made


@pytest.mark.parametrize("slots", [0, UIO_MAXIOV + 1])
def test_slot_counts_outside_what_the_kernel_takes_are_refused(slots: int) -> None:
    with pytest.raises(ValueError, match=f"slots must be 1-1024, not {slots}"):
        SendBatch(slots)
    with pytest.raises(ValueError, match=f"slots must be 1-1024, not {slots}"):
        ReceiveBatch(slots, 64)


def test_sizes_must_make_sense() -> None:
    with pytest.raises(ValueError, match="slot_size must be positive, not 0"):
        ReceiveBatch(4, 0)
    with pytest.raises(ValueError, match="name_size must not be negative, not -1"):
        SendBatch(4, -1)


def test_slots_are_reused_call_after_call(unix_pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = unix_pair
    sending, receiving = SendBatch(4), ReceiveBatch(4, 64)
    view = receiving.view
    for round_ in range(50):
        datagrams = [b"%d-%d" % (round_, index) for index in range(4)]
        assert sending.send(left.fileno(), datagrams) == 4
        assert received(receiving, receiving.receive(right.fileno())) == datagrams
    assert receiving.view is view  # the same buffer throughout
