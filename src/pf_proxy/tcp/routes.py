"""Where an accepted connection goes: one small function per pf-proxy command.

A route takes the accepted socket and returns the connected upstream, plus any bytes to write
to it before relaying. Everything else (accepting, timeouts, relaying, logging) is the engine's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pf_proxy.endpoints import (
    Endpoint,
    IpAddress,
    IpEndpoint,
    VsockEndpoint,
    peer_close_is_eof,
)
from pf_proxy.tcp.dstheader import (
    Destination,
    HeaderError,
    decode_destination,
    encode_destination,
    header_size,
)
from pf_proxy.tcp.origdst import original_destination

log = logging.getLogger("pf_proxy")


@dataclass(frozen=True)
class Upstream:
    sock: socket.socket
    name: str
    first_bytes: bytes = b""
    detail: str = ""  # appended to the copy-done log lines


Route = Callable[[socket.socket], Awaitable[Upstream]]


class DeniedDestination(Exception):
    """The destination named by the peer is not allowed by --allow/--deny."""


def fixed(endpoint: Endpoint) -> Route:
    """vsock-to-ip, ip-to-vsock: always the same upstream, nothing written first."""

    async def route(inbound: socket.socket) -> Upstream:
        log.info("Proxying to: %s", endpoint)
        return Upstream(await endpoint.connect(), str(endpoint))

    return route


def from_destination_header(
    allowed: Callable[[Destination], bool] = lambda _: True,
) -> Route:
    """vsock-to-ip-transparent: read the destination header, connect to what it names."""

    async def route(inbound: socket.socket) -> Upstream:
        destination = await read_destination_header(inbound)
        if not allowed(destination):
            raise DeniedDestination(f"destination {destination} denied by --allow/--deny")
        log.info("Proxying to: %s", destination)
        endpoint = IpEndpoint(IpAddress(str(destination.address), destination.port))
        return Upstream(await endpoint.connect(), str(destination))

    return route


def with_destination_header(endpoint: VsockEndpoint) -> Route:
    """ip-to-vsock-transparent: the fixed vsock upstream, the original destination first."""

    async def route(inbound: socket.socket) -> Upstream:
        destination = original_destination(inbound)
        log.info("Original destination: %s", destination)
        log.info("Proxying to: %s", endpoint)
        return Upstream(
            await endpoint.connect(),
            str(endpoint),
            first_bytes=encode_destination(destination),
            detail=f", with original_dst={destination} from inbound TCP stream",
        )

    return route


def to_original_port(template: VsockEndpoint) -> Route:
    """transparent-port-to-vsock: vsock CID:<original destination port> (the template's CID)."""

    async def route(inbound: socket.socket) -> Upstream:
        destination = original_destination(inbound)
        log.info("Original destination: %s", destination)
        endpoint = template.at_port(destination.port)
        log.info("Proxying to: %s", endpoint)
        return Upstream(await endpoint.connect(), str(endpoint))

    return route


async def read_destination_header(sock: socket.socket) -> Destination:
    """Read exactly one header (never a byte of the payload behind it) and decode it."""
    first = await _read_exactly(sock, 1)
    rest = await _read_exactly(sock, header_size(first[0]) - 1)
    return decode_destination(first + rest)


async def _read_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        try:
            chunk = await loop.sock_recv(sock, size - len(data))
        except ConnectionResetError:
            if not peer_close_is_eof(sock):
                raise
            chunk = b""  # emulated vsock: the peer closed, as over vsock
        if not chunk:
            raise HeaderError(
                f"stream ended inside the destination header ({len(data)} of {size} bytes)"
            )
        data += chunk
    return data
