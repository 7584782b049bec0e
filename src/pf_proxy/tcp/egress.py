"""The egress routes: where a connection from the enclave may go, judged by the policy.

    from_destination_header   vsock-to-ip-transparent: the destination header names it; with
                              --allow-host patterns, the stream's start is read for its name
    explicit                  vsock-to-ip-proxy: an HTTP CONNECT or SOCKS5 request names it

They have a module of their own because of what they import: the policy (`access`), the
sniffer and the explicit proxy's parser, which no other command needs (about 0.3 MiB of every
other TCP proxy's memory).

The explicit proxy's route is the one exception to "the engine connects": its client waits for
an answer that depends on how the connect went (200 or 502, SOCKS success or "connection
refused"), so the route connects itself, answers failures, and hands the engine a `Connected`
upstream with the success reply to write first.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket

from pf_proxy.endpoints import ConnectError, IpAddress, IpEndpoint
from pf_proxy.runtime import info
from pf_proxy.tcp.access import AccessPolicy, Lookup, ResolveError, Verdict
from pf_proxy.tcp.dstheader import Destination, HeaderError, decode_destination, header_size
from pf_proxy.tcp.explicit import (
    Continue,
    Outcome,
    Refusal,
    Request,
    RequestReader,
    answer,
)
from pf_proxy.tcp.metrics import BAD_REQUEST, CONNECT_TIMEOUT, NAME_UNRESOLVED, UNSUPPORTED_REQUEST
from pf_proxy.tcp.routes import (
    Connected,
    DeniedDestination,
    RequestFailed,
    Route,
    Upstream,
    read_destination_header,
    recv_or_eof,
)
from pf_proxy.tcp.sniff import MAX_SNIFF_BYTES, Name, NeedMore, NoName, Sniffer

ALLOW_EVERYTHING = AccessPolicy()  # the originals' behaviour


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


def explicit(
    policy: AccessPolicy, lookup: Lookup, request_timeout: float, connect_timeout: float
) -> Route:
    """vsock-to-ip-proxy: read an HTTP CONNECT or SOCKS5 request (within `request_timeout`),
    judge the name and port it asks for and each address the name resolves to (`lookup`),
    connect to the first allowed address that answers (lookup and connect within
    `connect_timeout`), and answer the client: the success reply as the relay's first bytes
    back, or a failure's answer before the connection is closed."""

    async def route(inbound: socket.socket) -> Upstream:
        request = await read_proxy_request(inbound, request_timeout)
        protocol, target = request.protocol, request.target
        asked = f"{protocol} {target}"
        if request.send_first:
            await _answer(inbound, request.send_first)
        try:
            async with asyncio.timeout(connect_timeout):
                decided = await policy.judge_request(
                    target.host, target.address, target.port, lookup
                )
                connected = None
                if decided.verdict.allowed:
                    connected = await _connect_first(decided.addresses, target.port)
        except ResolveError as exc:
            await _answer(inbound, answer(protocol, Outcome.UNRESOLVED, f"cannot resolve {target}"))
            raise RequestFailed(f"{asked}: {exc}", NAME_UNRESOLVED) from None
        except TimeoutError:
            why = f"no connection to {target} within {connect_timeout:g} s"
            await _answer(inbound, answer(protocol, Outcome.TIMED_OUT, why))
            raise RequestFailed(f"{asked}: {why} (connect timeout)", CONNECT_TIMEOUT) from None
        except ConnectError as exc:
            outcome = _CONNECT_OUTCOMES.get(exc.errno or 0, Outcome.FAILED)
            error = os.strerror(exc.errno) if exc.errno else "failed"
            await _answer(inbound, answer(protocol, outcome, f"connecting to {target}: {error}"))
            raise ConnectError(exc.errno, f"{asked}: {exc.strerror}") from None
        verdict = decided.verdict
        if connected is None:
            why = f"{target} is not allowed by this proxy's egress policy"
            await _answer(inbound, answer(protocol, Outcome.DENIED, why))
            reason = f": {verdict.reason}" if verdict.reason else ""
            raise DeniedDestination(f"{asked} denied by {verdict.rule}{reason}")
        sock, address = connected
        try:
            host, port = sock.getsockname()[:2]
            reply = answer(protocol, Outcome.CONNECTED, bound=(ipaddress.ip_address(host), port))
        except BaseException:
            sock.close()
            raise
        info(f"Proxying to: {address} ({asked}, allowed by {verdict.rule})")
        return Upstream(
            Connected(sock, address),
            address,
            first_bytes=request.rest,
            detail=f", for {asked}",
            first_bytes_back=reply,
        )

    return route


# What a failed upstream connect is called in the client's answer.
_CONNECT_OUTCOMES = {
    errno.ECONNREFUSED: Outcome.REFUSED,
    errno.EHOSTUNREACH: Outcome.HOST_UNREACHABLE,
    errno.ENETUNREACH: Outcome.NETWORK_UNREACHABLE,
    errno.ETIMEDOUT: Outcome.TIMED_OUT,
}
# How long a failure's answer may take to write: a few hundred bytes into a socket that holds
# nothing else go at once, unless the client stopped reading; such a client is not waited for.
ANSWER_TIMEOUT = 5.0


async def read_proxy_request(sock: socket.socket, timeout: float) -> Request:
    """Read an explicit proxy request (see `explicit.RequestReader`), writing what the
    protocol wants written on the way (SOCKS5's method reply); a request that is malformed,
    not offered, cut or not whole within `timeout` is answered and `RequestFailed`."""
    loop = asyncio.get_running_loop()
    reader = RequestReader()
    try:
        async with asyncio.timeout(timeout):
            step = reader.feed(b"")
            while isinstance(step, Continue):
                if step.send:
                    await loop.sock_sendall(sock, step.send)
                chunk = await recv_or_eof(sock, reader.room)
                step = reader.feed(chunk) if chunk else reader.end()
    except TimeoutError:
        step = reader.timed_out(timeout)
    if isinstance(step, Refusal):
        if step.answer:
            await _answer(sock, step.answer)
        outcome = UNSUPPORTED_REQUEST if step.unsupported else BAD_REQUEST
        raise RequestFailed(f"proxy request refused: {step.reason}", outcome)
    return step


async def _connect_first(
    addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...], port: int
) -> tuple[socket.socket, str]:
    """Connect to the first of `addresses` that accepts, in order; the last failure's
    `ConnectError` if none does."""
    failure = ConnectError(errno.EHOSTUNREACH, "no address to connect to")
    for address in addresses:
        endpoint = IpEndpoint(IpAddress(str(address), port))
        try:
            return await endpoint.connect(), str(endpoint)
        except ConnectError as exc:
            failure = exc
    raise failure


async def _answer(sock: socket.socket, data: bytes) -> None:
    """Write a request's answer, giving up on a client that does not take it."""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            await asyncio.get_running_loop().sock_sendall(sock, data)
    except (OSError, TimeoutError):
        pass


async def read_destination_header_and_more(sock: socket.socket) -> tuple[Destination, bytes]:
    """Read the header and whatever came with it, up to MAX_SNIFF_BYTES in all: one recv()
    for both, where the header alone takes two. Returns the destination and the bytes after
    the header."""
    data = bytearray()
    while not data or len(data) < header_size(data[0]):
        chunk = await recv_or_eof(sock, MAX_SNIFF_BYTES - len(data))
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
        chunk = await recv_or_eof(sock, MAX_SNIFF_BYTES - len(sniffer.data))
        found = sniffer.feed(chunk) if chunk else sniffer.end()
    return bytes(sniffer.data), found
