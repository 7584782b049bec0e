"""The datagram framer: 2-byte lengths on a stream, the framing of DNS over TCP.

Same datagrams whatever the chunking, only the unfinished frame kept, a cut frame named at the
end of the stream, and arbitrary bytes never a crash.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pf_proxy.udp.framing import (
    MAX_DATAGRAM,
    MAX_FRAME,
    Deframer,
    FramingError,
    encode_frame,
)


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def deframe(chunks: list[bytes]) -> list[bytes]:
    deframer = Deframer()
    datagrams = [bytes(d) for chunk in chunks for d in deframer.feed(chunk)]
    deframer.end()
    return datagrams


def oracle(stream: bytes) -> tuple[list[bytes], int]:
    """The plainest reading of a whole stream: (datagrams, bytes of an unfinished frame)."""
    datagrams, offset = [], 0
    while len(stream) - offset >= 2:
        length = int.from_bytes(stream[offset : offset + 2], "big")
        if len(stream) - offset - 2 < length:
            break
        datagrams.append(stream[offset + 2 : offset + 2 + length])
        offset += 2 + length
    return datagrams, len(stream) - offset


EDGE_DATAGRAMS = [
    b"",
    b"x",
    b"",
    bytes(range(256)),
    b"\x00\x00",  # looks like an empty frame
    b"\xff" * 4096,  # an EDNS0 answer's size
    b"y" * 65507,  # the largest IPv4 UDP datagram
    b"z" * MAX_DATAGRAM,
    b"",
]
EDGE_STREAM = b"".join(encode_frame(d) for d in EDGE_DATAGRAMS)


def test_encode() -> None:
    assert encode_frame(b"") == b"\x00\x00"
    assert encode_frame(b"abc") == b"\x00\x03abc"
    assert encode_frame(memoryview(b"\x01" * 258)) == b"\x01\x02" + b"\x01" * 258
    assert len(encode_frame(b"a" * MAX_DATAGRAM)) == MAX_FRAME == 65537


def test_a_datagram_over_the_frame_is_refused_with_its_size() -> None:
    with pytest.raises(FramingError, match="a datagram of 65536 bytes is over the 65535-byte"):
        encode_frame(b"a" * (MAX_DATAGRAM + 1))


def test_whole_stream_at_once() -> None:
    assert deframe([EDGE_STREAM]) == EDGE_DATAGRAMS


def test_zero_length_datagrams_are_datagrams() -> None:
    deframer = Deframer()
    assert [bytes(d) for d in deframer.feed(b"\x00\x00" * 3)] == [b"", b"", b""]
    assert deframer.pending == 0


def test_one_byte_at_a_time() -> None:
    stream = b"".join(encode_frame(d) for d in EDGE_DATAGRAMS[:6])
    assert deframe([stream[i : i + 1] for i in range(len(stream))]) == EDGE_DATAGRAMS[:6]


def test_every_cut_near_each_frame_boundary() -> None:
    """Two-way cuts within 3 bytes of every boundary, through the biggest frames."""
    boundaries = list(itertools.accumulate(len(encode_frame(d)) for d in EDGE_DATAGRAMS))
    near = sorted({b + d for b in [0, *boundaries] for d in range(-3, 4)} & set(
        range(len(EDGE_STREAM) + 1)
    ))
    for first, second in itertools.combinations(near, 2):
        assert deframe(split(EDGE_STREAM, [first, second])) == EDGE_DATAGRAMS


def test_datagrams_inside_a_chunk_are_views_of_it_and_a_straddling_one_a_copy() -> None:
    deframer = Deframer()
    chunk = bytearray(encode_frame(b"one") + encode_frame(b"two")[:3])
    (first,) = deframer.feed(chunk)
    assert isinstance(first, memoryview) and first.obj is chunk
    (second,) = deframer.feed(b"wo")
    assert second == b"two" and isinstance(second, bytes)


def test_an_idle_deframer_holds_no_buffer() -> None:
    deframer = Deframer()
    deframer.feed(encode_frame(b"a" * 1000))
    assert deframer._partial is None
    deframer.feed(b"\x00")
    assert deframer.pending == 1
    deframer.feed(b"\x01a")
    assert deframer._partial is None


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"\x00", r"stream ended inside a frame's length \(1 of 2 bytes\)"),
        (b"\x02\x00" + b"a" * 10, r"stream ended inside a frame: 502 of its 512 bytes missing"),
        (b"\xff\xff", r"stream ended inside a frame: 65535 of its 65535 bytes missing"),
        (encode_frame(b"ok") + b"\x00\x05abcd", r"1 of its 5 bytes missing"),
    ],
)
def test_a_stream_cut_inside_a_frame_says_how_much_was_missing(
    stream: bytes, message: str
) -> None:
    deframer = Deframer()
    deframer.feed(stream)
    with pytest.raises(FramingError, match=message):
        deframer.end()


def test_a_clean_end() -> None:
    deframer = Deframer()
    deframer.feed(b"")
    deframer.end()
    deframer.feed(encode_frame(b"x"))
    deframer.end()


datagrams = st.lists(
    st.one_of(
        st.binary(max_size=600),
        st.integers(0, MAX_DATAGRAM).map(lambda n: bytes([n % 251]) * n),
    ),
    max_size=10,
)


@settings(max_examples=300, deadline=None)
@given(datagrams=datagrams, data=st.data())
def test_any_chunking_of_any_frames_gives_the_same_datagrams(
    datagrams: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(encode_frame(d) for d in datagrams)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    assert deframe(split(stream, cuts)) == datagrams


@settings(max_examples=1000, deadline=None)
@given(stream=st.binary(max_size=3000), data=st.data())
def test_arbitrary_bytes_never_crash_and_match_the_plain_reading(
    stream: bytes, data: st.DataObject
) -> None:
    """Whatever the bytes and the chunking: the datagrams of the plainest reading, at most one
    unfinished frame kept, and end() raises exactly when the stream stopped inside one."""
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    deframer = Deframer()
    received: list[bytes] = []
    for chunk in split(stream, cuts):
        received += [bytes(d) for d in deframer.feed(chunk)]
        assert deframer.pending <= MAX_FRAME
    expected, unfinished = oracle(stream)
    assert received == expected
    assert deframer.pending == unfinished
    if unfinished:
        with pytest.raises(FramingError, match="stream ended inside a frame"):
            deframer.end()
    else:
        deframer.end()


@settings(max_examples=200, deadline=None)
@given(length=st.integers(0, MAX_DATAGRAM), data=st.data())
def test_the_kept_frame_is_never_more_than_one_frame(length: int, data: st.DataObject) -> None:
    """A frame followed by a large chunk of later frames: what is kept is the unfinished one."""
    stream = encode_frame(b"a" * length) + encode_frame(b"b" * 70) * 2000
    cut = data.draw(st.integers(0, len(stream)))
    deframer = Deframer()
    got = [bytes(d) for d in deframer.feed(stream[:cut])]
    assert deframer.pending <= MAX_FRAME
    got += [bytes(d) for d in deframer.feed(stream[cut:])]
    assert deframer.pending == 0
    assert got == [b"a" * length] + [b"b" * 70] * 2000
