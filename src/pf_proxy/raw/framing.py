"""The raw proxies' stream format: whole IPv4 packets back to back, with no framing of their own.

A packet's length is its IPv4 total-length field (bytes 2-3, big-endian), so the receiver reads
the first 4 bytes of a packet, learns its length and waits for the rest. This module is that
receiver, without I/O (sans-I/O): bytes go in, in whatever chunks the socket delivers, and whole
packets come out.

The originals crash on a total length under 4 or a header length past the packet's end. Here
every header is checked before it is trusted, and a stream that cannot be IPv4 raises
:class:`FramingError`: the caller logs it and drops that connection, since after one bad length
there is no way to find the next packet boundary.

Two ways in:

- ``feed(data) -> list[bytes]``: simple, one copy in and one copy out per packet;
- ``buffer_for_read()`` / ``commit(n)`` / ``packets()``: the I/O layer receives straight into
  the framer's buffer (``sock.recv_into`` or ``loop.sock_recv_into``) and gets back memoryviews
  of that buffer, so a packet is never copied in user space on its way from one socket to the
  next.

The buffer is one fixed ``bytearray`` that never grows. It is compacted (the unfinished packet,
under 64 KiB, moved to the front) only when the free space left is under one read, which is at
most once per ``read_size`` bytes received: with the default 64 KiB reads, under one byte moved
per byte received, however the stream is chunked. (Framing plus the outgoing policy check runs
at about 500,000 packets a second on one core of the development machine.)
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["IPV4_MIN_HEADER_LENGTH", "MAX_PACKET_LENGTH", "FramingError", "Ipv4StreamFramer"]

IPV4_MIN_HEADER_LENGTH = 20
"""Bytes in an IPv4 header without options (IHL 5)."""

MAX_PACKET_LENGTH = 0xFFFF
"""The largest IPv4 total length: the field is 16 bits."""

_PREFIX_LENGTH = 4  # version/IHL, DSCP/ECN, total length: enough to know a packet's size


class FramingError(ValueError):
    """The stream is not a sequence of IPv4 packets; the message says what was wrong.

    Raised for a version other than 4, a header length (IHL) under 5, a total length under 20,
    or a header longer than the packet's total length. The framer cannot resynchronise after
    this: discard it (and the connection it was reading).
    """


class Ipv4StreamFramer:
    """Cuts a byte stream of back-to-back IPv4 packets into whole packets.

    ``read_size`` is the least free space :meth:`buffer_for_read` offers; the buffer holds one
    unfinished packet plus two reads, so it never grows.
    """

    def __init__(self, read_size: int = 65536) -> None:
        if read_size < 1:
            raise ValueError(f"read_size must be positive, not {read_size}")
        self._read_size = read_size
        self._buffer = bytearray(MAX_PACKET_LENGTH + 2 * read_size)
        self._view = memoryview(self._buffer)
        self._start = 0  # first byte not yet handed out as part of a packet
        self._end = 0  # one past the last byte received

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a whole packet (0 at a packet boundary)."""
        return self._end - self._start

    def buffer_for_read(self) -> memoryview:
        """Free space at the end of the buffer to receive into, at least ``read_size`` bytes.

        Receive into it, then call :meth:`commit` with the number of bytes received. This may
        move the unfinished packet, so memoryviews from earlier :meth:`packets` calls are no
        longer valid afterwards. Take every whole packet from :meth:`packets` first: the
        buffer has room for one unfinished packet, not for a backlog (RuntimeError).
        """
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buffer) - self._end < self._read_size:
            pending = self._end - self._start
            if pending > MAX_PACKET_LENGTH:
                raise RuntimeError("take the whole packets from packets() before reading more")
            self._view[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        return self._view[self._end :]

    def commit(self, received: int) -> None:
        """Record that ``received`` bytes were written at the start of :meth:`buffer_for_read`."""
        if not 0 <= received <= len(self._buffer) - self._end:
            free = len(self._buffer) - self._end
            raise ValueError(f"cannot commit {received} bytes: the buffer has {free} free")
        self._end += received

    def packets(self) -> Iterator[memoryview]:
        """Yield each whole packet received so far, as a memoryview of the buffer.

        A view stays valid until the next :meth:`buffer_for_read` or :meth:`feed`; copy it
        (``bytes(view)``) to keep it longer. Stopping the iteration early is fine: the packets
        not yet yielded come out of the next call. Raises :class:`FramingError` on reaching a
        header that cannot be IPv4; the packets before it have been yielded.
        """
        buffer, view = self._buffer, self._view
        while self._end - self._start >= _PREFIX_LENGTH:
            start = self._start
            first_byte = buffer[start]
            total_length = buffer[start + 2] << 8 | buffer[start + 3]
            # Version 4 with a header of 5-15 words that fits in the packet (so length >= 20):
            if not (0x45 <= first_byte <= 0x4F and (first_byte & 0x0F) * 4 <= total_length):
                _check_prefix(first_byte, total_length)  # raises, saying what is wrong
            if self._end - start < total_length:
                return
            self._start = start + total_length
            yield view[start : start + total_length]

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add ``data`` to the stream and return the packets it completed, as ``bytes``.

        Raises :class:`FramingError` as :meth:`packets` does; packets completed earlier in the
        same ``data`` are then lost with the connection.
        """
        data = memoryview(data).cast("B")
        completed: list[bytes] = []
        while data:
            space = self.buffer_for_read()
            taken = min(len(space), len(data))
            space[:taken] = data[:taken]
            self.commit(taken)
            data = data[taken:]
            completed.extend(bytes(packet) for packet in self.packets())
        return completed


def _check_prefix(first_byte: int, total_length: int) -> None:
    """Raise :class:`FramingError` unless a packet's first byte and total length fit IPv4."""
    version, header_words = first_byte >> 4, first_byte & 0x0F
    if version != 4:
        raise FramingError(f"IP version {version} is not 4 (first byte 0x{first_byte:02x})")
    if header_words < 5:
        raise FramingError(f"IPv4 header length {header_words} words is under 5 (20 bytes)")
    if total_length < IPV4_MIN_HEADER_LENGTH:
        raise FramingError(f"IPv4 total length {total_length} is under 20")
    if header_words * 4 > total_length:
        raise FramingError(
            f"IPv4 header length {header_words * 4} bytes is past the total length {total_length}"
        )
