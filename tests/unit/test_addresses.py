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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("logs.company.com:514", IpAddress("logs.company.com", 514)),
        ("localhost:8080", IpAddress("localhost", 8080)),
        ("127.0.0.1:8080", IpAddress("127.0.0.1", 8080)),
    ],
)
def test_upstream_accepts_host_names(text: str, expected: IpAddress) -> None:
    assert parse_ip_address(text, allow_host_name=True) == expected


@pytest.mark.parametrize("text", ["bad_name:80", "-x.com:80", "a..b:80", "host:", "host"])
def test_upstream_rejects_malformed_host_names(text: str) -> None:
    with pytest.raises(AddressError):
        parse_ip_address(text, allow_host_name=True)


def test_literal_detection() -> None:
    assert IpAddress("fe80::1%eth0", 1).is_literal
    assert IpAddress("10.0.0.1", 1).is_literal
    assert not IpAddress("localhost", 1).is_literal
