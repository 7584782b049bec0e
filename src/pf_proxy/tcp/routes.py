"""Where an accepted connection goes: one small function per pf-proxy command.

A route takes the accepted socket and returns the upstream to connect to, plus any bytes to
write to it before relaying. Everything else (accepting, connecting, timeouts, relaying,
logging) is the engine's. A route that needs nothing from the stream answers at once; one
that reads the stream first (the destination header) is a coroutine function.

The routes here need no policy. The two egress routes, which judge each destination
(vsock-to-ip-transparent's and vsock-to-ip-proxy's), are in `egress`, with the policy, the
sniffer and the explicit proxy's parser they import: the other commands load none of them.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pf_proxy.endpoints import (
    Connecting,
    ConnectRetries,
    Endpoint,
    VsockEndpoint,
    peer_close_is_eof,
)
from pf_proxy.runtime import info
from pf_proxy.tcp.dstheader import (
    Destination,
    HeaderError,
    decode_destination,
    encode_destination,
    header_size,
)
from pf_proxy.tcp.origdst import original_destination


class Connected:
    """An upstream the route connected itself (see the module docstring), as an endpoint
    whose connect is done."""

    half_close = True  # a TCP connection

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name

    def __str__(self) -> str:
        return self.name

    def start_connect(self) -> Connecting:
        return Connecting(self.sock, True)

    async def connect(self, retries: ConnectRetries | None = None) -> socket.socket:
        return self.sock

    def finish_connect(self, sock: socket.socket) -> None:
        pass


@dataclass(frozen=True)
class Upstream:
    endpoint: Endpoint | Connected
    name: str
    first_bytes: bytes = b""
    detail: str = ""  # appended to the copy-done log lines
    first_bytes_back: bytes = b""  # written to the client before anything from upstream


Route = Callable[[socket.socket], Upstream | Awaitable[Upstream]]


class DeniedDestination(Exception):
    """The policy denies the destination named by the peer; the message names the address,
    the stream's host name if one was read, and the rule that decided."""


class RequestFailed(Exception):
    """The explicit proxy ended a request, and told the client why; `outcome` is how the
    connection counts (tcp.metrics)."""

    def __init__(self, message: str, outcome: str) -> None:
        super().__init__(message)
        self.outcome = outcome


def fixed(endpoint: Endpoint) -> Route:
    """vsock-to-ip, ip-to-vsock: always the same upstream, nothing written first."""

    name = str(endpoint)

    def route(inbound: socket.socket) -> Upstream:
        info(f"Proxying to: {name}")
        return Upstream(endpoint, name)

    return route


def with_destination_header(endpoint: VsockEndpoint) -> Route:
    """ip-to-vsock-transparent: the fixed vsock upstream, the original destination first."""

    name = str(endpoint)

    def route(inbound: socket.socket) -> Upstream:
        destination = original_destination(inbound)
        info(f"Original destination: {destination}")
        info(f"Proxying to: {name}")
        return Upstream(
            endpoint,
            name,
            first_bytes=encode_destination(destination),
            detail=f", with original_dst={destination} from inbound TCP stream",
        )

    return route


def to_original_port(template: VsockEndpoint) -> Route:
    """transparent-port-to-vsock: vsock CID:<original destination port> (the template's CID)."""

    def route(inbound: socket.socket) -> Upstream:
        destination = original_destination(inbound)
        info(f"Original destination: {destination}")
        endpoint = template.at_port(destination.port)
        info(f"Proxying to: {endpoint}")
        return Upstream(endpoint, str(endpoint))

    return route


async def read_destination_header(sock: socket.socket) -> Destination:
    """Read exactly one header (never a byte of the payload behind it) and decode it."""
    first = await _read_exactly(sock, 1)
    rest = await _read_exactly(sock, header_size(first[0]) - 1)
    return decode_destination(first + rest)


async def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await recv_or_eof(sock, size - len(data))
        if not chunk:
            raise HeaderError(
                f"stream ended inside the destination header ({len(data)} of {size} bytes)"
            )
        data += chunk
    return data


async def recv_or_eof(sock: socket.socket, size: int) -> bytes:
    """Up to `size` bytes; b"" at the end of the stream, however the peer closed."""
    try:
        return await asyncio.get_running_loop().sock_recv(sock, size)
    except ConnectionResetError:
        if not peer_close_is_eof(sock):
            raise
        return b""  # emulated vsock: the peer closed, as over vsock
