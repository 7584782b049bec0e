"""The destination header of the transparent pair (pure, no I/O).

`ip-to-vsock-transparent` writes it first on every vsock stream; `vsock-to-ip-transparent`
reads it, then connects to the address it names. The layout is the Rust originals':

    IPv4: 0x04, address as u32 little-endian, port as u16 little-endian   (7 bytes)
    IPv6: 0x06, address as u128 little-endian, port as u16 little-endian  (19 bytes)

The address integer is the network-order value, so on the wire its octets appear reversed:
1.2.3.4:80 is 04 04 03 02 01 50 00.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPV4_MARKER = 4
IPV6_MARKER = 6
HEADER_SIZES = {IPV4_MARKER: 7, IPV6_MARKER: 19}


class HeaderError(ValueError):
    """Bytes that are not a valid destination header."""


@dataclass(frozen=True)
class Destination:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


def encode_destination(destination: Destination) -> bytes:
    address, port = destination.address, destination.port
    if not 0 <= port <= 0xFFFF:
        raise HeaderError(f"port {port} out of range")
    if address.version == 4:
        marker, size = IPV4_MARKER, 4
    else:
        marker, size = IPV6_MARKER, 16
    return bytes([marker]) + int(address).to_bytes(size, "little") + port.to_bytes(2, "little")


def header_size(marker: int) -> int:
    """The whole header's length for its first byte; HeaderError for an unknown marker."""
    try:
        return HEADER_SIZES[marker]
    except KeyError:
        raise HeaderError(f"malformed bytes or invalid IP version marker {marker}") from None


def decode_destination(header: bytes) -> Destination:
    """Decode one complete header (exactly 7 or 19 bytes)."""
    if not header:
        raise HeaderError("stream ended before the destination header")
    size = header_size(header[0])
    if len(header) != size:
        raise HeaderError(
            f"destination header for IPv{header[0]} is {size} bytes, got {len(header)}"
        )
    port = int.from_bytes(header[-2:], "little")
    value = int.from_bytes(header[1:-2], "little")
    address = ipaddress.IPv4Address(value) if size == 7 else ipaddress.IPv6Address(value)
    return Destination(address, port)
