"""Which host name a stream is for, from its first bytes: TLS SNI or HTTP/1.x Host (pure).

`vsock-to-ip-transparent --allow-host` decides by name, but the destination header carries
only an address: the name has to come from the stream itself. `sniff(data)` looks at the bytes
read so far and answers one of three things:

- `Name(host, protocol)`: the server_name of a TLS ClientHello, or the Host header of an HTTP/1.x
  request, as a lowercase ASCII host name without a trailing dot or port;
- `NoName(reason)`: a definite answer that the stream names no host: not TLS or HTTP, a
  ClientHello without server_name (ECH without an outer name is one), an HTTP request without
  Host, or anything malformed;
- `NeedMore(at_least)`: the bytes so far are the beginning of something that may still name
  a host, and the answer cannot change before `at_least` bytes are in (the end of the TLS
  record being read; for HTTP, one more byte).

No I/O: a `Sniffer` is fed the bytes as they arrive and answers after each feed; `sniff()`
is one feed of everything at once. Everything is bounded by `limit` (at most that many bytes
are ever needed; a stream that has not decided by then is `NoName`), and every length field is
checked before it is used, so arbitrary bytes never raise. The work is linear in the bytes
however the client trickles them: a TLS ClientHello is parsed again only once the record being
read is complete (at most MAX_RECORDS of them), and an HTTP head is scanned once, each feed
going on where the last stopped, and parsed once, when its end is in.

Ambiguity is refused rather than guessed: a server must never be able to read a different name
from the same bytes than the proxy did. So a ClientHello with two server_name extensions, or
two host_name entries, and a request with two Host headers, a folded header line, a bare LF or
an absolute URI naming another host, all give `NoName`.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass, field

MAX_SNIFF_BYTES = 16 * 1024  # a post-quantum ClientHello is ~1.8 KiB; 16 KiB leaves room

# TLS (RFC 8446 section 5.1, 4; RFC 6066 section 3)
_HANDSHAKE_RECORD = 0x16
_CLIENT_HELLO = 0x01
_RECORD_HEADER = 5
_MAX_RECORD = 1 << 14  # TLSPlaintext.length must not exceed 2^14
# Records one ClientHello may span: real clients send one, or a few when it outgrows 16 KiB
# or the peer asked for small fragments (max_fragment_length: 512 bytes, 32 records for 16
# KiB); tiny fragments are a filter-evasion trick, refused rather than parsed at length.
MAX_RECORDS = 64
_EXT_SERVER_NAME = 0x0000
_EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D  # draft-ietf-tls-esni
_HOST_NAME_TYPE = 0
_EXTENSION_HEADER = struct.Struct(">HH")  # extension_type, extension_data length

# HTTP/1.x (RFC 9110, 9112)
_MAX_METHOD = 20
TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)  # RFC 9110 tchar: the bytes an HTTP method and a header name are made of
REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/1\.[0-9]")
HEADER_FIELD = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\x20-\x7e\x80-\xff\t]*?)[ \t]*"
)
_ABSOLUTE_URI = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)")

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class Name:
    """The host name the stream is for; `protocol` is "tls" or "http"."""

    host: str
    protocol: str


@dataclass(frozen=True)
class NoName:
    """The stream names no usable host; `reason` says why, for the log."""

    reason: str


@dataclass(frozen=True)
class NeedMore:
    """The bytes so far may still name a host: read more and ask again, best once `at_least`
    bytes are in (0: any time). Two NeedMore are equal whatever their `at_least`."""

    at_least: int = field(default=0, compare=False)


NEED_MORE = NeedMore()
Sniffed = Name | NoName | NeedMore


def sniff(data: bytes, *, ended: bool = False, limit: int = MAX_SNIFF_BYTES) -> Sniffed:
    """The host name `data` (a stream's first bytes) is for, `NoName`, or `NEED_MORE`.

    `ended`: the stream ended after `data`, so "need more" becomes `NoName`. At `limit` bytes
    or more, a stream that still needs more is `NoName` too.
    """
    sniffer = Sniffer(limit)
    found = sniffer.feed(data)
    if ended and isinstance(found, NeedMore):
        return sniffer.end()
    return found


class Sniffer:
    """`sniff` for bytes that arrive in pieces: `feed` each piece as it comes, `end` when the
    stream ends first. `data` holds every byte fed."""

    def __init__(self, limit: int = MAX_SNIFF_BYTES) -> None:
        self.data = bytearray()
        self.limit = limit
        self._at_least = 0  # no answer can change before this many bytes are in
        # HTTP: what the bytes so far have shown, so that each feed checks only new bytes
        self._method_checked = False
        self._request_line_checked = False
        self._checked = 0  # data[:_checked] has no bare CR or LF and no end of the head

    def feed(self, chunk: bytes) -> Sniffed:
        """The answer for every byte fed so far, `chunk` the last. Feed no more once it is
        `Name` or `NoName`."""
        self.data += chunk
        data = self.data
        if len(data) < self._at_least:
            result: Sniffed = NEED_MORE
        elif not data:
            result = NEED_MORE
        elif data[0] == _HANDSHAKE_RECORD:
            result = _sniff_tls(data)
        elif data[0] in TOKEN_CHARS:
            result = self._sniff_http_so_far()
        else:
            result = NoName(f"neither TLS nor HTTP (first byte 0x{data[0]:02x})")
        if isinstance(result, NeedMore):
            self._at_least = max(result.at_least, len(data) + 1)
            if len(data) >= self.limit:
                return NoName(f"no host name in the first {self.limit} bytes")
            return NeedMore(self._at_least)
        return result

    def end(self) -> NoName:
        """The answer when the stream ended while `feed` still needed more."""
        return NoName(f"the stream ended after {len(self.data)} bytes, before naming a host")

    def _sniff_http_so_far(self) -> Sniffed:
        """An HTTP/1.x request head, checking only the bytes new since the last feed (for a
        bare CR or LF, the end of the request line, the end of the head), so that a head fed
        a byte at a time costs what one fed whole does; parsed once, when its end is in."""
        data = self.data
        if not self._method_checked:
            method = starts_like_http(data)
            if method is None:
                return NEED_MORE
            if not method:
                return NoName("neither TLS nor HTTP")
            self._method_checked = True
        start = self._checked
        end = data.find(b"\r\n\r\n", max(0, start - 3))
        if end >= 0:
            return _sniff_http(bytes(data[:end]))
        if not _crlf_only(bytes(data[start:])):  # from after a whole CRLF, or from a CR
            return NoName("HTTP request with a bare LF or CR")
        self._checked = len(data) - 1 if data.endswith(b"\r") else len(data)
        if not self._request_line_checked:
            first_line_end = data.find(b"\r\n", max(0, start - 1))
            if first_line_end >= 0:
                if REQUEST_LINE.fullmatch(data, 0, first_line_end) is None:
                    return NoName("not an HTTP/1.x request line")
                self._request_line_checked = True
        return NEED_MORE


def starts_like_http(data: bytes | bytearray) -> bool | None:
    """Whether `data` starts as an HTTP/1.x request does, with a method (token characters,
    at most 20) and a space: True, False, or None while too few bytes are in to tell. Looks
    at the first 21 bytes at most."""
    space = data.find(b" ", 0, _MAX_METHOD + 1)
    if space < 0:
        head = data[: _MAX_METHOD + 1]
        if len(head) <= _MAX_METHOD and all(byte in TOKEN_CHARS for byte in head):
            return None
        return False
    return all(byte in TOKEN_CHARS for byte in data[:space])


def valid_host_name(text: str) -> str | None:
    """`text` as a lowercase host name without a trailing dot, or None if it is not one
    (LDH labels of 1-63 characters, at most 253 in all, ASCII only, not an IPv4 address)."""
    if not text.isascii():
        return None
    host = text.lower()
    if host.endswith("."):
        host = host[:-1]
    if not 0 < len(host) <= 253:
        return None
    labels = host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if labels[-1].isdigit():  # 1.2.3.4, 300.1.1.1, 127.1: an address, not a name
        return None
    return host


# --- TLS ----------------------------------------------------------------------------------------


class _Malformed(Exception):
    """Raised inside the ClientHello parser; becomes NoName."""


def _sniff_tls(data: bytes | bytearray) -> Sniffed:
    """Reassemble the first handshake message from as many records as it spans; parse it once
    whole. Only handshake records may come before it is complete."""
    message = bytearray()
    offset = 0
    needed: int | None = None  # the whole handshake message's size, once its header is in
    records = 0
    while needed is None or len(message) < needed:
        if len(data) - offset < _RECORD_HEADER:
            return NeedMore(offset + _RECORD_HEADER)
        records += 1
        if records > MAX_RECORDS:
            return NoName(f"ClientHello spread over more than {MAX_RECORDS} TLS records")
        content_type, major, minor = data[offset], data[offset + 1], data[offset + 2]
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if content_type != _HANDSHAKE_RECORD:
            return NoName(f"TLS record of type {content_type} inside the ClientHello")
        if major != 3 or minor > 4:
            return NoName(f"not TLS 1.x (record version {major}.{minor})")
        if not 0 < length <= _MAX_RECORD:
            return NoName(f"TLS record of length {length}")
        fragment = data[offset + _RECORD_HEADER : offset + _RECORD_HEADER + length]
        message += fragment
        if needed is None and len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                return NoName(f"TLS handshake message of type {message[0]}, not a ClientHello")
            needed = 4 + int.from_bytes(message[1:4], "big")
            if needed > MAX_SNIFF_BYTES:
                return NoName(f"ClientHello of {needed} bytes, more than {MAX_SNIFF_BYTES}")
        if len(fragment) < length:
            return NeedMore(offset + _RECORD_HEADER + length)  # the record is not all in yet
        offset += _RECORD_HEADER + length
    try:
        return _server_name(memoryview(bytes(message))[4:needed])
    except _Malformed as exc:
        return NoName(f"malformed ClientHello: {exc}")


class _Reader:
    """Bounds-checked reads from a byte string; running past the end is `_Malformed`."""

    def __init__(self, data: memoryview, what: str) -> None:
        self.data = data
        self.at = 0
        self.what = what

    @property
    def left(self) -> int:
        return len(self.data) - self.at

    def take(self, size: int, what: str) -> memoryview:
        if size > self.left:
            raise _Malformed(f"{what} runs past the end of the {self.what}")
        part = self.data[self.at : self.at + size]
        self.at += size
        return part

    def integer(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str) -> _Reader:
        return _Reader(self.take(self.integer(length_size, what), what), what)

    def done(self) -> None:
        if self.left:
            raise _Malformed(f"{self.left} bytes after the end of the {self.what}")


def _server_name(body: memoryview) -> Sniffed:
    """The server_name of one whole ClientHello body (after its 4-byte handshake header)."""
    hello = _Reader(body, "ClientHello")
    hello.take(2 + 32, "legacy_version and random")
    session_id = hello.vector(1, "legacy_session_id")
    if session_id.left > 32:
        raise _Malformed(f"legacy_session_id of {session_id.left} bytes")
    suites = hello.vector(2, "cipher_suites")
    if suites.left == 0 or suites.left % 2:
        raise _Malformed(f"cipher_suites of {suites.left} bytes")
    if hello.vector(1, "legacy_compression_methods").left == 0:
        raise _Malformed("no compression methods")
    if hello.left == 0:
        return NoName("ClientHello without extensions, so without server_name")
    extensions = hello.take(hello.integer(2, "extensions"), "extensions")
    hello.done()
    seen: set[int] = set()
    names: list[str] = []
    at, end = 0, len(extensions)
    while at < end:  # inline, not through _Reader: a ClientHello has a dozen or more
        if end - at < 4:
            raise _Malformed("an extension header runs past the end of the extensions")
        kind, size = _EXTENSION_HEADER.unpack_from(extensions, at)
        at += 4
        if size > end - at:
            raise _Malformed(f"extension {kind} runs past the end of the extensions")
        if kind in seen:
            raise _Malformed(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            names = _host_names(_Reader(extensions[at : at + size], "server_name extension"))
        at += size
    if not names:
        if _EXT_ENCRYPTED_CLIENT_HELLO in seen:
            return NoName("ECH without an outer server_name")
        return NoName("ClientHello without server_name")
    host = valid_host_name(names[0])
    if host is None:
        return NoName(f"server_name {names[0]!r} is not a host name")
    return Name(host, "tls")


def _host_names(content: _Reader) -> list[str]:
    """The host_name entries of a server_name extension (RFC 6066: at most one)."""
    if content.left == 0:
        return []  # a server's empty acknowledgement; not valid from a client, and no name
    entries = content.vector(2, "server_name_list")
    content.done()
    names = []
    while entries.left:
        name_type = entries.integer(1, "server_name type")
        name = entries.vector(2, "server_name")
        if name_type == _HOST_NAME_TYPE:
            names.append(bytes(name.take(name.left, "host_name")).decode("latin-1"))
    if len(names) > 1:
        raise _Malformed("more than one host_name in server_name")
    return names


# --- HTTP/1.x -----------------------------------------------------------------------------------


def _sniff_http(head: bytes) -> Sniffed:
    """The Host of an HTTP/1.x request head (the bytes before its blank line), whose method
    is made of token characters."""
    lines = head.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        return NoName("HTTP request with a bare LF or CR")
    request = REQUEST_LINE.fullmatch(lines[0])
    if request is None:
        if lines[0].startswith(b"PRI * HTTP/2.0"):
            return NoName("HTTP/2 with prior knowledge, which has no Host header")
        return NoName("not an HTTP/1.x request line")
    method, target = request.group(1), request.group(2)
    if method == b"CONNECT":
        return NoName("an HTTP CONNECT request, which names its own destination")
    hosts = []
    for line in lines[1:]:
        field = HEADER_FIELD.fullmatch(line)
        if field is None:
            return NoName("malformed HTTP header line")
        if field.group(1).lower() == b"host":
            hosts.append(field.group(2))
    if not hosts:
        return NoName("HTTP request without a Host header")
    if len(hosts) > 1:
        return NoName("HTTP request with more than one Host header")
    host = _authority_host(hosts[0])
    if host is None:
        return NoName(f"Host {hosts[0].decode('latin-1')!r} is not a host name")
    absolute = _ABSOLUTE_URI.match(target)
    if absolute is not None and _authority_host(absolute.group(1)) != host:
        return NoName("HTTP request whose absolute URI names another host than its Host header")
    return Name(host, "http")


def _crlf_only(data: bytes) -> bool:
    """Whether every LF in `data` ends a CRLF and every CR starts one (a last CR may wait)."""
    body = data[:-1] if data.endswith(b"\r") else data
    stripped = body.replace(b"\r\n", b"")
    return b"\r" not in stripped and b"\n" not in stripped


def _authority_host(value: bytes) -> str | None:
    """The host name of `host[:port]`; None for an IP literal, a bad port or anything else."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        return None  # an IPv6 literal: no name
    host, colon, port = text.partition(":")
    if colon and (not _PORT.fullmatch(port) or int(port) > 0xFFFF):
        return None
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return valid_host_name(host)
    return None
