"""The UDP side's sockets: the listening socket of udp-to-vsock, and vsock-to-udp's upstream
(an IP literal resolved once, or a host name resolved for each new stream).

A connected UDP socket learns that nothing listens at its peer only from an ICMP error, after
a datagram went out; `UdpTarget.connect` therefore returns, with the socket, the addresses not
yet tried, so a flow refused before any answer can move on to the next one.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

from pf_proxy.endpoints import BindError, IpAddress

# The listening UDP socket's buffers: room for a burst of datagrams from many clients while
# the loop is busy. The kernel caps them at net.core.rmem_max / wmem_max.
LISTENER_BUFFER = 4 << 20

AddressInfo = tuple[Any, ...]  # one entry of getaddrinfo()


def ip_name(address: Any) -> str:
    """`host:port` or `[host]:port` for a socket address tuple."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_udp(address: IpAddress) -> socket.socket:
    """A bound non-blocking UDP socket; `BindError` names the address."""
    try:
        family, kind, proto, _, sockaddr = address.numeric_infos(socket.SOCK_DGRAM, True)[0]
        sock = socket.socket(family, kind, proto)
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, LISTENER_BUFFER)
            sock.bind(sockaddr)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock
    except OSError as exc:
        raise BindError(
            exc.errno, f"Failed to bind listener to udp {address}: {exc.strerror or exc}"
        ) from exc


class UdpTarget:
    """vsock-to-udp's upstream: an IP literal (resolved once) or a host name (resolved for
    each new stream, IPv4 and IPv6)."""

    def __init__(self, address: IpAddress) -> None:
        self.address = address
        self.literal_infos: list[AddressInfo] | None = None
        if address.is_literal:
            try:
                self.literal_infos = address.numeric_infos(socket.SOCK_DGRAM)
            except OSError:
                pass  # e.g. an unknown scope id: resolve() looks it up and reports it

    def __str__(self) -> str:
        return str(self.address)

    async def resolve(self) -> list[AddressInfo]:
        if self.literal_infos is not None:
            return self.literal_infos
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.address.host, self.address.port, type=socket.SOCK_DGRAM)
        return list(infos)

    def connect(self, infos: list[AddressInfo]) -> tuple[socket.socket, str, list[AddressInfo]]:
        """A non-blocking UDP socket connected to the first of `infos` that takes it, that
        address's name, and the addresses after it; OSError (the last failure) if none."""
        last: OSError = OSError(errno.EHOSTUNREACH, "no addresses")
        for index, (family, kind, proto, _, sockaddr) in enumerate(infos):
            try:
                udp = socket.socket(family, kind, proto)
            except OSError as exc:
                last = exc
                continue
            try:
                udp.setblocking(False)
                udp.connect(sockaddr)
            except OSError as exc:
                udp.close()
                last = exc
                continue
            name = ip_name(sockaddr)
            if not self.address.is_literal:
                name = f"{self.address} ({name})"
            return udp, name, infos[index + 1 :]
        raise last
