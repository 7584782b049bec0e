"""The explicit proxy's protocols: an HTTP CONNECT or SOCKS5 request in, answers out (pure).

`vsock-to-ip-proxy` serves both on one port and tells them apart by the first byte a client
sends: 0x05 is SOCKS version 5 (RFC 1928), a token character starts an HTTP/1.x request line
(RFC 9110 section 9.3.6, RFC 9112). A `RequestReader` is fed the bytes as they arrive and
answers after each feed:

- `Continue(send)`: not complete yet; write `send` to the client first (SOCKS's method
  selection), then read on;
- `Request(protocol, target, rest)`: the client asks for a tunnel to `target`; `rest` is what
  it sent after its request (the tunnel's first bytes, to be sent on once connected);
- `Refusal(reason, answer, unsupported)`: a request that will not be served; write `answer`
  (possibly nothing), then close. `unsupported` tells a well-formed request for something not
  offered (SOCKS BIND, a plain-HTTP forward request, an authentication method) from a
  malformed one.

The reader keeps at most `limit` bytes and looks at each byte a bounded number of times,
however the client cuts them: the HTTP head is scanned on from where the last feed stopped and
parsed once, when its blank line is in. `answer()` makes the reply for a request once its
outcome is known (connected, denied, unreachable ...), in the request's own protocol.

Plain-HTTP forward requests (`GET http://host/ HTTP/1.1`) are refused with 501 and a text
saying what to use instead: forwarding them would need a request-by-request HTTP proxy, and
the policy here decides once per connection (docs/security-egress-policy.md).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

from pf_proxy.tcp.sniff import (
    HEADER_FIELD,
    REQUEST_LINE,
    TOKEN_CHARS,
    starts_like_http,
    valid_host_name,
)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_REQUEST_BYTES = 16 * 1024  # an HTTP CONNECT head; a SOCKS5 request is at most 519 bytes

HTTP = "HTTP CONNECT"
SOCKS5 = "SOCKS5"

# SOCKS5 (RFC 1928)
_SOCKS_VERSION = 0x05
_NO_AUTHENTICATION = 0x00
_NO_ACCEPTABLE_METHOD = 0xFF
_CMD_CONNECT = 0x01
_COMMANDS = {0x01: "CONNECT", 0x02: "BIND", 0x03: "UDP ASSOCIATE"}
_ATYP_IPV4, _ATYP_DOMAIN, _ATYP_IPV6 = 0x01, 0x03, 0x04
_METHOD_NAMES = {0x00: "none", 0x01: "GSSAPI", 0x02: "username/password"}

# HTTP/1.x
# Bytes a request head may hold: visible ASCII, space, tab, CR, LF, and obs-text (0x80-0xff)
_NOT_IN_A_HEAD = bytes(b for b in range(256) if (b < 0x20 and b not in b"\t\r\n") or b == 0x7F)
_PORT = re.compile(rb"[0-9]{1,5}")


@dataclass(frozen=True)
class Target:
    """Where the client asks to go: a host name (lowercase, no trailing dot) or an address
    (`address` set, `host` its text), and a port."""

    host: str
    port: int
    address: IpAddress | None = None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Continue:
    """Not a whole request yet: send `send` to the client (if any), then read on."""

    send: bytes = b""


@dataclass(frozen=True)
class Request:
    protocol: str  # HTTP or SOCKS5
    target: Target
    rest: bytes = b""  # sent after the request: the tunnel's first bytes
    send_first: bytes = b""  # owed to the client before the answer (a SOCKS5 method reply)


@dataclass(frozen=True)
class Refusal:
    reason: str  # for the log
    answer: bytes  # for the client, before the connection is closed
    unsupported: bool = False  # well-formed, but asks for something not offered


Step = Continue | Request | Refusal


class Outcome(enum.Enum):
    """What became of a request, as far as its answer goes."""

    CONNECTED = "connected"
    DENIED = "denied"  # by the policy
    UNRESOLVED = "unresolved"  # the name has no address, or could not be resolved
    NETWORK_UNREACHABLE = "network unreachable"
    HOST_UNREACHABLE = "host unreachable"
    REFUSED = "connection refused"
    TIMED_OUT = "timed out"
    FAILED = "failed"  # any other connect error


# The HTTP status and SOCKS5 reply code for each outcome (RFC 9110 section 15; RFC 1928 6).
_HTTP_STATUS = {
    Outcome.CONNECTED: (200, "Connection established"),
    Outcome.DENIED: (403, "Forbidden"),
    Outcome.UNRESOLVED: (502, "Bad Gateway"),
    Outcome.NETWORK_UNREACHABLE: (502, "Bad Gateway"),
    Outcome.HOST_UNREACHABLE: (502, "Bad Gateway"),
    Outcome.REFUSED: (502, "Bad Gateway"),
    Outcome.TIMED_OUT: (504, "Gateway Timeout"),
    Outcome.FAILED: (502, "Bad Gateway"),
}
_SOCKS_REPLY = {
    Outcome.CONNECTED: 0x00,  # succeeded
    Outcome.DENIED: 0x02,  # connection not allowed by ruleset
    Outcome.UNRESOLVED: 0x04,  # host unreachable
    Outcome.NETWORK_UNREACHABLE: 0x03,  # network unreachable
    Outcome.HOST_UNREACHABLE: 0x04,  # host unreachable
    Outcome.REFUSED: 0x05,  # connection refused
    Outcome.TIMED_OUT: 0x06,  # TTL expired
    Outcome.FAILED: 0x01,  # general SOCKS server failure
}
_SOCKS_GENERAL_FAILURE = 0x01
_SOCKS_COMMAND_NOT_SUPPORTED = 0x07
_SOCKS_ADDRESS_TYPE_NOT_SUPPORTED = 0x08


def answer(
    protocol: str,
    outcome: Outcome,
    explanation: str = "",
    bound: tuple[IpAddress, int] | None = None,
) -> bytes:
    """The reply to a request once its outcome is known: HTTP's status line (with
    `explanation` as a short text body when it is an error), or SOCKS5's reply with `bound`
    (the proxy's own address and port for the upstream connection) on success."""
    if protocol == SOCKS5:
        return socks_reply(_SOCKS_REPLY[outcome], bound)
    status, phrase = _HTTP_STATUS[outcome]
    if outcome is Outcome.CONNECTED:
        return f"HTTP/1.1 {status} {phrase}\r\n\r\n".encode()
    return http_error(status, phrase, explanation)


def http_error(status: int, phrase: str, explanation: str) -> bytes:
    body = f"{explanation}\n".encode("ascii", "replace")
    return (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def socks_reply(code: int, bound: tuple[IpAddress, int] | None = None) -> bytes:
    """A SOCKS5 reply: VER, REP, RSV, then BND.ADDR and BND.PORT (0.0.0.0:0 when none)."""
    address, port = bound if bound is not None else (ipaddress.IPv4Address(0), 0)
    kind = _ATYP_IPV4 if address.version == 4 else _ATYP_IPV6
    return bytes([_SOCKS_VERSION, code, 0, kind]) + address.packed + port.to_bytes(2, "big")


class RequestReader:
    """The start of a client's stream, fed as it arrives, until it is a whole request (see the
    module docstring). Feed no more once a feed returns a `Request` or a `Refusal`."""

    def __init__(self, limit: int = MAX_REQUEST_BYTES) -> None:
        self.limit = limit
        self.data = bytearray()
        self._used = 0  # SOCKS5: the greeting's size, once it is answered
        self._greeted = False
        self._scanned = 0  # HTTP: data[:_scanned] holds no blank line and only head bytes
        self._method_checked = False

    @property
    def room(self) -> int:
        """How many more bytes the reader may need (at least 1 until it has answered)."""
        return max(1, self.limit - len(self.data))

    def feed(self, chunk: bytes) -> Step:
        self.data += chunk
        if not self.data:
            return Continue()
        if self.data[0] == _SOCKS_VERSION:
            return self._socks()
        if self.data[0] in TOKEN_CHARS:
            return self._http()
        return Refusal(
            f"neither HTTP nor SOCKS5 (first byte 0x{self.data[0]:02x})", b"", unsupported=False
        )

    def end(self) -> Refusal:
        """The stream ended before a whole request."""
        return Refusal(f"the stream ended after {len(self.data)} bytes, inside the request", b"")

    def timed_out(self, seconds: float) -> Refusal:
        """No whole request within `seconds`."""
        reason = f"no complete request within {seconds:g} s ({len(self.data)} bytes received)"
        if self.data and self.data[0] == _SOCKS_VERSION:
            return Refusal(reason, socks_reply(_SOCKS_GENERAL_FAILURE) if self._greeted else b"")
        return Refusal(reason, http_error(408, "Request Timeout", reason))

    # --- SOCKS5 ---------------------------------------------------------------------------

    def _socks(self) -> Step:
        data = self.data
        if not self._greeted:
            if len(data) < 2:
                return Continue()
            count = data[1]
            if count == 0:
                return Refusal("SOCKS5 greeting offers no method", socks_method(None))
            if len(data) < 2 + count:
                return Continue()
            methods = data[2 : 2 + count]
            if _NO_AUTHENTICATION not in methods:
                offered = ", ".join(_METHOD_NAMES.get(m, f"0x{m:02x}") for m in methods)
                return Refusal(
                    f"SOCKS5 client offers no method this proxy takes (offered: {offered}; "
                    "only 'none', no authentication, is served)",
                    socks_method(None),
                    unsupported=True,
                )
            self._greeted = True
            self._used = 2 + count
            chosen = socks_method(_NO_AUTHENTICATION)
            step = self._socks_request()
            # the request may have come with the greeting: the method reply still goes first
            if isinstance(step, Request):
                return Request(step.protocol, step.target, step.rest, send_first=chosen)
            if isinstance(step, Refusal):
                return Refusal(step.reason, chosen + step.answer, step.unsupported)
            return Continue(chosen)
        return self._socks_request()

    def _socks_request(self) -> Step:
        data, at = self.data, self._used
        if len(data) - at < 4:
            return Continue()
        version, command, reserved, kind = data[at : at + 4]
        general_failure = socks_reply(_SOCKS_GENERAL_FAILURE)
        if version != _SOCKS_VERSION or reserved != 0:
            return Refusal(
                f"malformed SOCKS5 request (version {version}, reserved byte {reserved})",
                general_failure,
            )
        if command != _CMD_CONNECT:
            name = _COMMANDS.get(command, f"0x{command:02x}")
            return Refusal(
                f"SOCKS5 command {name} is not supported (only CONNECT)",
                socks_reply(_SOCKS_COMMAND_NOT_SUPPORTED),
                unsupported=True,
            )
        at += 4
        if kind in (_ATYP_IPV4, _ATYP_IPV6):
            size = 4 if kind == _ATYP_IPV4 else 16
            if len(data) - at < size + 2:
                return Continue()
            address = ipaddress.ip_address(bytes(data[at : at + size]))
            target = Target(str(address), _port_at(data, at + size), address)
            end = at + size + 2
        elif kind == _ATYP_DOMAIN:
            if len(data) - at < 1:
                return Continue()
            size = data[at]
            if len(data) - at < 1 + size + 2:
                return Continue()
            raw = bytes(data[at + 1 : at + 1 + size])
            found = _host_target(raw, _port_at(data, at + 1 + size))
            if found is None:
                shown = raw.decode("latin-1")
                return Refusal(f"SOCKS5 domain {shown!r} is not a host name", general_failure)
            target = found
            end = at + 1 + size + 2
        else:
            return Refusal(
                f"SOCKS5 address type 0x{kind:02x} is not supported",
                socks_reply(_SOCKS_ADDRESS_TYPE_NOT_SUPPORTED),
                unsupported=True,
            )
        if target.port == 0:
            return Refusal(f"SOCKS5 request for port 0 of {target.host}", general_failure)
        return Request(SOCKS5, target, bytes(data[end:]))

    # --- HTTP CONNECT ---------------------------------------------------------------------

    def _http(self) -> Step:
        data = self.data
        if not self._method_checked:
            method = starts_like_http(data)
            if method is None:
                return Continue()
            if not method:
                return self._bad("neither HTTP nor SOCKS5")
            self._method_checked = True
        start = self._scanned
        end = data.find(b"\r\n\r\n", max(0, start - 3))
        new_in_head = bytes(data[start : len(data) if end < 0 else end])  # not the tunnel's
        if len(new_in_head.translate(None, _NOT_IN_A_HEAD)) != len(new_in_head):
            return self._bad("a control character in the request head")
        if end < 0:
            self._scanned = len(data)
            if len(data) >= self.limit:
                if data.find(b"\r\n") < 0:
                    return Refusal(
                        f"request line longer than {self.limit} bytes",
                        http_error(414, "URI Too Long", "request line too long"),
                    )
                return Refusal(
                    f"request head longer than {self.limit} bytes",
                    http_error(431, "Request Header Fields Too Large", "request head too long"),
                )
            return Continue()
        return self._http_request(bytes(data[:end]), bytes(data[end + 4 :]))

    def _http_request(self, head: bytes, rest: bytes) -> Refusal | Request:
        """The whole head (before its blank line), parsed once."""
        lines = head.split(b"\r\n")
        if any(b"\r" in line or b"\n" in line for line in lines):
            return self._bad("a bare CR or LF in the request head")
        request = REQUEST_LINE.fullmatch(lines[0])
        if request is None:
            return self._bad("not an HTTP/1.x request line")
        method, target = request.group(1), request.group(2)
        fields = []
        for line in lines[1:]:
            field = HEADER_FIELD.fullmatch(line)
            if field is None:
                return self._bad("a malformed header line")
            fields.append((field.group(1).lower(), field.group(2)))
        if method != b"CONNECT":
            shown = target.decode("latin-1")
            if b"://" in target:
                return Refusal(
                    f"plain-HTTP forward request {method.decode()} {shown} is not served "
                    "(only CONNECT tunnels)",
                    http_error(501, "Not Implemented", _FORWARD_REFUSED),
                    unsupported=True,
                )
            return self._bad(f"{method.decode()} {shown} is not a proxy request")
        for name, value in fields:
            if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                return self._bad("a CONNECT request with content")
        found = _authority(target)
        if found is None:
            return self._bad(f"CONNECT target {target.decode('latin-1')!r} is not host:port")
        return Request(HTTP, found, rest)

    def _bad(self, reason: str) -> Refusal:
        return Refusal(reason, http_error(400, "Bad Request", reason))


_FORWARD_REFUSED = (
    "This proxy opens tunnels (HTTP CONNECT, SOCKS5); it does not forward plain-HTTP requests. "
    "Use an https:// URL, have the client tunnel http:// too (curl --proxytunnel), or use "
    "SOCKS5 (ALL_PROXY=socks5h://...)."
)


def socks_method(method: int | None) -> bytes:
    """SOCKS5's method selection: VER and METHOD (0xFF: no acceptable method)."""
    return bytes([_SOCKS_VERSION, _NO_ACCEPTABLE_METHOD if method is None else method])


def _port_at(data: bytearray, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "big")


def _host_target(raw: bytes, port: int) -> Target | None:
    """A SOCKS5 domain name (an address written as text counts as that address)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        host = valid_host_name(text)
        return None if host is None else Target(host, port)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return None  # a zone index names an interface of the client's, not of this host
    return Target(str(address), port, address)


def _authority(target: bytes) -> Target | None:
    """CONNECT's authority-form `host:port`, `a.b.c.d:port` or `[v6]:port` (port required)."""
    if target.startswith(b"["):
        inside, bracket, rest = target[1:].partition(b"]")
        if not bracket or not rest.startswith(b":"):
            return None
        port_text = rest[1:]
        try:
            v6 = ipaddress.IPv6Address(inside.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return None
        if v6.scope_id is not None:
            return None  # a zone index names an interface of the client's, not of this host
        address: IpAddress | None = v6
        host = str(v6)
    else:
        name, colon, port_text = target.rpartition(b":")
        if not colon:
            return None
        try:
            address = ipaddress.IPv4Address(name.decode("ascii"))
            host = str(address)
        except (ValueError, UnicodeDecodeError):
            address = None
            found = valid_host_name(name.decode("latin-1"))
            if found is None:
                return None
            host = found
    if not _PORT.fullmatch(port_text) or not 0 < int(port_text) <= 0xFFFF:
        return None
    return Target(host, int(port_text), address)
