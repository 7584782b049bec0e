"""Where an accepted connection goes: one small function per pf-proxy command.

A route takes the accepted socket and returns the upstream to connect to, plus any bytes to
write to it before relaying. Everything else (accepting, connecting, timeouts, relaying,
logging) is the engine's. A route that needs nothing from the stream answers at once; one
that reads the stream first (the destination header) is a coroutine function.
"""

from __future__ import annotations

import asyncio
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
from pf_proxy.runtime import info
from pf_proxy.tcp.access import AccessPolicy, Lookup, Verdict
from pf_proxy.tcp.dstheader import (
    Destination,
    HeaderError,
    decode_destination,
    encode_destination,
    header_size,
)
from pf_proxy.tcp.origdst import original_destination
from pf_proxy.tcp.sniff import MAX_SNIFF_BYTES, Name, NeedMore, NoName, Sniffer


@dataclass(frozen=True)
class Upstream:
    endpoint: Endpoint
    name: str
    first_bytes: bytes = b""
    detail: str = ""  # appended to the copy-done log lines


Route = Callable[[socket.socket], Upstream | Awaitable[Upstream]]


class DeniedDestination(Exception):
    """The policy denies the destination named by the peer; the message names the address,
    the stream's host name if one was read, and the rule that decided."""


ALLOW_EVERYTHING = AccessPolicy()  # the originals' behaviour


def fixed(endpoint: Endpoint) -> Route:
    """vsock-to-ip, ip-to-vsock: always the same upstream, nothing written first."""

    name = str(endpoint)

    def route(inbound: socket.socket) -> Upstream:
        info(f"Proxying to: {name}")
        return Upstream(endpoint, name)

    return route


def from_destination_header(
    policy: AccessPolicy = ALLOW_EVERYTHING,
    lookup: Lookup | None = None,
    name_timeout: float | None = None,
) -> Route:
    """vsock-to-ip-transparent: read the destination header, connect to what it names.

    With --allow-host patterns in `policy`, the header is read together with what follows
    it; when the address alone does not decide, the start of the stream is read on for its
    name (at most MAX_SNIFF_BYTES, within `name_timeout` seconds) and judged with `lookup`
    (which has a timeout of its own). Whatever was read past the header is sent upstream
    first. Without patterns, not a byte past the header is read here.
    """

    async def route(inbound: socket.socket) -> Upstream:
        if policy.needs_names:  # the stream's start is wanted: read it with the header
            destination, first_bytes = await read_destination_header_and_more(inbound)
        else:
            destination, first_bytes = await read_destination_header(inbound), b""
        verdict = policy.judge_address(destination.address, destination.port)
        if verdict is None:
            assert lookup is not None, "a policy with --allow-host needs a lookup"
            try:
                async with asyncio.timeout(name_timeout):
                    first_bytes, found = await read_stream_start(inbound, first_bytes)
            except TimeoutError:
                verdict = Verdict(
                    False,
                    "--allow-host",
                    f"no complete TLS ClientHello or HTTP request head within {name_timeout:g} s",
                )
            else:  # the lookup is bounded by the resolver's own timeout
                verdict = await policy.judge_name(
                    destination.address, destination.port, found, lookup
                )
        if not verdict.allowed:
            raise DeniedDestination(verdict.describe(destination))
        if verdict.name is not None:
            info(f"Proxying to: {destination} ({verdict.name}, allowed by {verdict.rule})")
        else:
            info(f"Proxying to: {destination}")
        endpoint = IpEndpoint(IpAddress(str(destination.address), destination.port))
        return Upstream(endpoint, str(destination), first_bytes=first_bytes)

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


async def read_destination_header_and_more(sock: socket.socket) -> tuple[Destination, bytes]:
    """Read the header and whatever came with it, up to MAX_SNIFF_BYTES in all: one recv()
    for both, where the header alone takes two. Returns the destination and the bytes after
    the header."""
    data = bytearray()
    while not data or len(data) < header_size(data[0]):
        chunk = await _recv(sock, MAX_SNIFF_BYTES - len(data))
        if not chunk:
            of = f" of {header_size(data[0])}" if data else ""
            raise HeaderError(f"stream ended inside the destination header ({len(data)}{of} bytes)")
        data += chunk
    size = header_size(data[0])
    return decode_destination(bytes(data[:size])), bytes(data[size:])


async def read_stream_start(
    sock: socket.socket, initial: bytes = b""
) -> tuple[bytes, Name | NoName]:
    """Read until the bytes so far (`initial` first) name a host or surely do not (see
    `sniff`): at most MAX_SNIFF_BYTES, each byte examined a bounded number of times however
    the peer cuts them. Returns everything read, `initial` included, to be sent on first, and
    the answer."""
    sniffer = Sniffer()
    found = sniffer.feed(initial)
    while isinstance(found, NeedMore):  # below MAX_SNIFF_BYTES: never a recv of 0 bytes
        chunk = await _recv(sock, MAX_SNIFF_BYTES - len(sniffer.data))
        found = sniffer.feed(chunk) if chunk else sniffer.end()
    return bytes(sniffer.data), found


async def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await _recv(sock, size - len(data))
        if not chunk:
            raise HeaderError(
                f"stream ended inside the destination header ({len(data)} of {size} bytes)"
            )
        data += chunk
    return data


async def _recv(sock: socket.socket, size: int) -> bytes:
    """Up to `size` bytes; b"" at the end of the stream, however the peer closed."""
    try:
        return await asyncio.get_running_loop().sock_recv(sock, size)
    except ConnectionResetError:
        if not peer_close_is_eof(sock):
            raise
        return b""  # emulated vsock: the peer closed, as over vsock
