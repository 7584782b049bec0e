"""nfqueue spoken directly over netlink: read queued IPv4 packets whole, give them the verdict DROP.

``ip-to-vsock-raw-incoming`` and ``ip-to-vsock-raw-outgoing`` take every packet iptables sends
to an NFQUEUE, write it to vsock and drop it, so the local stack never sees it. The
NetfilterQueue package cannot do this at MTU 9001: it caps the copy range at 4016 bytes, and a
truncated packet whose total-length field still says 9001 corrupts the stream framing. The
protocol is small, so this module speaks it over a plain ``AF_NETLINK``/``NETLINK_NETFILTER``
socket with ``struct`` on one reused buffer:

- one ``NFQNL_MSG_CONFIG`` binds the queue and sets copy mode ``NFQNL_COPY_PACKET`` with the
  largest range. The kernel caps that at 65531 bytes: only a device with a larger MTU (``lo``
  at its default 65536) can queue a longer packet, and such a packet, arriving cut, is counted
  and dropped rather than returned. The ACK is checked, so a queue that another process holds
  is a clear error;
- :meth:`NfQueue.read_packets` receives the messages waiting on the socket with one
  ``recvmmsg`` (:mod:`mmsg`) and returns the packets as memoryviews of the buffer they
  arrived in. The kernel sends each packet as a datagram of its own (one
  ``NFQNL_MSG_PACKET`` each, seen on Linux 6.18), so a burst of N packets was N ``recv_into``
  calls and is now one call; the parser still walks every message in a datagram. Each
  datagram gets a slot big enough for the largest message the queue can send (a full copy
  range plus metadata, 68 KiB), because a netlink datagram cut short is gone: the kernel
  discards the rest, and with it the packet. Slots that size cost address space rather than
  memory (see :class:`mmsg.ReceiveBatch`): at MTU 9001, 64 slots keep about 0.8 MiB
  resident, less than the 1 MiB read buffer they replace;
- :meth:`NfQueue.drop_read_packets` sends one ``NFQNL_MSG_VERDICT_BATCH``: DROP for every
  packet up to the last one read.

Faithful to the originals, the queue does not fail open (no ``NFQA_CFG_F_FAIL_OPEN``): when
nobody reads, or the kernel queue (1024 packets by default) is full, packets are dropped, as IP
allows. Nor is ``NFQA_CFG_F_GSO`` set, so the kernel segments GSO packets and fills in partial
checksums before queueing: every packet read is a real IPv4 packet. The ``PF_BIND``/
``PF_UNBIND`` commands that old tutorials send first have been no-ops since Linux 3.8 and are
not sent. Closing the socket unbinds the queue (the kernel drops what is still queued).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from pf_proxy.raw.mmsg import MSG_DONTWAIT, MSG_TRUNC, ReceiveBatch

__all__ = ["NfQueue", "NfQueueError"]

# Netlink (linux/netlink.h, linux/socket.h)
NETLINK_NETFILTER = 12  # linux/netlink.h: protocol of the netfilter netlink family
SOL_NETLINK = 270  # linux/socket.h: socket option level for netlink
NLMSG_ERROR = 2  # linux/netlink.h: error or ACK message
NLM_F_REQUEST = 0x1  # linux/netlink.h: a request
NLM_F_ACK = 0x4  # linux/netlink.h: reply with an ACK (an NLMSG_ERROR with error 0)
NLA_TYPE_MASK = 0x3FFF  # linux/netlink.h: attribute type without NLA_F_NESTED/NET_BYTEORDER
SO_RCVBUFFORCE = 33  # asm-generic/socket.h: SO_RCVBUF beyond rmem_max (CAP_NET_ADMIN)

# nfnetlink (linux/netfilter/nfnetlink.h, linux/netfilter.h)
NFNL_SUBSYS_QUEUE = 3  # linux/netfilter/nfnetlink.h: the queue subsystem
NFNETLINK_V0 = 0  # linux/netfilter/nfnetlink.h: nfgenmsg version
NF_DROP = 0  # linux/netfilter.h: verdict DROP

# nfqueue (linux/netfilter/nfnetlink_queue.h)
NFQNL_MSG_PACKET = 0  # nfnetlink_queue.h: kernel to user, a queued packet
NFQNL_MSG_CONFIG = 2  # nfnetlink_queue.h: user to kernel, configure a queue
NFQNL_MSG_VERDICT_BATCH = 3  # nfnetlink_queue.h: user to kernel, verdict up to an id
NFQA_PACKET_HDR = 1  # nfnetlink_queue.h: struct nfqnl_msg_packet_hdr (packet id first)
NFQA_VERDICT_HDR = 2  # nfnetlink_queue.h: struct nfqnl_msg_verdict_hdr (verdict, id)
NFQA_PAYLOAD = 10  # nfnetlink_queue.h: the packet, from its IP header
NFQA_CAP_LEN = 13  # nfnetlink_queue.h: present when the payload was cut to the copy range
NFQA_CFG_CMD = 1  # nfnetlink_queue.h: struct nfqnl_msg_config_cmd
NFQA_CFG_PARAMS = 2  # nfnetlink_queue.h: struct nfqnl_msg_config_params
NFQNL_CFG_CMD_BIND = 1  # nfnetlink_queue.h: bind this socket to the queue
NFQNL_COPY_PACKET = 2  # nfnetlink_queue.h: copy the packet itself, up to the copy range

COPY_RANGE = 0xFFFF
"""Copy range asked for; the kernel caps it at 0xFFFF less an attribute header (65531)."""

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_LENGTH_TYPE = struct.Struct("=IH")  # the start of _NLMSGHDR: all the data path needs
_NFGENMSG = struct.Struct(">BBH")  # family, version, resource id (the queue, big-endian)
_NLATTR = struct.Struct("=HH")  # length, type
_NLMSGERR = struct.Struct("=i")  # negative errno, or 0 for an ACK
_PACKET_ID = struct.Struct(">I")
_CONFIG_CMD = struct.Struct(">BxH")  # command, pad, protocol family
_CONFIG_PARAMS = struct.Struct(">IB")  # copy range, copy mode
_VERDICT = struct.Struct(">II")  # verdict, packet id
_TOTAL_LENGTH = struct.Struct("!H")
_HEADERS = _NLMSGHDR.size + _NFGENMSG.size
_PACKET_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
_LARGEST_MESSAGE = 0x10000 + 4096  # a full copy range plus every metadata attribute
READ_BATCH = 64
"""Datagrams (packets) one :meth:`NfQueue.read_packets` takes at most. More is not faster:
the forwarder comes back for the rest at once (measured in benchmarks/rawpath.py)."""


class NfQueueError(OSError):
    """Binding or configuring the queue failed; ``errno`` is the kernel's answer."""


def _attribute(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + bytes(-length % 4)


def _message(kind: int, flags: int, sequence: int, queue_num: int, attributes: bytes) -> bytes:
    header = _NLMSGHDR.pack(_HEADERS + len(attributes), kind, flags, sequence, 0)
    return header + _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue_num) + attributes


class NfQueue:
    """One bound nfqueue, non-blocking, for an event loop's ``add_reader``.

    Open with :meth:`open`; then, each time :meth:`fileno` is readable: :meth:`read_packets`,
    send the packets on, :meth:`drop_read_packets`. Counters say what was lost on the way.
    """

    def __init__(self, sock: socket.socket, queue_num: int, batch: int) -> None:
        """Use :meth:`open`; this wraps a socket already bound to the queue."""
        self.queue_num = queue_num
        self.packets_read = 0
        """Packets returned by :meth:`read_packets` so far."""
        self.overruns = 0
        """Times the socket's receive buffer overflowed (ENOBUFS). The kernel dropped the
        packets it could not deliver at once (they count as user_dropped in
        /proc/net/netfilter/nfnetlink_queue); nothing is left waiting for a verdict."""
        self.unusable_packets = 0
        """Queued packets not returned because they were not whole IPv4 packets (cut by the
        copy range, or another protocol queued here); they are dropped with the rest."""
        self.netlink_errors = 0
        """Error messages the kernel sent back on the data path (a verdict it refused)."""
        self.batch = batch
        """The most packets one :meth:`read_packets` returns."""
        self._sock = sock
        self._batch = ReceiveBatch(batch, _LARGEST_MESSAGE)
        self._view = self._batch.view
        self._last_id: int | None = None  # the last packet id read
        self._last_header = -1  # where the batch's last packet id is, until it is read
        self._dropped_through: int | None = None  # the id of the last batch verdict sent
        self._verdict = bytearray(
            _message(
                (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH,
                NLM_F_REQUEST,
                0,
                queue_num,
                _attribute(NFQA_VERDICT_HDR, _VERDICT.pack(NF_DROP, 0)),
            )
        )

    @classmethod
    def open(
        cls,
        queue_num: int,
        *,
        receive_buffer_size: int = 8 << 20,
        batch: int = READ_BATCH,
        timeout: float = 5.0,
    ) -> NfQueue:
        """Bind nfqueue ``queue_num`` (0-65535) in this network namespace, copying whole packets.

        ``receive_buffer_size`` is the socket's receive buffer, which holds packets waiting to
        be read; ``batch`` is how many packets one :meth:`read_packets` takes at most.
        Raises :class:`NfQueueError` when the kernel refuses, e.g. because another socket
        holds the queue.
        """
        if not 0 <= queue_num <= 0xFFFF:
            raise ValueError(f"nfqueue number must be 0-65535, not {queue_num}")
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer_size)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_size)
            sock.settimeout(timeout)
            config = _attribute(
                NFQA_CFG_CMD, _CONFIG_CMD.pack(NFQNL_CFG_CMD_BIND, socket.AF_UNSPEC)
            ) + _attribute(NFQA_CFG_PARAMS, _CONFIG_PARAMS.pack(COPY_RANGE, NFQNL_COPY_PACKET))
            request = _message(
                (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG,
                NLM_F_REQUEST | NLM_F_ACK,
                1,
                queue_num,
                config,
            )
            sock.send(request)
            code = _await_ack(sock, 1)
            if code:
                hint = ""
                if code in (errno.EPERM, errno.EBUSY):
                    hint = " (is another process bound to it? binding also needs CAP_NET_ADMIN)"
                raise NfQueueError(
                    code, f"failed to bind nfqueue {queue_num}: {os.strerror(code)}{hint}"
                )
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(sock, queue_num, batch)

    def fileno(self) -> int:
        """The netlink socket, readable when packets are queued."""
        return self._sock.fileno()

    def read_packets(self) -> list[memoryview]:
        """The packets waiting (up to a batch), oldest first; [] if none.

        The memoryviews point into a reused buffer: they are valid until the next call.
        Send them on (``sock.sendmsg(packets)`` sends them all without joining), then call
        :meth:`drop_read_packets`. An overflowed socket buffer (ENOBUFS) is counted in
        :attr:`overruns` and reading goes on; other socket errors are raised.
        """
        batch = self._batch
        while True:
            try:
                # MSG_TRUNC: each size is the datagram's own, so a cut one shows as too big.
                sizes = batch.receive(self._sock.fileno(), MSG_DONTWAIT | MSG_TRUNC)
            except BlockingIOError:
                return []
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                continue
            break
        packets: list[memoryview] = []
        start, slot_size = 0, batch.slot_size
        for size in sizes:
            if size <= slot_size:
                self._parse(start, start + size, packets)
            else:  # cannot happen with slots for the largest message; counted if it does
                self.unusable_packets += 1
            start += slot_size
        if self._last_header >= 0:  # ids rise: the last packet's is the one the verdict needs
            (self._last_id,) = _PACKET_ID.unpack_from(self._view, self._last_header)
            self._last_header = -1
        self.packets_read += len(packets)
        return packets

    def drop_read_packets(self) -> None:
        """Give the verdict DROP, in one batch message, to every packet read so far.

        The kernel drops every packet still queued with an id up to the last one read. Does
        nothing when nothing new was read.
        """
        if self._last_id is None or self._last_id == self._dropped_through:
            return
        _VERDICT.pack_into(
            self._verdict, len(self._verdict) - _VERDICT.size, NF_DROP, self._last_id
        )
        self._sock.send(self._verdict)
        self._dropped_through = self._last_id

    def close(self) -> None:
        """Close the socket; the kernel unbinds the queue and drops what it still holds."""
        self._sock.close()

    def __enter__(self) -> NfQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _parse(self, start: int, end: int, packets: list[memoryview]) -> None:
        """Append the whole IPv4 packets in the netlink messages at ``view[start:end]``."""
        view = self._view
        while end - start >= _NLMSGHDR.size:
            length, kind = _LENGTH_TYPE.unpack_from(view, start)
            if length < _NLMSGHDR.size or start + length > end:
                return  # a cut message: nothing after it can be trusted
            if kind == _PACKET_TYPE:
                header, payload, payload_end = self._find_attributes(
                    start + _HEADERS, start + length
                )
                if header >= 0:
                    self._last_header = header
                    size = payload_end - payload
                    if (
                        size >= 20
                        and view[payload] >> 4 == 4
                        and _TOTAL_LENGTH.unpack_from(view, payload + 2)[0] == size
                    ):
                        packets.append(view[payload:payload_end])
                    else:
                        self.unusable_packets += 1
            elif kind == NLMSG_ERROR and _NLMSGERR.unpack_from(view, start + _NLMSGHDR.size)[0]:
                self.netlink_errors += 1
            start += (length + 3) & ~3

    def _find_attributes(self, start: int, end: int) -> tuple[int, int, int]:
        """Where a packet message's id is, and where its payload starts and ends; the id's
        place is -1 when the message has none."""
        view = self._view
        header = payload = payload_end = -1
        while end - start >= _NLATTR.size:
            length, kind = _NLATTR.unpack_from(view, start)
            if length < _NLATTR.size or start + length > end:
                break
            kind &= NLA_TYPE_MASK
            if kind == NFQA_PACKET_HDR:
                header = start + _NLATTR.size
            elif kind == NFQA_PAYLOAD:
                payload, payload_end = start + _NLATTR.size, start + length
            start += (length + 3) & ~3
        return header, payload, payload_end


def _await_ack(sock: socket.socket, sequence: int) -> int:
    """Wait for the kernel's answer to request ``sequence``: 0 for an ACK, else the errno."""
    buffer = bytearray(_LARGEST_MESSAGE)
    while True:
        received = sock.recv_into(buffer)
        start = 0
        while received - start >= _NLMSGHDR.size:
            length, kind, _flags, seq, _port = _NLMSGHDR.unpack_from(buffer, start)
            if length < _NLMSGHDR.size:
                break
            if kind == NLMSG_ERROR and seq == sequence:
                (error,) = _NLMSGERR.unpack_from(buffer, start + _NLMSGHDR.size)
                return -int(error)
            start += (length + 3) & ~3


# /proc/net/netfilter/nfnetlink_queue, one line per bound queue (net/netfilter/nfnetlink_queue.c,
# seq_show): queue number, peer port id, packets waiting, copy mode, copy range, dropped for
# a full queue, dropped because delivery to us failed, last packet id, 1.
KERNEL_QUEUE_STATS = "/proc/net/netfilter/nfnetlink_queue"


def parse_queue_stats(text: str, queue_num: int) -> dict[str, int] | None:
    """The kernel's counters of one queue from that file's text; None if it is not bound."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 7 and fields[0] == str(queue_num):
            try:
                waiting, queue_dropped, user_dropped = (int(fields[i]) for i in (2, 5, 6))
            except ValueError:
                return None
            return {
                "waiting": waiting,
                "queue_dropped": queue_dropped,
                "user_dropped": user_dropped,
            }
    return None


def kernel_queue_stats(queue_num: int) -> dict[str, int] | None:
    """`parse_queue_stats` of this network namespace's file (None if unreadable)."""
    try:
        with open(KERNEL_QUEUE_STATS) as stats:
            return parse_queue_stats(stats.read(), queue_num)
    except OSError:
        return None
