"""The original destination of a NAT-redirected TCP connection (Linux only).

After iptables REDIRECT or DNAT, `getsockname()` on the accepted socket shows the proxy's own
address; the address the client asked for is kept by conntrack and read with
SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6).

The call fails only when conntrack is not running in the namespace at all. Once any NAT rule
exists, conntrack tracks every connection, and for one that was never redirected (a client
connecting to the listener directly) the "original" destination is the listener itself.
Forwarding that would ask the far side to connect to its own copy of our address, so it is
treated as no original destination too.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

from pf_proxy.tcp.dstheader import Destination

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOCKADDR_IN_SIZE = 16  # struct sockaddr_in
SOCKADDR_IN6_SIZE = 28  # struct sockaddr_in6
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)  # linux/socket.h; absent from typeshed


class OriginalDestinationError(OSError):
    """The socket has no original destination (no NAT rule applied to it)."""


def original_destination(sock: socket.socket) -> Destination:
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_SIZE)
            port = struct.unpack_from("!H", raw, 2)[0]
            mapped = ipaddress.IPv6Address(raw[8:24])
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = mapped.ipv4_mapped or mapped
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
            port = struct.unpack_from("!H", raw, 2)[0]
            address = ipaddress.IPv4Address(raw[4:8])
    except OSError as exc:
        raise OriginalDestinationError(
            exc.errno,
            f"Failed to retrieve original destination from TCP stream: {exc.strerror or exc}",
        ) from exc
    destination = Destination(address, port)
    if _is_local_address(sock, destination):
        raise OriginalDestinationError(
            errno.ENOENT,
            "Failed to retrieve original destination from TCP stream: the connection was not "
            f"redirected (its original destination {destination} is this listener)",
        )
    return destination


def _is_local_address(sock: socket.socket, destination: Destination) -> bool:
    host, port = sock.getsockname()[:2]
    local = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped:
        local = local.ipv4_mapped
    return (local, port) == (destination.address, destination.port)
