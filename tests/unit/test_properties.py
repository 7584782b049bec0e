"""Every parser, fed arbitrary input in arbitrary chunks, raises only its own documented error.

The parsers stand between the proxies and their peers (the destination header, the raw IPv4
stream, the packet policies) or their operators (addresses on the command line). Each one
either accepts an input, consistently with an independent oracle or a round trip, or rejects
it with its documented error: `AddressError`, `HeaderError`, `FramingError`, a `Drop` reason.
Never an IndexError, a struct.error, a UnicodeError or a hang.

The example-based edges, the framer under valid streams in any chunking and arbitrary bytes
through the framer's read path live in test_addresses, test_dstheader, test_framing and
test_policy; this module adds what those do not cover: arbitrary text for the address parsers,
the header as it is read from a real socket in arbitrary chunks, the framer's `feed` path and
small read sizes on arbitrary bytes, and the policies on arbitrary bytes shaped to get past
their first checks, including the packets the framer cuts out of arbitrary streams.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import re
import socket
import struct
from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from pf_proxy.endpoints import (
    U32_MAX,
    AddressError,
    IpAddress,
    VsockAddress,
    parse_cid,
    parse_ip_address,
    parse_vsock_address,
)
from pf_proxy.raw.framing import FramingError, Ipv4StreamFramer
from pf_proxy.raw.policy import (
    RESERVED_NETWORKS,
    Drop,
    DropCounters,
    IncomingPolicy,
    OutgoingPolicy,
)
from pf_proxy.tcp.dstheader import (
    Destination,
    HeaderError,
    decode_destination,
    encode_destination,
    header_size,
)
from pf_proxy.tcp.routes import read_destination_header
from tests.unit.test_framing import oracle as framing_oracle


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def chunked(draw: st.DrawFn, data: bytes, max_cuts: int = 20) -> list[bytes]:
    return split(data, draw(st.lists(st.integers(0, len(data)), max_size=max_cuts)))


# --- addresses ------------------------------------------------------------------------------

_ASCII_U32 = re.compile(r"[0-9]+", re.ASCII)
VSOCK_MESSAGES = {
    "invalid vsock address, should contain one colon",
    "failed to parse cid as a u32",
    "failed to parse port as a u32",
}

# Text that is mostly address-shaped, so the parsers are pushed past their first check:
# numbers at and past the u32/u16 limits, non-ASCII digits, signs, spaces, extra colons.
numbers = st.one_of(
    st.integers(0, 2 * U32_MAX).map(str),
    st.sampled_from(["", "0", "00", "-1", "+1", " 1", "1 ", "1\n", "٣", "0x10", "1_000"]),
)
junk = st.text(max_size=12)
vsock_like = st.one_of(
    junk,
    st.tuples(numbers, st.sampled_from([":", "", "::", "-", ": "]), numbers).map("".join),
    st.tuples(numbers, numbers, numbers).map(":".join),
)


def vsock_oracle(text: str) -> VsockAddress | None:
    cid, colon, port = text.partition(":")
    if not (colon and _ASCII_U32.fullmatch(cid) and _ASCII_U32.fullmatch(port)):
        return None
    if int(cid) > U32_MAX or int(port) > U32_MAX:
        return None
    return VsockAddress(int(cid), int(port))


@settings(max_examples=500)
@given(vsock_like)
def test_vsock_address_any_text(text: str) -> None:
    """Accepted exactly when the oracle accepts; otherwise one of the three messages."""
    expected = vsock_oracle(text)
    try:
        parsed = parse_vsock_address(text)
    except AddressError as exc:
        assert expected is None, text
        assert str(exc) in VSOCK_MESSAGES
        return
    assert parsed == expected
    assert parse_vsock_address(str(parsed)) == parsed


@given(st.one_of(numbers, junk))
def test_bare_cid_any_text(text: str) -> None:
    expected = int(text) if _ASCII_U32.fullmatch(text) and int(text) <= U32_MAX else None
    try:
        assert parse_cid(text) == expected
    except AddressError as exc:
        assert expected is None
        assert str(exc) == "failed to parse cid as a u32"


@st.composite
def ip_like(draw: st.DrawFn) -> str:
    host = draw(
        st.one_of(
            st.ip_addresses().map(str),
            st.tuples(st.ip_addresses(v=6), st.text(max_size=5)).map(lambda t: f"{t[0]}%{t[1]}"),
            st.from_regex(r"[a-z0-9.\-_]{0,20}", fullmatch=True),
            junk,
        )
    )
    if draw(st.booleans()):
        host = f"[{host}]"
    separator = draw(st.sampled_from([":", "", "::", "]:"]))
    port = draw(st.one_of(st.integers(-1, 70_000).map(str), numbers, junk))
    return f"{host}{separator}{port}"


@settings(max_examples=500)
@given(st.one_of(ip_like(), junk), st.booleans())
def test_ip_address_any_text(text: str, allow_host_name: bool) -> None:
    """AddressError, or a value that prints back to text parsing to the same value."""
    try:
        parsed = parse_ip_address(text, allow_host_name=allow_host_name)
    except AddressError:
        return
    assert 0 <= parsed.port <= 0xFFFF
    assert parse_ip_address(str(parsed), allow_host_name=allow_host_name) == parsed
    if not parsed.is_literal:
        assert allow_host_name
        assert ":" not in parsed.host and "[" not in parsed.host
        assert not parsed.host.rstrip(".").rpartition(".")[2].isdigit()  # not IPv4-like
    elif ":" in parsed.host:
        assert text.startswith("[")  # IPv6 only in brackets
    else:
        assert ipaddress.IPv4Address(parsed.host)


@given(st.ip_addresses(), st.integers(0, 0xFFFF))
def test_ip_address_literals_round_trip(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    text = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
    parsed = parse_ip_address(text)
    assert parsed == IpAddress(str(address), port)
    assert str(parsed) == text


# --- the destination header -----------------------------------------------------------------


@given(st.integers(0, 255), st.binary(max_size=24))
def test_header_after_any_marker(marker: int, body: bytes) -> None:
    """Arbitrary bytes behind every marker byte: exactly the right length for 4 or 6 decodes
    (and re-encodes to the same bytes); everything else is a HeaderError."""
    header = bytes([marker]) + body
    try:
        destination = decode_destination(header)
    except HeaderError:
        assert marker not in (4, 6) or len(header) != header_size(marker)
        return
    assert len(header) == {4: 7, 6: 19}[marker]
    assert encode_destination(destination) == header


@given(st.integers(-(2**40), 2**40))
def test_header_size_any_integer(marker: int) -> None:
    try:
        size = header_size(marker)
    except HeaderError as exc:
        assert marker not in (4, 6)
        assert f"invalid IP version marker {marker}" in str(exc)
        return
    assert (marker, size) in ((4, 7), (6, 19))


@given(st.ip_addresses(), st.integers(-(2**20), 2**20))
def test_encode_any_port(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    try:
        encoded = encode_destination(Destination(address, port))
    except HeaderError:
        assert not 0 <= port <= 0xFFFF
        return
    assert decode_destination(encoded) == Destination(address, port)


header_streams = st.one_of(
    st.binary(max_size=40),
    st.tuples(st.ip_addresses(), st.integers(0, 0xFFFF), st.binary(max_size=20)).map(
        lambda t: encode_destination(Destination(t[0], t[1])) + t[2]
    ),
    st.tuples(st.sampled_from([b"\x04", b"\x06"]), st.binary(max_size=25)).map(b"".join),
)


def header_oracle(stream: bytes) -> Destination | None:
    """What reading one header from `stream` (then EOF) must give: a Destination or None."""
    if not stream or stream[0] not in (4, 6):
        return None
    size = 7 if stream[0] == 4 else 19
    return decode_destination(stream[:size]) if len(stream) >= size else None


async def _read_header_from(chunks: list[bytes]) -> tuple[Destination | HeaderError, bytes]:
    """Write `chunks` into one end of a socket pair, yielding to the reader between them, then
    EOF; read one header from the other end. Returns the result and the bytes left unread."""
    loop = asyncio.get_running_loop()
    reader, writer = socket.socketpair()
    with reader, writer:
        reader.setblocking(False)
        writer.setblocking(False)

        async def write() -> None:
            for chunk in chunks:
                await loop.sock_sendall(writer, chunk)
                for _ in range(3):
                    await asyncio.sleep(0)
            writer.shutdown(socket.SHUT_WR)

        async with asyncio.timeout(10):
            writing = asyncio.create_task(write())
            result: Destination | HeaderError
            try:
                result = await read_destination_header(reader)
            except HeaderError as exc:
                result = exc
            await writing
            rest = b""
            while chunk := await loop.sock_recv(reader, 1 << 16):
                rest += chunk
    return result, rest


@settings(max_examples=300, deadline=None)
@given(header_streams.flatmap(lambda stream: chunked(stream)))
def test_header_read_from_a_socket_in_any_chunks(chunks: list[bytes]) -> None:
    """From a real socket: the oracle's destination, having read exactly the header and not
    a byte of what follows; or HeaderError when the marker is bad or the stream ends early."""
    stream = b"".join(chunks)
    expected = header_oracle(stream)
    result, rest = asyncio.run(_read_header_from(chunks))
    if expected is None:
        assert isinstance(result, HeaderError), result
        return
    assert result == expected
    assert rest == stream[header_size(stream[0]) :]


# --- the IPv4 stream framer -----------------------------------------------------------------


@st.composite
def ipv4_packets(draw: st.DrawFn, max_length: int = 200) -> bytes:
    """A packet the framer accepts; its contents arbitrary, often close to a real TCP one."""
    length = draw(st.integers(20, max_length))
    words = draw(st.integers(5, min(15, length // 4)))
    body = draw(st.binary(min_size=length - 4, max_size=length - 4))
    return bytes([0x40 | words, body[0] if body else 0]) + struct.pack("!H", length) + body[1:]


stream_parts = st.one_of(
    st.binary(max_size=48),
    ipv4_packets(),
    st.tuples(st.integers(0, 255), st.integers(0, 0xFFFF)).map(
        lambda t: bytes([t[0], 0]) + struct.pack("!H", t[1])
    ),
)
streams = st.lists(stream_parts, max_size=10).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(streams.flatmap(lambda s: chunked(s)), st.integers(1, 300))
def test_framer_feed_any_bytes_any_read_size(chunks: list[bytes], read_size: int) -> None:
    """`feed` (the path the read-path tests do not take), with read sizes down to one byte:
    the oracle's packets, then FramingError at the first bad header and nothing else."""
    framer = Ipv4StreamFramer(read_size)
    packets: list[bytes] = []
    failed = False
    try:
        for chunk in chunks:
            packets.extend(framer.feed(chunk))
    except FramingError:
        failed = True
    expected_packets, expected_failure = framing_oracle(b"".join(chunks))
    assert failed == (expected_failure is not None)
    if failed:
        # feed() loses the packets completed in the call that failed, never later ones.
        assert packets == expected_packets[: len(packets)]
    else:
        assert packets == expected_packets
        assert framer.pending == len(b"".join(chunks)) - sum(map(len, packets))


@given(st.integers(-(2**20), 2**20))
def test_framer_read_size_any_integer(read_size: int) -> None:
    if read_size < 1:
        try:
            Ipv4StreamFramer(read_size)
        except ValueError:
            return
        raise AssertionError("a read size under 1 was accepted")
    assert len(Ipv4StreamFramer(read_size).buffer_for_read()) >= read_size


@given(st.integers(1, 100), st.lists(st.integers(-5, 300_000), max_size=5))
def test_framer_commit_any_count(read_size: int, counts: list[int]) -> None:
    """commit() takes 0..free space and refuses anything else with ValueError."""
    framer = Ipv4StreamFramer(read_size)
    for count in counts:
        free = len(framer.buffer_for_read())
        before = framer.pending
        try:
            framer.commit(count)
        except ValueError:
            assert not 0 <= count <= free
            assert framer.pending == before
            continue
        assert framer.pending == before + count
        try:
            for _ in framer.packets():
                pass
        except FramingError:
            return  # zeros are not IPv4: the framer is done, as documented


# --- packet policies ------------------------------------------------------------------------

INTERFACE = IPv4Address("54.1.2.3")
OTHER = IPv4Address("54.1.2.4")
PUBLIC = IPv4Address("93.184.216.34")
outgoing = OutgoingPolicy(INTERFACE)
incoming = IncomingPolicy(INTERFACE)

addresses = st.one_of(
    st.sampled_from([INTERFACE, OTHER, PUBLIC]),
    st.sampled_from(RESERVED_NETWORKS)
    .flatmap(lambda net: st.integers(int(net.network_address), int(net.broadcast_address)))
    .map(IPv4Address),
    st.integers(0, U32_MAX).map(IPv4Address),
)


@st.composite
def shaped_packets(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, each field a check reads usually set to a value that passes it (or
    sits at its edge), so every check is reached with arbitrary bytes around it."""
    length = draw(st.one_of(st.integers(0, 60), st.integers(40, 120), st.integers(40, 120)))
    packet = bytearray(draw(st.binary(min_size=length, max_size=length)))

    def put(offset: int, values: st.SearchStrategy[bytes]) -> None:
        value = draw(values)
        if len(packet) >= offset + len(value) and draw(st.integers(0, 9)):  # 9 times in 10
            packet[offset : offset + len(value)] = value

    words = st.one_of(st.just(5), st.just(5), st.integers(0, 15))
    put(0, words.map(lambda words: bytes([0x40 | words])))
    fragment_fields = [b"\x00\x00", b"\x40\x00", b"\x20\x00", b"\x10\x00", b"\x00\x01"]
    put(6, st.sampled_from(fragment_fields))
    put(9, st.sampled_from([6, 6, 6, 17, 1, 0]).map(lambda protocol: bytes([protocol])))
    put(12, st.one_of(st.just(INTERFACE), addresses).map(lambda a: a.packed))
    put(16, addresses.map(lambda a: a.packed))
    if packet:
        ports = st.sampled_from([80, 443, 1023, 1024, 22, 61439, 61440, 65535, 79, 444])
        put((packet[0] & 0x0F) * 4, ports.map(lambda port: struct.pack("!H", port)))
    return bytes(packet)


def outgoing_oracle(p: bytes) -> Drop | None:
    header_length = (p[0] & 0x0F) * 4 if p else 0
    if len(p) < 20 or not 20 <= header_length <= len(p):
        return Drop.TRUNCATED
    if IPv4Address(p[12:16]) != INTERFACE:
        return Drop.WRONG_SOURCE
    if any(IPv4Address(p[16:20]) in network for network in RESERVED_NETWORKS):
        return Drop.RESERVED_DESTINATION
    if p[9] != 6:
        return Drop.NOT_TCP
    if int.from_bytes(p[6:8], "big") % 0x2000:
        return Drop.FRAGMENT
    if len(p) < header_length + 20:
        return Drop.TRUNCATED
    port = int.from_bytes(p[header_length : header_length + 2], "big")
    if port not in (80, 443) and not 1024 <= port <= 61439:
        return Drop.FORBIDDEN_SOURCE_PORT
    return None


def incoming_oracle(p: bytes) -> Drop | None:
    header_length = (p[0] & 0x0F) * 4 if p else 0
    if len(p) < 20 or not 20 <= header_length <= len(p):
        return Drop.TRUNCATED
    return None if IPv4Address(p[16:20]) == INTERFACE else Drop.WRONG_DESTINATION


def as_framer_view(packet: bytes) -> memoryview:
    """The packet as the framer hands it out: a slice of a bigger buffer."""
    return memoryview(b"\xff" * 7 + packet + b"\xee" * 9)[7 : 7 + len(packet)]


@settings(max_examples=1000)
@given(shaped_packets())
def test_policies_on_shaped_arbitrary_bytes(packet: bytes) -> None:
    """The oracle's verdict, the same for bytes and for a view into a bigger buffer."""
    for form in (packet, as_framer_view(packet)):
        assert outgoing.check(form) == outgoing_oracle(packet)
        assert incoming.check(form) == incoming_oracle(packet)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(shaped_packets(), stream_parts), max_size=8), st.data())
def test_framer_then_policies_on_any_stream(parts: list[bytes], data: st.DataObject) -> None:
    """The raw proxies' receive path: frame an arbitrary stream in arbitrary reads, check each
    packet view as it comes out. Only FramingError ends it; every check gives a verdict."""
    stream = b"".join(parts)
    framer = Ipv4StreamFramer(data.draw(st.integers(1, 256)))
    verdicts: list[Drop | None] = []
    try:
        for chunk in data.draw(chunked(stream)):
            while chunk:
                space = framer.buffer_for_read()
                taken = min(len(space), len(chunk))
                space[:taken] = chunk[:taken]
                framer.commit(taken)
                chunk = chunk[taken:]
                for view in framer.packets():
                    verdict = outgoing.check(view)
                    assert verdict == outgoing_oracle(bytes(view))
                    assert incoming.check(view) == incoming_oracle(bytes(view))
                    verdicts.append(verdict)
    except FramingError:
        assert framing_oracle(stream)[1]
    assert len(verdicts) == len(framing_oracle(stream)[0])


@given(st.lists(st.tuples(st.one_of(st.sampled_from(Drop), st.text()), st.integers(1, 9))))
def test_drop_counters_add_up(additions: list[tuple[str, int]]) -> None:
    counters = DropCounters()
    for reason, count in additions:
        counters.add(reason, count)
    total = sum(count for _, count in additions)
    assert counters.total == total
    assert [reason for reason, _ in counters.items()] == sorted({r for r, _ in additions})
    for reason, _ in additions:
        assert counters[reason] == sum(c for r, c in additions if r == reason)
    line = counters.format()
    assert line.startswith(f"dropped {total} packet")
