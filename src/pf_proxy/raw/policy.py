"""Which raw packets the proxies let through, and counting the ones they drop.

Pure functions over packet bytes, no I/O. The checks are the originals':

- incoming (host to enclave, ``vsock-to-ip-raw-incoming``): the destination must be the
  enclave's address;
- outgoing (enclave to the network, ``vsock-to-ip-raw-outgoing``): the enclave is untrusted,
  so the source must be the interface's address, the destination must be outside the reserved
  ranges, and the TCP source port must be 80, 443 or 1024-61439 (the host keeps 61440-65535;
  that split is what lets host and enclave share one address without NAT).

What the originals lack, added here: a packet that is not TCP is dropped on the way out (the
originals send it unchecked), and a packet too short to hold the headers a check reads is a
drop reason, never an exception. A non-first fragment is dropped on the way out too: it has no
TCP header, so its source port cannot be checked (and overlapping fragments could rewrite one).

A check returns ``None`` to let the packet through, or a :class:`Drop` reason so the caller can
count drops by reason in a :class:`DropCounters`.
"""

from __future__ import annotations

import enum
import struct
from collections import Counter
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

__all__ = [
    "ALLOWED_SOURCE_PORTS",
    "RESERVED_NETWORKS",
    "Drop",
    "DropCounters",
    "IncomingPolicy",
    "OutgoingPolicy",
    "is_allowed_source_port",
    "is_reserved",
]

RESERVED_NETWORKS: tuple[IPv4Network, ...] = tuple(
    IPv4Network(network)
    for network in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "233.252.0.0/24",
        "240.0.0.0/4",
        "255.255.255.255/32",
    )
)
"""Destinations the enclave may never reach through the host: the originals' list, verbatim."""

ALLOWED_SOURCE_PORTS: tuple[range, ...] = (range(80, 81), range(443, 444), range(1024, 61440))
"""TCP source ports the enclave may use: 80, 443 and 1024-61439 (the host keeps 61440-65535)."""


def _reserved_by_first_octet() -> tuple[tuple[tuple[int, int], ...] | None, ...]:
    """For each first octet: None if every address starting with it is reserved, else the
    (network, mask) pairs of the reserved networks inside it (usually none). One lookup then
    settles most packets, however long the list."""
    table: list[tuple[tuple[int, int], ...] | None] = []
    for octet in range(256):
        low, high = octet << 24, (octet << 24) | 0xFFFFFF
        inside = []
        whole = False
        for network in RESERVED_NETWORKS:
            first, last = int(network.network_address), int(network.broadcast_address)
            if first <= low and high <= last:
                whole = True
            elif low <= first <= high:
                inside.append((first, int(network.netmask)))
        table.append(None if whole else tuple(inside))
    return tuple(table)


_RESERVED_BY_FIRST_OCTET = _reserved_by_first_octet()
# The fixed IPv4 header fields the outgoing check reads, in one unpack (it runs per packet):
# version/IHL, flags/fragment offset, protocol, source (bytes), destination (a number).
_OUTGOING_FIELDS = struct.Struct("!B5xHxB2x4sI")

_IPV4_HEADER = 20  # bytes in an IPv4 header without options
_TCP_HEADER = 20  # bytes in a TCP header without options
_PROTOCOL_TCP = 6
_SOURCE_OFFSET = 12
_DESTINATION_OFFSET = 16
_FRAGMENT_OFFSET_MASK = 0x1FFF  # low 13 bits of bytes 6-7


class Drop(enum.StrEnum):
    """Why a packet was dropped; the value is the name used in log lines."""

    TRUNCATED = "truncated"
    """Too short for its IPv4 header, or (outgoing) for the TCP header after it."""
    WRONG_DESTINATION = "wrong-destination"
    """Incoming: the destination is not the enclave's address."""
    WRONG_SOURCE = "wrong-source"
    """Outgoing: the source is not the interface's address."""
    RESERVED_DESTINATION = "reserved-destination"
    """Outgoing: the destination is in one of the reserved ranges."""
    NOT_TCP = "not-tcp"
    """Outgoing: the protocol is not TCP (the originals let these through)."""
    FRAGMENT = "fragment"
    """Outgoing: a non-first fragment, which carries no TCP header to check."""
    FORBIDDEN_SOURCE_PORT = "forbidden-source-port"
    """Outgoing: the TCP source port is not 80, 443 or 1024-61439."""


def is_reserved(address: IPv4Address | int) -> bool:
    """Whether ``address`` falls in one of :data:`RESERVED_NETWORKS`."""
    value = int(address)
    entry = _RESERVED_BY_FIRST_OCTET[value >> 24]
    if entry is None:
        return True
    return any(value & mask == network for network, mask in entry)


def is_allowed_source_port(port: int) -> bool:
    """Whether the enclave may send from TCP port ``port`` (80, 443, 1024-61439)."""
    return port == 80 or port == 443 or 1024 <= port <= 61439


def _header_length(packet: bytes | bytearray | memoryview) -> int | None:
    """The IPv4 header length in bytes, or None when the packet is shorter than its header."""
    if len(packet) < _IPV4_HEADER:
        return None
    header_length = (packet[0] & 0x0F) * 4
    if header_length < _IPV4_HEADER or header_length > len(packet):
        return None
    return header_length


class IncomingPolicy:
    """Packets from the host to the enclave: only those addressed to the enclave pass."""

    def __init__(self, enclave_address: IPv4Address) -> None:
        self.enclave_address = enclave_address
        self._destination = enclave_address.packed

    def check(self, packet: bytes | bytearray | memoryview) -> Drop | None:
        """None to send ``packet`` on, or why to drop it."""
        if _header_length(packet) is None:
            return Drop.TRUNCATED
        if packet[_DESTINATION_OFFSET : _DESTINATION_OFFSET + 4] != self._destination:
            return Drop.WRONG_DESTINATION
        return None


class OutgoingPolicy:
    """Packets from the (untrusted) enclave to the network: the originals' filter, plus TCP only."""

    def __init__(self, interface_address: IPv4Address) -> None:
        self.interface_address = interface_address
        self._source = interface_address.packed

    def check(self, packet: bytes | bytearray | memoryview) -> Drop | None:
        """None to send ``packet`` on, or why to drop it."""
        size = len(packet)
        if size < _IPV4_HEADER:
            return Drop.TRUNCATED
        first, fragment, protocol, source, destination = _OUTGOING_FIELDS.unpack_from(packet)
        header_length = (first & 0x0F) * 4
        if header_length < _IPV4_HEADER or header_length > size:
            return Drop.TRUNCATED
        if source != self._source:
            return Drop.WRONG_SOURCE
        reserved_inside = _RESERVED_BY_FIRST_OCTET[destination >> 24]
        if reserved_inside is None or (reserved_inside and is_reserved(destination)):
            return Drop.RESERVED_DESTINATION
        if protocol != _PROTOCOL_TCP:
            return Drop.NOT_TCP
        if fragment & _FRAGMENT_OFFSET_MASK:
            return Drop.FRAGMENT
        if size < header_length + _TCP_HEADER:
            return Drop.TRUNCATED
        if not is_allowed_source_port(packet[header_length] << 8 | packet[header_length + 1]):
            return Drop.FORBIDDEN_SOURCE_PORT
        return None


class DropCounters:
    """Dropped packets counted by reason, for the periodic and shutdown log lines.

    Reasons are strings: the :class:`Drop` values, plus any the I/O layer adds (a raw send
    rejected with EMSGSIZE, say).
    """

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def add(self, reason: str, count: int = 1) -> None:
        """Count ``count`` packets dropped for ``reason``."""
        self._counts[reason] += count

    def __getitem__(self, reason: str) -> int:
        return self._counts[reason]

    @property
    def total(self) -> int:
        """All packets dropped, whatever the reason."""
        return self._counts.total()

    def items(self) -> Iterable[tuple[str, int]]:
        """(reason, count) pairs, sorted by reason."""
        return sorted(self._counts.items())

    def format(self) -> str:
        """One log line: ``dropped 3 packets (not-tcp=1, wrong-source=2)``, reasons sorted."""
        if not self._counts:
            return "dropped 0 packets"
        details = ", ".join(f"{reason}={count}" for reason, count in self.items())
        total = self.total
        return f"dropped {total} packet{'' if total == 1 else 's'} ({details})"
