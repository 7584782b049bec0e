"""nfqueue and the raw sender against the real kernel, inside network namespaces made here.

The test process creates its sockets inside the namespace (``setns`` on this thread, then back:
a socket stays in the namespace it was made in), so the packets it sends, the iptables rules
that queue them and the queue itself never touch the machine's own network.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pyroute2.netns import popns, pushns

from pf_proxy.raw.nfq import NfQueue, NfQueueError
from pf_proxy.raw.rawsock import SEND_BATCH, PacketRejected, RawSender
from tests.netns import Netns, netns

pytestmark = pytest.mark.root

SRC = Path(__file__).resolve().parents[2] / "src"
UDP_PORT = 9999


@contextmanager
def inside(ns: Netns) -> Iterator[None]:
    """Run the block in ``ns`` (this thread only); sockets made here stay in ``ns``."""
    pushns(ns.name)
    try:
        yield
    finally:
        popns()


@pytest.fixture
def queued() -> Iterator[Netns]:
    """A namespace whose outgoing UDP to port 9999 (IPv4) and 9998 (IPv6) goes to queue 0."""
    with netns("pfp-nfq") as ns:
        ns.run("ip", "link", "set", "lo", "mtu", "65536")
        ns.run("iptables", "-A", "OUTPUT", "-p", "udp", "--dport", str(UDP_PORT),
               "-j", "NFQUEUE", "--queue-num", "0")  # fmt: skip
        ns.run("ip6tables", "-A", "OUTPUT", "-p", "udp", "--dport", "9998",
               "-j", "NFQUEUE", "--queue-num", "0")  # fmt: skip
        yield ns


def queue_state(ns: Netns, queue_num: int) -> dict[str, int]:
    """The kernel's view of a queue, from /proc/net/netfilter/nfnetlink_queue."""
    text = ns.run("cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    names = ("queue", "port_id", "waiting", "copy_mode", "copy_range", "queue_dropped",
             "user_dropped", "last_id")  # fmt: skip
    for line in text.splitlines():
        values = dict(zip(names, map(int, line.split()), strict=False))
        if values["queue"] == queue_num:
            return values
    raise AssertionError(f"queue {queue_num} not bound:\n{text}")


def read_until(queue: NfQueue, count: int, timeout: float = 5.0) -> list[bytes]:
    """Packets from ``queue`` (copied) until ``count`` arrived, dropping them after each read."""
    packets: list[bytes] = []
    while len(packets) < count:
        readable, _, _ = select.select([queue], [], [], timeout)
        assert readable, f"only {len(packets)} of {count} packets arrived"
        packets += [bytes(view) for view in queue.read_packets()]
        queue.drop_read_packets()
    return packets


def nothing_arrives(sock: socket.socket, wait: float = 0.3) -> bool:
    readable, _, _ = select.select([sock], [], [], wait)
    return not readable


def udp_payload(size: int) -> bytes:
    """The UDP payload of a ``size``-byte IPv4 packet, numbered so a misplaced byte shows."""
    count = size - 28
    return (struct.pack("!I", size) + bytes(i % 251 for i in range(count)))[:count]


@pytest.mark.parametrize("sizes", [[60], [60, 1500, 9001, 65000]], ids=["one", "four-sizes"])
def test_packets_arrive_whole_and_the_batch_verdict_drops_them(
    queued: Netns, sizes: list[int]
) -> None:
    with inside(queued):
        queue = NfQueue.open(0)
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with queue, receiver, sender:
        receiver.bind(("127.0.0.1", UDP_PORT))
        for size in sizes:
            sender.sendto(udp_payload(size), ("127.0.0.1", UDP_PORT))
        state = queue_state(queued, 0)
        assert (state["waiting"], state["copy_mode"], state["copy_range"]) == (len(sizes), 2, 65531)

        packets: list[bytes] = []
        while len(packets) < len(sizes):
            assert select.select([queue], [], [], 5)[0], f"{len(packets)} of {len(sizes)} came"
            packets += [bytes(view) for view in queue.read_packets()]
        assert queue_state(queued, 0)["waiting"] == len(sizes)  # read, not yet given a verdict
        queue.drop_read_packets()

        assert [len(p) for p in packets] == sizes
        for packet, size in zip(packets, sizes, strict=True):
            assert packet[0] == 0x45 and packet[9] == socket.IPPROTO_UDP
            assert struct.unpack("!H", packet[2:4])[0] == size
            assert packet[12:20] == socket.inet_aton("127.0.0.1") * 2
            assert packet[28:] == udp_payload(size)
        assert queue.packets_read == len(sizes)
        assert (queue.overruns, queue.unusable_packets, queue.netlink_errors) == (0, 0, 0)
        state = queue_state(queued, 0)
        assert (state["waiting"], state["last_id"], state["user_dropped"]) == (0, len(sizes), 0)
        assert nothing_arrives(receiver), "a queued packet reached its socket despite DROP"
        assert queue.read_packets() == []


def test_nothing_queued_reads_empty_and_drop_is_a_no_op(queued: Netns) -> None:
    with inside(queued), NfQueue.open(0) as queue:
        assert queue.read_packets() == []
        queue.drop_read_packets()  # nothing read: no verdict to send
        assert queue_state(queued, 0)["waiting"] == 0


def test_a_queue_bound_by_another_process_is_a_clear_error(queued: Netns) -> None:
    holder = queued.popen(
        [sys.executable, "-c", "import sys; from pf_proxy.raw.nfq import NfQueue; "
         "q = NfQueue.open(7); print('bound', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline() == "bound\n"
    with inside(queued), pytest.raises(NfQueueError) as raised:
        NfQueue.open(7)
    assert raised.value.errno == errno.EPERM
    assert str(raised.value) == (
        "[Errno 1] failed to bind nfqueue 7: Operation not permitted "
        "(is another process bound to it? binding also needs CAP_NET_ADMIN)"
    )
    assert isinstance(raised.value, OSError)

    holder.stdin.close()  # the holder exits; its socket closes and the queue is free again
    assert holder.wait(timeout=10) == 0
    with inside(queued), NfQueue.open(7) as queue:
        assert queue.queue_num == 7
        assert queue_state(queued, 7)["copy_range"] == 65531


def test_a_queue_number_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="nfqueue number must be 0-65535, not 65536"):
        NfQueue.open(65536)


def test_an_overrun_is_counted_and_reading_goes_on(queued: Netns) -> None:
    with inside(queued):
        queue = NfQueue.open(0, receive_buffer_size=1)  # the kernel's minimum: a few messages
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with queue, receiver, sender:
        receiver.bind(("127.0.0.1", UDP_PORT))
        for _ in range(20):
            sender.sendto(udp_payload(1500), ("127.0.0.1", UDP_PORT))
        # The kernel queues only what it could deliver and drops the rest at once.
        state = queue_state(queued, 0)
        fitted = state["waiting"]
        assert 1 <= fitted < 20
        assert state["user_dropped"] == 20 - fitted

        assert [len(p) for p in queue.read_packets()] == [1500] * fitted
        assert queue.overruns == 1
        queue.drop_read_packets()
        assert queue_state(queued, 0)["waiting"] == 0

        sender.sendto(udp_payload(60), ("127.0.0.1", UDP_PORT))
        assert [len(p) for p in read_until(queue, 1)] == [60]  # reading goes on
        assert queue.overruns == 1
        assert queue_state(queued, 0)["waiting"] == 0
        assert nothing_arrives(receiver)


def test_a_packet_that_is_not_ipv4_is_counted_and_dropped(queued: Netns) -> None:
    with inside(queued):
        queue = NfQueue.open(0)
        receiver = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with queue, receiver, sender:
        receiver.bind(("::1", 9998))
        sender.sendto(b"not for the IPv4 stream", ("::1", 9998))
        sender.sendto(b"x", ("::1", 9998))
        assert select.select([queue], [], [], 5)[0]
        assert queue.read_packets() == []
        assert queue.unusable_packets == 2
        queue.drop_read_packets()
        assert queue_state(queued, 0)["waiting"] == 0
        assert nothing_arrives(receiver)


def test_a_burst_longer_than_a_batch_is_read_in_order_over_several_calls(queued: Netns) -> None:
    with inside(queued):
        queue = NfQueue.open(0, batch=16)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with queue, sender:
        for size in range(60, 60 + 40):
            sender.sendto(udp_payload(size), ("127.0.0.1", UDP_PORT))
        assert queue_state(queued, 0)["waiting"] == 40

        reads = []
        while sum(map(len, reads)) < 40:
            assert select.select([queue], [], [], 5)[0]
            reads.append([bytes(view) for view in queue.read_packets()])
            queue.drop_read_packets()  # before the next read: the views are reused
        assert [len(read) for read in reads] == [16, 16, 8]
        packets = [packet for read in reads for packet in read]
        assert [len(packet) for packet in packets] == list(range(60, 100))
        assert all(packet[28:] == udp_payload(len(packet)) for packet in packets)
        assert queue_state(queued, 0)["waiting"] == 0


def test_a_packet_longer_than_the_copy_range_is_counted_not_cut(queued: Netns) -> None:
    """65535 bytes fit lo's MTU but not the kernel's 65531-byte copy range."""
    with inside(queued):
        queue = NfQueue.open(0)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with queue, sender:
        sender.sendto(udp_payload(65535), ("127.0.0.1", UDP_PORT))
        sender.sendto(udp_payload(65531), ("127.0.0.1", UDP_PORT))
        assert [len(p) for p in read_until(queue, 1)] == [65531]
        assert queue.unusable_packets == 1
        assert queue_state(queued, 0)["waiting"] == 0


# The raw sender: packets written into a namespace's lo reach its sockets.


def ipv4_udp(size: int, destination: str = "127.0.0.1", port: int = UDP_PORT) -> bytes:
    """A ``size``-byte IPv4 UDP packet from 127.0.0.1 (UDP checksum 0: none, allowed in IPv4)."""
    payload = udp_payload(size)
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 1, 0x4000, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton("127.0.0.1"), socket.inet_aton(destination))  # fmt: skip
    return header + udp + payload


@pytest.fixture
def jumbo_lo() -> Iterator[Netns]:
    with netns("pfp-raw") as ns:
        ns.run("ip", "link", "set", "lo", "mtu", "9001")
        yield ns


def test_raw_sender_delivers_whole_packets_into_the_stack(jumbo_lo: Netns) -> None:
    with inside(jumbo_lo):
        sender = RawSender("lo")
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender, receiver:
        receiver.bind(("127.0.0.1", UDP_PORT))
        for size in (28, 60, 1500, 9001):
            assert sender.send(ipv4_udp(size)) is True
            assert receiver.recv(65536) == udp_payload(size)
        assert sender.send(memoryview(ipv4_udp(100))) is True
        assert receiver.recv(65536) == udp_payload(100)


def test_raw_sender_rejects_one_packet_and_goes_on(jumbo_lo: Netns) -> None:
    with inside(jumbo_lo):
        sender = RawSender("lo")
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender, receiver:
        receiver.bind(("127.0.0.1", UDP_PORT))
        with pytest.raises(PacketRejected) as raised:
            sender.send(ipv4_udp(9002))
        assert raised.value.errno == errno.EMSGSIZE
        assert str(raised.value) == (
            "raw send of 9002-byte packet to 127.0.0.1 failed: [Errno 90] Message too long"
        )
        assert not isinstance(raised.value, OSError)

        with pytest.raises(PacketRejected) as raised:
            sender.send(ipv4_udp(100, destination="255.255.255.255"))  # no SO_BROADCAST
        assert raised.value.errno == errno.EACCES

        jumbo_lo.run("iptables", "-A", "OUTPUT", "-d", "127.0.0.2", "-j", "DROP")
        with pytest.raises(PacketRejected) as raised:
            sender.send(ipv4_udp(100, destination="127.0.0.2"))
        assert raised.value.errno == errno.EPERM

        with pytest.raises(PacketRejected, match="raw send of 19-byte packet") as raised:
            sender.send(ipv4_udp(100)[:19])
        assert raised.value.errno == errno.EINVAL

        assert nothing_arrives(receiver)
        assert sender.send(ipv4_udp(9001)) is True  # the socket is still good
        assert receiver.recv(65536) == udp_payload(9001)


def test_raw_sender_batch_sends_each_packet_to_its_own_destination(jumbo_lo: Netns) -> None:
    with inside(jumbo_lo):
        sender = RawSender("lo")
        first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        second = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender, first, second:
        first.bind(("127.0.0.1", UDP_PORT))
        second.bind(("127.0.0.2", UDP_PORT))
        destinations = ["127.0.0.1", "127.0.0.2"] * 40
        packets = [ipv4_udp(100 + i, destination) for i, destination in enumerate(destinations)]
        views = [memoryview(bytearray(packet)) for packet in packets]
        assert sender.send_batch(views) == SEND_BATCH
        assert sender.send_batch(views[SEND_BATCH:]) == 80 - SEND_BATCH

        for receiver, offset in ((first, 0), (second, 1)):
            sizes = [len(receiver.recv(65536)) + 28 for _ in range(40)]
            assert sizes == list(range(100 + offset, 180, 2))
        assert nothing_arrives(first, 0.05) and nothing_arrives(second, 0.05)


def test_raw_sender_batch_stops_before_a_refused_packet_and_reports_it_next(
    jumbo_lo: Netns,
) -> None:
    with inside(jumbo_lo):
        sender = RawSender("lo")
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender, receiver:
        receiver.bind(("127.0.0.1", UDP_PORT))
        batch = [ipv4_udp(100), ipv4_udp(200), ipv4_udp(9002), ipv4_udp(100)[:19], ipv4_udp(300)]
        assert sender.send_batch(batch) == 2
        with pytest.raises(PacketRejected) as raised:
            sender.send_batch(batch[2:])
        assert raised.value.errno == errno.EMSGSIZE
        assert str(raised.value) == (
            "raw send of 9002-byte packet to 127.0.0.1 failed: [Errno 90] Message too long"
        )
        with pytest.raises(PacketRejected, match="raw send of 19-byte packet") as raised:
            sender.send_batch(batch[3:])
        assert raised.value.errno == errno.EINVAL
        assert sender.send_batch(batch[4:]) == 1
        assert [len(receiver.recv(65536)) + 28 for _ in range(3)] == [100, 200, 300]
        assert nothing_arrives(receiver, 0.05)


def test_raw_sender_batch_on_a_full_socket_sends_part_then_nothing() -> None:
    """A qdisc that releases 1 kB a second keeps the socket's (smallest) send buffer full."""
    with netns("pfp-raw-full") as ns:
        ns.run("ip", "link", "add", "slow0", "type", "veth", "peer", "name", "slow1")
        ns.run("ip", "link", "set", "slow0", "arp", "off", "up")  # no neighbour to resolve
        ns.run("ip", "link", "set", "slow1", "up")
        ns.run("ip", "addr", "add", "10.9.0.1/24", "dev", "slow0")
        ns.run("tc", "qdisc", "add", "dev", "slow0", "root",
               "tbf", "rate", "8kbit", "burst", "1600", "limit", "1000000")  # fmt: skip
        with inside(ns):
            sender = RawSender("slow0", send_buffer_size=1)
        with sender:
            packets = [ipv4_udp(1500, "10.9.0.2")] * SEND_BATCH
            sent = sender.send_batch(packets)
            assert 0 < sent < SEND_BATCH
            assert sender.send_batch(packets[sent:]) == 0
            assert not select.select([], [sender], [], 0.1)[1]  # writable only once drained


def test_raw_sender_on_a_missing_device_names_it(jumbo_lo: Netns) -> None:
    with inside(jumbo_lo), pytest.raises(OSError) as raised:
        RawSender("pfp-nodev0")
    assert raised.value.errno == errno.ENODEV
    assert str(raised.value) == (
        "[Errno 19] failed to bind raw socket to device pfp-nodev0: No such device"
    )


def test_raw_sender_on_a_closed_socket_raises_oserror(jumbo_lo: Netns) -> None:
    with inside(jumbo_lo):
        sender = RawSender("lo")
    sender.close()
    with pytest.raises(OSError) as raised:
        sender.send(ipv4_udp(60))
    assert raised.value.errno == errno.EBADF
