"""explicit: HTTP CONNECT and SOCKS5 requests in, answers out (no sockets).

SOCKS5 bytes are written out by hand from RFC 1928 here, not with the code under test.
"""

from __future__ import annotations

import ipaddress
import sys
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pf_proxy.tcp import explicit
from pf_proxy.tcp.explicit import (
    HTTP,
    MAX_REQUEST_BYTES,
    SOCKS5,
    Continue,
    Outcome,
    Refusal,
    Request,
    RequestReader,
    Step,
    Target,
    answer,
)

NO_AUTH = b"\x05\x01\x00"  # VER 5, one method: 0x00 (no authentication)
CHOSEN = b"\x05\x00"  # the proxy chose 0x00


def socks_connect(kind: int, address: bytes, port: int, command: int = 1) -> bytes:
    return bytes([5, command, 0, kind]) + address + port.to_bytes(2, "big")


def socks_domain(name: bytes, port: int) -> bytes:
    return socks_connect(3, bytes([len(name)]) + name, port)


def reply(code: int) -> bytes:
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


def feed_all(data: bytes, sizes: list[int] | None = None) -> tuple[Step, bytes]:
    """Feed `data` in pieces of `sizes` (then the rest; default: all at once); the final
    step and everything the reader asked to send on the way (Continue.send)."""
    reader = RequestReader()
    sent = b""
    at = 0
    step: Step = reader.feed(b"")
    for size in [*(sizes or []), len(data)]:
        if not isinstance(step, Continue):
            break
        sent += step.send
        chunk = data[at : at + size]
        at += len(chunk)
        step = reader.feed(chunk)
    if isinstance(step, Continue):
        sent += step.send
    return step, sent


# --- HTTP CONNECT ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "target"),
    [
        (b"CONNECT api.example.org:443 HTTP/1.1\r\nHost: api.example.org:443\r\n\r\n",
         Target("api.example.org", 443)),
        (b"CONNECT API.Example.ORG.:8443 HTTP/1.0\r\n\r\n", Target("api.example.org", 8443)),
        (b"CONNECT 192.0.2.1:22 HTTP/1.1\r\n\r\n",
         Target("192.0.2.1", 22, ipaddress.ip_address("192.0.2.1"))),
        (b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n",
         Target("2001:db8::1", 443, ipaddress.ip_address("2001:db8::1"))),
        (b"CONNECT [::ffff:169.254.169.254]:80 HTTP/1.1\r\n\r\n",
         Target("::ffff:a9fe:a9fe", 80, ipaddress.ip_address("::ffff:169.254.169.254"))),
        (b"CONNECT localhost:1 HTTP/1.1\r\nUser-Agent: curl/7.88.1\r\n"
         b"Proxy-Connection: Keep-Alive\r\nProxy-Authorization: Basic eDp5\r\n\r\n",
         Target("localhost", 1)),
    ],
)  # fmt: skip
def test_connect_requests(head: bytes, target: Target) -> None:
    step, sent = feed_all(head + b"\x16\x03\x01early")
    assert step == Request(HTTP, target, rest=b"\x16\x03\x01early")
    assert sent == b""


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"CONNECT api.example.org HTTP/1.1\r\n\r\n", "is not host:port"),
        (b"CONNECT api.example.org:0 HTTP/1.1\r\n\r\n", "is not host:port"),
        (b"CONNECT api.example.org:65536 HTTP/1.1\r\n\r\n", "is not host:port"),
        (b"CONNECT api.example.org:+443 HTTP/1.1\r\n\r\n", "is not host:port"),
        (b"CONNECT [::1] HTTP/1.1\r\n\r\n", "is not host:port"),
        (b"CONNECT ::1:443 HTTP/1.1\r\n\r\n", "is not host:port"),
        (b"CONNECT [fe80::1%25eth0]:443 HTTP/1.1\r\n\r\n", "is not host:port"),
        (b"CONNECT a..b:443 HTTP/1.1\r\n\r\n", "is not host:port"),
        (b"CONNECT -a.example:443 HTTP/1.1\r\n\r\n", "is not host:port"),
        (b"CONNECT 1.2.3.4.5:443 HTTP/1.1\r\n\r\n", "is not host:port"),
        (b"CONNECT http://a.example:443 HTTP/1.1\r\n\r\n", "is not host:port"),
        (b"CONNECT a.example:443 HTTP/2.0\r\n\r\n", "not an HTTP/1.x request line"),
        (b"CONNECT  a.example:443 HTTP/1.1\r\n\r\n", "not an HTTP/1.x request line"),
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost a\r\n\r\n", "a malformed header line"),
        (b"CONNECT a.example:443 HTTP/1.1\r\n folded\r\n\r\n", "a malformed header line"),
        (b"CONNECT a.example:443 HTTP/1.1\nHost: a\r\n\r\n", "a bare CR or LF"),
        (b"CONNECT a.example:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
         "a CONNECT request with content"),
        (b"CONNECT a.example:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
         "a CONNECT request with content"),
        (b"CONNECT a.example:443 HTTP/1.1\r\nX: \x00\r\n\r\n", "a control character"),
        (b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", "GET / is not a proxy request"),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", "OPTIONS * is not a proxy request"),
        (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ / HTTP/1.1\r\n\r\n", "neither HTTP nor SOCKS5"),
        (b"GE\x00T / HTTP/1.1\r\n\r\n", "neither HTTP nor SOCKS5"),
    ],
)  # fmt: skip
def test_malformed_http_requests_get_400(head: bytes, reason: str) -> None:
    step, _ = feed_all(head)
    assert isinstance(step, Refusal), step
    assert reason in step.reason
    assert not step.unsupported
    assert step.answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert step.answer.endswith(b"\r\n\r\n" + step.reason.encode() + b"\n")


@pytest.mark.parametrize("method", [b"GET", b"POST", b"HEAD", b"PUT"])
def test_a_plain_http_forward_request_gets_501_saying_what_to_use(method: bytes) -> None:
    request = method + b" http://api.example.org/x HTTP/1.1\r\nHost: api.example.org\r\n\r\n"
    step, _ = feed_all(request)
    assert isinstance(step, Refusal) and step.unsupported
    assert step.reason == (
        f"plain-HTTP forward request {method.decode()} http://api.example.org/x is not served "
        "(only CONNECT tunnels)"
    )
    status, _, body = step.answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 501 Not Implemented\r\n")
    assert f"Content-Length: {len(body)}".encode() in status
    assert b"Connection: close" in status
    assert b"socks5h://" in body and b"--proxytunnel" in body


def test_binary_junk_is_refused_at_its_first_byte_without_an_answer() -> None:
    for junk in (b"\x00", b"\x16\x03\x01\x02\x00", b"\xff\xfe", b"\x04\x01\x00\x50"):
        step, _ = feed_all(junk)
        assert isinstance(step, Refusal), junk
        assert step.answer == b""
        assert step.reason == f"neither HTTP nor SOCKS5 (first byte 0x{junk[0]:02x})"


def test_an_over_long_request_line_gets_414() -> None:
    reader = RequestReader()
    step: Step = Continue()
    sent = 0
    while isinstance(step, Continue):
        chunk = (b"CONNECT " + b"a" * MAX_REQUEST_BYTES)[sent : sent + min(1000, reader.room)]
        sent += len(chunk)
        step = reader.feed(chunk)
    assert isinstance(step, Refusal)
    assert step.reason == f"request line longer than {MAX_REQUEST_BYTES} bytes"
    assert step.answer.startswith(b"HTTP/1.1 414 URI Too Long\r\n")
    assert len(reader.data) == MAX_REQUEST_BYTES  # fed only what `room` asked for


def test_an_over_long_head_gets_431() -> None:
    head = b"CONNECT a.example:443 HTTP/1.1\r\n" + b"X-A: b\r\n" * 3000
    reader = RequestReader()
    step: Step = Continue()
    at = 0
    while isinstance(step, Continue):
        chunk = head[at : at + reader.room]
        at += len(chunk)
        step = reader.feed(chunk)
    assert isinstance(step, Refusal)
    assert step.reason == f"request head longer than {MAX_REQUEST_BYTES} bytes"
    assert step.answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_a_head_that_ends_early_or_too_late() -> None:
    reader = RequestReader()
    assert reader.feed(b"CONNECT a.example:443 HTTP/1.1\r\n") == Continue()
    assert reader.end() == Refusal("the stream ended after 32 bytes, inside the request", b"")
    late = reader.timed_out(10)
    assert late.reason == "no complete request within 10 s (32 bytes received)"
    assert late.answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


# --- SOCKS5 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "target"),
    [
        (socks_domain(b"api.example.org", 443), Target("api.example.org", 443)),
        (socks_domain(b"API.example.org.", 443), Target("api.example.org", 443)),
        (socks_connect(1, bytes([192, 0, 2, 1]), 80),
         Target("192.0.2.1", 80, ipaddress.ip_address("192.0.2.1"))),
        (socks_connect(4, ipaddress.IPv6Address("2001:db8::1").packed, 443),
         Target("2001:db8::1", 443, ipaddress.ip_address("2001:db8::1"))),
        # an address written as a domain is that address (some clients do this)
        (socks_domain(b"169.254.169.254", 80),
         Target("169.254.169.254", 80, ipaddress.ip_address("169.254.169.254"))),
        (socks_domain(b"::1", 22), Target("::1", 22, ipaddress.ip_address("::1"))),
    ],
)  # fmt: skip
def test_socks5_connect(request_bytes: bytes, target: Target) -> None:
    reader = RequestReader()
    assert reader.feed(NO_AUTH) == Continue(CHOSEN)
    assert reader.feed(request_bytes + b"early") == Request(SOCKS5, target, rest=b"early")


def test_a_socks5_greeting_and_request_in_one_piece_still_get_the_method_reply_first() -> None:
    step, sent = feed_all(b"\x05\x02\x02\x00" + socks_domain(b"a.example", 443))
    assert sent == b""
    assert step == Request(SOCKS5, Target("a.example", 443), send_first=CHOSEN)
    # ... and a refused request the same way
    step, _ = feed_all(NO_AUTH + socks_connect(1, bytes(4), 80, command=2))
    assert isinstance(step, Refusal)
    assert step.answer == CHOSEN + reply(0x07)


@pytest.mark.parametrize(
    ("greeting", "reason"),
    [
        (b"\x05\x01\x02", "offered: username/password"),
        (b"\x05\x02\x01\x02", "offered: GSSAPI, username/password"),
        (b"\x05\x01\x80", "offered: 0x80"),
    ],
)
def test_socks5_without_the_no_authentication_method_gets_0xff(
    greeting: bytes, reason: str
) -> None:
    step, _ = feed_all(greeting)
    assert isinstance(step, Refusal) and step.unsupported
    assert step.answer == b"\x05\xff"
    assert reason in step.reason and "only 'none', no authentication, is served" in step.reason


@pytest.mark.parametrize(
    ("request_bytes", "code", "reason", "unsupported"),
    [
        (socks_connect(1, bytes(4), 80, command=2), 0x07, "command BIND is not supported", True),
        (socks_connect(1, bytes(4), 53, command=3), 0x07, "UDP ASSOCIATE is not supported", True),
        (socks_connect(1, bytes(4), 53, command=9), 0x07, "command 0x09 is not supported", True),
        (bytes([5, 1, 0, 2, 0]), 0x08, "address type 0x02 is not supported", True),
        (bytes([4, 1, 0, 1]) + bytes(6), 0x01, "malformed SOCKS5 request (version 4", False),
        (bytes([5, 1, 7, 1]) + bytes(6), 0x01, "reserved byte 7", False),
        (socks_domain(b"", 443), 0x01, "domain '' is not a host name", False),
        (socks_domain(b"a b.example", 443), 0x01, "is not a host name", False),
        (socks_domain(b"b\xfccher.example", 443), 0x01, "is not a host name", False),
        (socks_domain(b"fe80::1%eth0", 443), 0x01, "is not a host name", False),
        (socks_domain(b"a.example", 0), 0x01, "port 0 of a.example", False),
    ],
)
def test_socks5_requests_refused_with_their_reply_code(
    request_bytes: bytes, code: int, reason: str, unsupported: bool
) -> None:
    reader = RequestReader()
    assert reader.feed(NO_AUTH) == Continue(CHOSEN)
    step = reader.feed(request_bytes)
    assert isinstance(step, Refusal), step
    assert reason in step.reason
    assert step.answer == reply(code)
    assert step.unsupported == unsupported


def test_socks5_greeting_with_no_methods() -> None:
    step, _ = feed_all(b"\x05\x00")
    assert isinstance(step, Refusal) and step.answer == b"\x05\xff"


def test_a_socks5_request_that_stops_short() -> None:
    reader = RequestReader()
    reader.feed(NO_AUTH)
    assert reader.feed(socks_domain(b"a.example", 443)[:-1]) == Continue()
    assert reader.timed_out(5).answer == reply(0x01)
    assert RequestReader().timed_out(5).answer.startswith(b"HTTP/1.1 408")
    greeting_only = RequestReader()
    greeting_only.feed(b"\x05\x02")
    assert greeting_only.timed_out(5).answer == b""  # no method chosen yet: nothing to say


# --- however the bytes are cut --------------------------------------------------------------

WHOLE_REQUESTS = [
    b"CONNECT api.example.org:443 HTTP/1.1\r\nHost: api.example.org:443\r\n\r\n\x16\x03\x01",
    b"CONNECT [2001:db8::1]:443 HTTP/1.0\r\n\r\n",
    NO_AUTH + socks_domain(b"api.example.org", 443) + b"early",
    b"\x05\x03\x00\x01\x02" + socks_connect(4, bytes(15) + b"\x01", 8080),
    b"GET http://a.example/ HTTP/1.1\r\n\r\n",
    NO_AUTH + socks_connect(1, bytes(4), 1, command=3),
    b"CONNECT a.example:443 HTTP/1.1\r\nX: \x01\r\n\r\n",
]


@settings(max_examples=300)
@given(st.sampled_from(WHOLE_REQUESTS), st.lists(st.integers(1, 30), max_size=60))
def test_any_cut_gives_the_same_answer(data: bytes, sizes: list[int]) -> None:
    """Fed in pieces, a request gives what it gives fed whole (the tunnel's first bytes that
    came with it: those of the piece that completed it; the rest stay to be read), and the
    SOCKS5 method reply is asked for exactly once, before the answer."""
    whole, whole_sent = feed_all(data)
    cut, cut_sent = feed_all(data, sizes)
    assert type(cut) is type(whole)
    if isinstance(cut, Request) and isinstance(whole, Request):
        assert (cut.protocol, cut.target) == (whole.protocol, whole.target)
        assert whole.rest.startswith(cut.rest)
        assert cut_sent + cut.send_first == whole_sent + whole.send_first
    elif isinstance(cut, Refusal) and isinstance(whole, Refusal):
        assert (cut.reason, cut.unsupported) == (whole.reason, whole.unsupported)
        assert cut_sent + cut.answer == whole_sent + whole.answer


@given(st.binary(max_size=600), st.lists(st.integers(1, 50), max_size=20))
def test_arbitrary_bytes_never_raise(data: bytes, sizes: list[int]) -> None:
    step, _ = feed_all(data, sizes)
    assert isinstance(step, Continue | Request | Refusal)


@given(st.binary(min_size=1, max_size=200))
def test_arbitrary_bytes_after_a_socks5_greeting_never_raise(data: bytes) -> None:
    step, _ = feed_all(NO_AUTH + data)
    assert isinstance(step, Continue | Request | Refusal)


def test_a_head_fed_a_byte_at_a_time_costs_linear_work() -> None:
    """The bytes handed to the module's functions (the sum of their bytes-like arguments'
    lengths), for a 14 KiB head fed one byte per feed: a bounded number per byte."""
    head = (
        b"CONNECT api.example.org:443 HTTP/1.1\r\n"
        + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 100) for i in range(120))
        + b"\r\n"
    )
    assert len(head) < MAX_REQUEST_BYTES
    handed = 0

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal handed
        code = frame.f_code
        if event == "call" and code.co_filename == explicit.__file__:
            for name in code.co_varnames[: code.co_argcount]:
                value = frame.f_locals.get(name)
                if isinstance(value, bytes | bytearray | memoryview):
                    handed += len(value)

    reader = RequestReader()
    sys.setprofile(profile)
    try:
        steps = [reader.feed(head[i : i + 1]) for i in range(len(head))]
    finally:
        sys.setprofile(None)
    assert steps[-1] == Request(HTTP, Target("api.example.org", 443))
    assert handed <= 4 * len(head), (handed, len(head))


# --- answers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "status", "code"),
    [
        (Outcome.DENIED, b"403 Forbidden", 0x02),
        (Outcome.UNRESOLVED, b"502 Bad Gateway", 0x04),
        (Outcome.NETWORK_UNREACHABLE, b"502 Bad Gateway", 0x03),
        (Outcome.HOST_UNREACHABLE, b"502 Bad Gateway", 0x04),
        (Outcome.REFUSED, b"502 Bad Gateway", 0x05),
        (Outcome.TIMED_OUT, b"504 Gateway Timeout", 0x06),
        (Outcome.FAILED, b"502 Bad Gateway", 0x01),
    ],
)
def test_failure_answers(outcome: Outcome, status: bytes, code: int) -> None:
    text = answer(HTTP, outcome, "why it failed")
    assert text == (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n"
        b"Connection: close\r\n\r\nwhy it failed\n"
    )
    assert answer(SOCKS5, outcome, "why it failed") == reply(code)


def test_success_answers() -> None:
    assert answer(HTTP, Outcome.CONNECTED) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    bound4 = (ipaddress.ip_address("11.22.40.1"), 40000)
    assert answer(SOCKS5, Outcome.CONNECTED, bound=bound4) == (
        bytes([5, 0, 0, 1, 11, 22, 40, 1]) + (40000).to_bytes(2, "big")
    )
    bound6 = (ipaddress.ip_address("2001:db8::2"), 443)
    assert answer(SOCKS5, Outcome.CONNECTED, bound=bound6) == (
        bytes([5, 0, 0, 4]) + ipaddress.IPv6Address("2001:db8::2").packed + b"\x01\xbb"
    )


def test_target_text() -> None:
    assert str(Target("a.example", 443)) == "a.example:443"
    assert str(Target("2001:db8::1", 443, ipaddress.ip_address("2001:db8::1"))) == (
        "[2001:db8::1]:443"
    )
