"""The IPv4 stream framer: same packets whatever the chunking, and every malformed header named."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pf_proxy.raw.framing import MAX_PACKET_LENGTH, FramingError, Ipv4StreamFramer


def ipv4_packet(total_length: int, header_words: int = 5, fill: int = 0xAB) -> bytes:
    """A packet whose header says what the framer reads; the rest is a recognisable fill."""
    assert header_words * 4 <= total_length
    prefix = bytes([0x40 | header_words, 0]) + struct.pack("!H", total_length)
    return prefix + bytes([fill]) * (total_length - 4)


def oracle(stream: bytes) -> tuple[list[bytes], str | None]:
    """The whole stream framed at once, the plainest way: (packets, error message or None)."""
    packets: list[bytes] = []
    offset = 0
    while len(stream) - offset >= 4:
        version, words = stream[offset] >> 4, stream[offset] & 0x0F
        (length,) = struct.unpack_from("!H", stream, offset + 2)
        if version != 4 or words < 5 or length < 20 or words * 4 > length:
            return packets, "error"
        if len(stream) - offset < length:
            break
        packets.append(stream[offset : offset + length])
        offset += length
    return packets, None


def frame_by_reads(chunks: list[bytes], read_size: int = 65536) -> tuple[list[bytes], str | None]:
    """Drive the framer as the I/O layer does: receive into its buffer, commit, take packets."""
    framer = Ipv4StreamFramer(read_size)
    packets: list[bytes] = []
    try:
        for chunk in chunks:
            while chunk:
                space = framer.buffer_for_read()
                assert len(space) >= read_size
                taken = min(len(space), len(chunk))
                space[:taken] = chunk[:taken]
                framer.commit(taken)
                chunk = chunk[taken:]
                packets.extend(bytes(packet) for packet in framer.packets())
    except FramingError:
        return packets, "error"
    return packets, None


def frame_by_feed(chunks: list[bytes]) -> list[bytes]:
    framer = Ipv4StreamFramer()
    return [packet for chunk in chunks for packet in framer.feed(chunk)]


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# Sizes at the edges: the smallest packet, headers with options, the MTUs the proxies meet,
# and the largest the length field can say.
EDGE_PACKETS = [
    ipv4_packet(20),
    ipv4_packet(24, header_words=6, fill=1),
    ipv4_packet(60, header_words=15, fill=2),
    ipv4_packet(61, fill=3),
    ipv4_packet(1500, fill=4),
    ipv4_packet(9001, fill=5),
    ipv4_packet(MAX_PACKET_LENGTH, fill=6),
    ipv4_packet(40, fill=7),
]
EDGE_STREAM = b"".join(EDGE_PACKETS)


def test_whole_stream_in_one_chunk() -> None:
    assert frame_by_feed([EDGE_STREAM]) == EDGE_PACKETS
    assert frame_by_reads([EDGE_STREAM]) == (EDGE_PACKETS, None)


def test_every_split_in_two_gives_the_same_packets() -> None:
    small = b"".join(EDGE_PACKETS[:4] + EDGE_PACKETS[-1:])
    for cut in range(len(small) + 1):
        assert frame_by_feed(split(small, [cut])) == EDGE_PACKETS[:4] + EDGE_PACKETS[-1:], cut


def test_every_cut_near_each_packet_boundary() -> None:
    """Two-way and three-way cuts within 5 bytes of every boundary, through the big packets."""
    boundaries = list(itertools.accumulate(len(p) for p in EDGE_PACKETS))
    near = {b + d for b in [0, *boundaries] for d in range(-5, 6)}
    near = sorted(near & set(range(len(EDGE_STREAM) + 1)))
    for first, second in itertools.combinations(near, 2):
        assert frame_by_reads(split(EDGE_STREAM, [first, second])) == (EDGE_PACKETS, None)


def test_one_byte_at_a_time() -> None:
    packets = EDGE_PACKETS[:6]
    stream = b"".join(packets)
    assert frame_by_reads([stream[i : i + 1] for i in range(len(stream))]) == (packets, None)


def test_small_reads_never_exhaust_the_buffer() -> None:
    """With a tiny read size the buffer is compacted often, and still offers a full read."""
    chunks = [EDGE_STREAM[i : i + 7] for i in range(0, len(EDGE_STREAM), 7)]
    assert frame_by_reads(chunks, read_size=7) == (EDGE_PACKETS, None)


packet_sizes = st.integers(min_value=20, max_value=3000)


@st.composite
def packet_lists(draw: st.DrawFn) -> list[bytes]:
    packets = []
    for index, size in enumerate(draw(st.lists(packet_sizes, max_size=12))):
        words = draw(st.integers(min_value=5, max_value=min(15, size // 4)))
        packets.append(ipv4_packet(size, header_words=words, fill=index))
    if draw(st.booleans()):
        packets.append(ipv4_packet(draw(st.integers(20_000, MAX_PACKET_LENGTH)), fill=0xEE))
    return packets


@settings(max_examples=300, deadline=None)
@given(packets=packet_lists(), data=st.data())
def test_any_chunking_gives_the_same_packets(packets: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(packets)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    chunks = split(stream, cuts)
    assert frame_by_reads(chunks) == (packets, None)
    assert frame_by_feed(chunks) == packets


@settings(max_examples=300, deadline=None)
@given(packets=packet_lists(), data=st.data())
def test_a_trailing_partial_packet_is_held_not_returned(
    packets: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(packets)
    partial = data.draw(st.integers(1, len(stream) - 1)) if len(stream) > 1 else 0
    framer = Ipv4StreamFramer()
    delivered = framer.feed(stream[:partial])
    assert delivered == packets[: len(delivered)]
    assert framer.pending == partial - sum(len(p) for p in delivered)
    assert delivered + framer.feed(stream[partial:]) == packets
    assert framer.pending == 0


# Arbitrary bytes mixed with real packets, so streams go wrong at every depth.
segments = st.one_of(
    st.binary(max_size=64),
    packet_sizes.map(ipv4_packet),
    st.tuples(st.integers(0, 255), st.integers(0, 0xFFFF)).map(
        lambda t: bytes([t[0], 0]) + struct.pack("!H", t[1])
    ),
)


@settings(max_examples=500, deadline=None)
@given(parts=st.lists(segments, max_size=10), data=st.data())
def test_arbitrary_bytes_frame_as_the_oracle_says(parts: list[bytes], data: st.DataObject) -> None:
    """Any bytes in any chunks: the packets before the first bad header, then FramingError."""
    stream = b"".join(parts)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert frame_by_reads(split(stream, cuts)) == oracle(stream)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"\x60\x00\x00\x28", "IP version 6 is not 4 (first byte 0x60)"),
        (b"\x00\x00\x00\x00", "IP version 0 is not 4 (first byte 0x00)"),
        (b"\xf5\x00\x00\x28", "IP version 15 is not 4 (first byte 0xf5)"),
        (b"\x44\x00\x00\x28", "IPv4 header length 4 words is under 5 (20 bytes)"),
        (b"\x40\x00\x00\x28", "IPv4 header length 0 words is under 5 (20 bytes)"),
        (b"\x45\x00\x00\x0c", "IPv4 total length 12 is under 20"),
        (b"\x45\x00\x00\x00", "IPv4 total length 0 is under 20"),
        (b"\x45\x00\x00\x13", "IPv4 total length 19 is under 20"),
        (b"\x46\x00\x00\x14", "IPv4 header length 24 bytes is past the total length 20"),
        (b"\x4f\x00\x00\x3b", "IPv4 header length 60 bytes is past the total length 59"),
    ],
)
def test_each_malformed_header_is_named(header: bytes, message: str) -> None:
    good = ipv4_packet(100)
    framer = Ipv4StreamFramer()
    assert framer.feed(good + header[:3]) == [good]  # 3 bytes: not yet a judgement
    with pytest.raises(FramingError) as raised:
        framer.feed(header[3:])
    assert str(raised.value) == message
    assert isinstance(raised.value, ValueError)


def test_packets_before_a_bad_header_are_yielded_first() -> None:
    good = [ipv4_packet(20, fill=1), ipv4_packet(33, fill=2)]
    framer = Ipv4StreamFramer()
    space = framer.buffer_for_read()
    stream = b"".join(good) + b"\x45\x00\x00\x05" + bytes(20)
    space[: len(stream)] = stream
    framer.commit(len(stream))
    seen = []
    with pytest.raises(FramingError, match="total length 5 is under 20"):
        for packet in framer.packets():
            seen.append(bytes(packet))
    assert seen == good


def test_packets_can_be_taken_a_few_at_a_time() -> None:
    packets = [ipv4_packet(20 + i, fill=i) for i in range(5)]
    framer = Ipv4StreamFramer()
    space = framer.buffer_for_read()
    stream = b"".join(packets)
    space[: len(stream)] = stream
    framer.commit(len(stream))
    taken = [bytes(p) for p in itertools.islice(framer.packets(), 2)]
    assert framer.pending == len(stream) - 41
    taken += [bytes(p) for p in framer.packets()]
    assert taken == packets
    assert framer.pending == 0


def test_views_are_the_buffer_not_copies() -> None:
    framer = Ipv4StreamFramer()
    space = framer.buffer_for_read()
    packet = ipv4_packet(64, fill=9)
    space[:64] = packet
    framer.commit(64)
    (view,) = framer.packets()
    assert isinstance(view, memoryview)
    assert view.obj is space.obj
    assert view.tobytes() == packet


def test_reading_on_without_taking_packets_is_refused() -> None:
    framer = Ipv4StreamFramer(read_size=1000)
    packet = ipv4_packet(1000)
    with pytest.raises(RuntimeError, match="take the whole packets"):
        for _ in range(200):
            space = framer.buffer_for_read()
            space[:1000] = packet
            framer.commit(1000)


def test_commit_past_the_free_space_is_refused() -> None:
    framer = Ipv4StreamFramer(read_size=100)
    free = len(framer.buffer_for_read())
    with pytest.raises(ValueError, match=f"cannot commit {free + 1} bytes: the buffer has {free}"):
        framer.commit(free + 1)
    with pytest.raises(ValueError, match="cannot commit -1 bytes"):
        framer.commit(-1)


def test_feed_accepts_any_bytes_like() -> None:
    packet = ipv4_packet(30)
    assert Ipv4StreamFramer().feed(bytearray(packet)) == [packet]
    assert Ipv4StreamFramer().feed(memoryview(packet)) == [packet]
    assert Ipv4StreamFramer().feed(b"") == []
