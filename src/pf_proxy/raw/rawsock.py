"""Raw IPv4 output bound to one network device: how packets from vsock re-enter IP.

``vsock-to-ip-raw-incoming`` writes the host's packets into the enclave's stack through ``lo``;
``vsock-to-ip-raw-outgoing`` writes the enclave's packets out of the host's interface. Both
send whole IPv4 packets, header included, to each packet's own destination address.

The socket is ``AF_INET``/``SOCK_RAW``/``IPPROTO_RAW``. IPPROTO_RAW implies ``IP_HDRINCL``
(the header is ours; the kernel only fills in the header checksum, and the total length from
the send size) and is never handed any received packet, because no IP protocol number 255
arrives. The originals open an ``IPPROTO_TCP`` raw socket and set its receive buffer to 0 so
the copies of every TCP packet it is handed are thrown away; IPPROTO_RAW needs no such trick.

A send can fail two ways, and the caller treats them differently:

- the packet is refused (over the device MTU: ``EMSGSIZE``; no route, firewall, a bad header):
  :class:`PacketRejected`, to drop and count that one packet and go on;
- the socket itself is broken (``EBADF``, the device gone: ``ENODEV``...): ``OSError``, to
  reopen the socket.

A full send buffer is neither: :meth:`RawSender.send` returns False, to wait for writability.

:meth:`RawSender.send_batch` sends a run of packets with one ``sendmmsg`` (:mod:`mmsg`),
each to its own destination, and keeps those semantics per packet: the kernel stops at the
first packet it refuses and reports how many went before it, so a refusal surfaces as the
first packet of the next call, on its own.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence

from pf_proxy.raw.mmsg import Datagram, SendBatch

__all__ = ["PER_PACKET_ERRNOS", "SEND_BATCH", "PacketRejected", "RawSender"]

SEND_BATCH = 64
"""Packets one :meth:`RawSender.send_batch` sends at most (one ``sendmmsg``)."""

_SOCKADDR_IN = struct.Struct("=H2x4s8x")  # netinet/in.h: family (host order), port, address, zero
_ADDRESS_OFFSET = 4  # where sin_addr is in a struct sockaddr_in

PER_PACKET_ERRNOS = frozenset(
    {
        errno.EMSGSIZE,  # larger than the device MTU
        errno.EINVAL,  # header the kernel will not send (IHL past the end, ...)
        errno.ENETUNREACH,  # no route to this destination
        errno.EHOSTUNREACH,
        errno.ENETDOWN,  # the device is down: this packet is lost, the socket is fine
        errno.EHOSTDOWN,
        errno.EACCES,  # a broadcast destination
        errno.EPERM,  # refused by a netfilter OUTPUT rule
        errno.EADDRNOTAVAIL,
        errno.ENOBUFS,  # the device queue is full: IP may drop
        errno.ECONNREFUSED,  # a pending ICMP error from an earlier packet
    }
)
"""Send errors that condemn one packet, not the socket."""


class PacketRejected(Exception):
    """The kernel refused one packet; the socket is still good.

    Deliberately not an OSError, so ``except OSError`` (reopen the socket) cannot swallow it.
    ``errno`` is the kernel's reason; the message names the packet's size and destination.
    """

    def __init__(self, error: OSError, size: int, destination: str) -> None:
        super().__init__(f"raw send of {size}-byte packet to {destination} failed: {error}")
        self.errno = error.errno


def _too_short(packet: Datagram) -> PacketRejected:
    return PacketRejected(
        OSError(errno.EINVAL, "shorter than an IPv4 header"), len(packet), "nowhere"
    )


class RawSender:
    """A non-blocking raw IPv4 socket bound to ``device``, sending header-included packets."""

    def __init__(self, device: str, send_buffer_size: int | None = None) -> None:
        """Open the socket and bind it to ``device``; OSError names the device on failure."""
        self.device = device
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            try:
                self._sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode() + b"\0"
                )
            except OSError as error:
                raise OSError(
                    error.errno, f"failed to bind raw socket to device {device}: {error.strerror}"
                ) from error
            if send_buffer_size is not None:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_size)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise
        self._batch = SendBatch(SEND_BATCH, _SOCKADDR_IN.size)
        for index in range(SEND_BATCH):  # the port stays 0; send_batch writes the addresses
            _SOCKADDR_IN.pack_into(
                self._batch.names, index * _SOCKADDR_IN.size, socket.AF_INET, bytes(4)
            )

    def fileno(self) -> int:
        """The socket, for waiting until it is writable again."""
        return self._sock.fileno()

    def send(self, packet: bytes | bytearray | memoryview) -> bool:
        """Send one IPv4 packet to its destination address (bytes 16-19 of its header).

        True when sent; False when the send buffer is full (wait for :meth:`fileno` to be
        writable and send the same packet again). Raises :class:`PacketRejected` when the
        kernel refuses this packet, OSError when the socket is broken.
        """
        if len(packet) < 20:
            raise _too_short(packet)
        destination = socket.inet_ntoa(packet[16:20])
        try:
            self._sock.sendto(packet, (destination, 0))
        except BlockingIOError:
            return False
        except OSError as error:
            if error.errno in PER_PACKET_ERRNOS:
                raise PacketRejected(error, len(packet), destination) from error
            raise
        return True

    def send_batch(self, packets: Sequence[Datagram]) -> int:
        """Send the first packets (up to :data:`SEND_BATCH`) with one ``sendmmsg``, each to
        its destination address.

        Returns how many were sent, in order: at least one, or 0 when the send buffer is full
        (wait for :meth:`fileno` to be writable and send the rest again). Sending stops before
        a packet the kernel refuses; when that packet comes first, :class:`PacketRejected`
        is raised for it alone (none was sent: drop it and send the rest). Raises OSError
        when the socket is broken.
        """
        batch = packets[:SEND_BATCH]
        names, offset = self._batch.names, _ADDRESS_OFFSET
        for index, packet in enumerate(batch):
            if len(packet) < 20:  # no destination to take: refused alone, as send() does
                if index == 0:
                    raise _too_short(packet)
                batch = batch[:index]
                break
            names[offset : offset + 4] = packet[16:20]
            offset += _SOCKADDR_IN.size
        try:
            return self._batch.send(self._sock.fileno(), batch)
        except BlockingIOError:
            return 0
        except OSError as error:
            if error.errno in PER_PACKET_ERRNOS:
                first = batch[0]
                destination = socket.inet_ntoa(first[16:20])
                raise PacketRejected(error, len(first), destination) from error
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RawSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
