"""Address parsing: every example from the seed document and reference.md."""

from __future__ import annotations

import pytest

from pf_proxy.endpoints import (
    AddressError,
    IpAddress,
    VsockAddress,
    parse_cid,
    parse_ip_address,
    parse_vsock_address,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("88:4000", VsockAddress(88, 4000)),
        ("3:1200", VsockAddress(3, 1200)),
        ("88:5000", VsockAddress(88, 5000)),
        ("3:5000", VsockAddress(3, 5000)),
        ("0:0", VsockAddress(0, 0)),
        ("4294967295:4294967295", VsockAddress(0xFFFFFFFF, 0xFFFFFFFF)),
    ],
)
def test_valid_vsock_addresses(text: str, expected: VsockAddress) -> None:
    assert parse_vsock_address(text) == expected
    assert str(parse_vsock_address(text)) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("88-4000", "invalid vsock address, should contain one colon"),
        ("88/4000", "invalid vsock address, should contain one colon"),
        ("88", "invalid vsock address, should contain one colon"),
        ("", "invalid vsock address, should contain one colon"),
        (":4000", "failed to parse cid as a u32"),
        ("localhost:4000", "failed to parse cid as a u32"),
        ("-1:4000", "failed to parse cid as a u32"),
        ("4294967296:4000", "failed to parse cid as a u32"),
        ("88:4000:1", "failed to parse port as a u32"),
        ("88:", "failed to parse port as a u32"),
        ("88:4294967296", "failed to parse port as a u32"),
        ("88: 4000", "failed to parse port as a u32"),
        ("88:+4000", "failed to parse port as a u32"),
    ],
)
def test_invalid_vsock_addresses(text: str, message: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_vsock_address(text)
    assert str(info.value) == message


def test_bare_cid() -> None:
    assert parse_cid("88") == 88
    with pytest.raises(AddressError, match="failed to parse cid as a u32"):
        parse_cid("88:1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", IpAddress("127.0.0.1", 8080)),
        ("0.0.0.0:3000", IpAddress("0.0.0.0", 3000)),
        ("192.168.1.10:9000", IpAddress("192.168.1.10", 9000)),
        ("[::1]:8080", IpAddress("::1", 8080)),
        ("[fe80::1%eth0]:8080", IpAddress("fe80::1%eth0", 8080)),
        ("[::]:65535", IpAddress("::", 65535)),
    ],
)
def test_valid_listen_addresses(text: str, expected: IpAddress) -> None:
    assert parse_ip_address(text) == expected
    assert str(parse_ip_address(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "0.0.0.0",
        "8080",
        "localhost:8080",
        "127.0.0.1:",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "256.0.0.1:80",
        "::1:8080",
        "[::1]",
        "[::1]8080",
        "[1.2.3.4]:80",
        "[zz::1]:80",
        ":80",
    ],
)
def test_invalid_listen_addresses(text: str) -> None:
    with pytest.raises(AddressError):
        parse_ip_address(text)


# Dotted numbers that are not IPv4: out-of-range parts, five parts, and the legacy inet_aton
# forms (127.1, one number, octal, hex) a resolver would read as some other address.
NOT_IPV4 = [
    "300.1.1.1",
    "1.2.3.4.5",
    "127.1",
    "127.0.1",
    "2130706433",
    "017.0.0.1",
    "0x7f.1",
    "1.0x7f",
    "0x7f000001",
    "1.2.3.4.",
    "256.256.256.256",
]


@pytest.mark.parametrize("host", NOT_IPV4)
@pytest.mark.parametrize("allow_host_name", [False, True])
def test_dotted_numbers_that_are_not_ipv4(host: str, allow_host_name: bool) -> None:
    """Rejected as listeners and as upstream targets alike, with the same message: a name
    whose last label is all digits is not a host name (RFC 3696 section 2)."""
    with pytest.raises(AddressError) as info:
        parse_ip_address(f"{host}:80", allow_host_name=allow_host_name)
    assert str(info.value) == f"invalid IPv4 address {host!r}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("logs.company.com:514", IpAddress("logs.company.com", 514)),
        ("logs.example.com:514", IpAddress("logs.example.com", 514)),
        ("localhost:8080", IpAddress("localhost", 8080)),
        ("127.0.0.1:8080", IpAddress("127.0.0.1", 8080)),
        # digits are fine anywhere but in a whole last label
        ("a1.b2:80", IpAddress("a1.b2", 80)),
        ("1a.com:80", IpAddress("1a.com", 80)),
        ("123.example.com:80", IpAddress("123.example.com", 80)),
        ("10.0.0.1.nip.io:80", IpAddress("10.0.0.1.nip.io", 80)),
        ("host-1.a2b:80", IpAddress("host-1.a2b", 80)),
        ("0x1.com:80", IpAddress("0x1.com", 80)),
        ("deadbeef:80", IpAddress("deadbeef", 80)),
        ("example.com.:80", IpAddress("example.com.", 80)),
    ],
)
def test_upstream_accepts_host_names(text: str, expected: IpAddress) -> None:
    assert parse_ip_address(text, allow_host_name=True) == expected


@pytest.mark.parametrize("text", ["bad_name:80", "-x.com:80", "a..b:80", "host:", "host"])
def test_upstream_rejects_malformed_host_names(text: str) -> None:
    with pytest.raises(AddressError):
        parse_ip_address(text, allow_host_name=True)


@pytest.mark.parametrize("host", ["example.123", "a.b.7", "localhost.0", "42"])
def test_upstream_rejects_an_all_digit_last_label(host: str) -> None:
    with pytest.raises(AddressError, match=f"^invalid IPv4 address '{host}'$"):
        parse_ip_address(f"{host}:80", allow_host_name=True)


def test_literal_detection() -> None:
    assert IpAddress("fe80::1%eth0", 1).is_literal
    assert IpAddress("10.0.0.1", 1).is_literal
    assert not IpAddress("localhost", 1).is_literal
