"""Datagrams on a byte stream: each one as a 2-byte big-endian length, then its bytes.

This is the framing of DNS over TCP (RFC 1035 section 4.2.2), so a stream of DNS queries framed
here is also a valid DNS-over-TCP conversation. A zero-length datagram is a zero-length frame
(just `00 00`); the largest frame carries 65,535 bytes, more than any UDP datagram (65,507 over
IPv4, 65,527 over IPv6).

Sans-I/O: `encode_frame` turns a datagram into bytes to write; a `Deframer` is fed the stream's
bytes in whatever chunks the socket delivers and returns the whole datagrams, keeping only the
unfinished frame (at most 2 + 65,535 bytes, however the stream is chunked). At the end of the
stream, `Deframer.end()` raises `FramingError` if a frame was cut short, saying how much of it
was missing. Any bytes at all are a valid stream prefix: there is nothing else to check, so
garbage is only ever a wrong length, found at the end of the stream or by the receiver of the
datagram.
"""

from __future__ import annotations

__all__ = [
    "HEADER_SIZE",
    "MAX_DATAGRAM",
    "MAX_FRAME",
    "Deframer",
    "FramingError",
    "encode_frame",
]

HEADER_SIZE = 2
"""Bytes of the length prefix."""

MAX_DATAGRAM = 0xFFFF
"""The longest datagram a frame can carry: its length is 16 bits."""

MAX_FRAME = HEADER_SIZE + MAX_DATAGRAM


class FramingError(ValueError):
    """The stream ended inside a frame, or a datagram is too long to frame."""


def encode_frame(datagram: bytes | bytearray | memoryview) -> bytes:
    """The frame for `datagram`: its length (2 bytes, big-endian), then the datagram."""
    length = len(datagram)
    if length > MAX_DATAGRAM:
        raise FramingError(f"a datagram of {length} bytes is over the {MAX_DATAGRAM}-byte frame")
    return length.to_bytes(HEADER_SIZE, "big") + bytes(datagram)


class Deframer:
    """Cuts a stream of frames into datagrams.

    `feed()` returns the datagrams the new bytes completed. Those inside `data` come back as
    memoryviews of `data` itself (no copy): they are valid as long as `data` is, so the caller
    uses them before it reuses its receive buffer. A datagram that straddled two feeds is
    returned as `bytes`. Only the unfinished frame is kept between feeds, and it is allocated
    only while one exists: an idle deframer holds no buffer.
    """

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial: bytearray | None = None  # an unfinished frame, its header included

    @property
    def pending(self) -> int:
        """Bytes of the unfinished frame received so far (0 at a frame boundary)."""
        return 0 if self._partial is None else len(self._partial)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        """Add `data` to the stream; return the datagrams it completed, in order."""
        view = memoryview(data)
        if view.format != "B":
            view = view.cast("B")
        end = len(view)
        datagrams: list[bytes | memoryview] = []
        position = 0
        if self._partial is not None:
            position = self._complete(view, datagrams)
            if self._partial is not None:
                return datagrams  # all of `data` went into the unfinished frame
        while end - position >= HEADER_SIZE:
            start = position + HEADER_SIZE
            stop = start + (view[position] << 8 | view[position + 1])
            if stop > end:
                break
            datagrams.append(view[start:stop])
            position = stop
        if position < end:
            self._partial = bytearray(view[position:])
        return datagrams

    def _complete(self, view: memoryview, datagrams: list[bytes | memoryview]) -> int:
        """Move into the unfinished frame what it still lacks from `view` (never more);
        hand over the datagram if that finished it. Returns how much of `view` was used."""
        partial = self._partial
        assert partial is not None
        used = 0
        if len(partial) < HEADER_SIZE:
            used = min(HEADER_SIZE - len(partial), len(view))
            partial += view[:used]
            if len(partial) < HEADER_SIZE:
                return used
        wanted = HEADER_SIZE + (partial[0] << 8 | partial[1]) - len(partial)
        taken = min(wanted, len(view) - used)
        partial += view[used : used + taken]
        if taken == wanted:
            datagrams.append(bytes(partial[HEADER_SIZE:]))
            self._partial = None
        return used + taken

    def end(self) -> None:
        """The stream ended: raise `FramingError` if it ended inside a frame."""
        partial = self._partial
        if partial is None:
            return
        if len(partial) < HEADER_SIZE:
            raise FramingError(
                f"stream ended inside a frame's length ({len(partial)} of {HEADER_SIZE} bytes)"
            )
        length = partial[0] << 8 | partial[1]
        missing = HEADER_SIZE + length - len(partial)
        raise FramingError(f"stream ended inside a frame: {missing} of its {length} bytes missing")
