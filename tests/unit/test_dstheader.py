"""The destination header codec: exact bytes, round trips, bad input."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pf_proxy.tcp.dstheader import (
    Destination,
    HeaderError,
    decode_destination,
    encode_destination,
    header_size,
)


def dest(address: str, port: int) -> Destination:
    return Destination(ipaddress.ip_address(address), port)


def test_ipv4_exact_bytes_from_reference() -> None:
    assert encode_destination(dest("1.2.3.4", 80)) == bytes.fromhex("04 04030201 5000")


def test_ipv6_exact_bytes() -> None:
    encoded = encode_destination(dest("2001:db8::1", 443))
    assert len(encoded) == 19
    assert encoded[0] == 6
    assert encoded[1:17] == ipaddress.IPv6Address("2001:db8::1").packed[::-1]
    assert encoded[17:] == bytes([0xBB, 0x01])


def test_sizes() -> None:
    assert header_size(4) == 7
    assert header_size(6) == 19


@given(st.ip_addresses(), st.integers(0, 0xFFFF))
def test_round_trip(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    destination = Destination(address, port)
    encoded = encode_destination(destination)
    assert len(encoded) == (7 if address.version == 4 else 19)
    assert decode_destination(encoded) == destination


@pytest.mark.parametrize("marker", [0, 1, 5, 7, 0x34, 255])
def test_unknown_marker(marker: int) -> None:
    with pytest.raises(HeaderError, match=f"invalid IP version marker {marker}"):
        header_size(marker)
    with pytest.raises(HeaderError, match=f"invalid IP version marker {marker}"):
        decode_destination(bytes([marker]) + b"\0" * 6)


@pytest.mark.parametrize("cut", range(7))
def test_truncated_ipv4(cut: int) -> None:
    with pytest.raises(HeaderError):
        decode_destination(encode_destination(dest("1.2.3.4", 80))[:cut])


def test_truncated_ipv6_and_overlong() -> None:
    encoded = encode_destination(dest("::1", 1))
    with pytest.raises(HeaderError, match="is 19 bytes, got 18"):
        decode_destination(encoded[:18])
    with pytest.raises(HeaderError, match="is 19 bytes, got 20"):
        decode_destination(encoded + b"x")


def test_port_out_of_range() -> None:
    with pytest.raises(HeaderError):
        encode_destination(dest("1.2.3.4", 70000))


@given(st.binary(max_size=40))
def test_arbitrary_bytes_raise_only_header_error(data: bytes) -> None:
    try:
        decoded = decode_destination(data)
    except HeaderError:
        return
    assert encode_destination(decoded) == data


def test_str_forms() -> None:
    assert str(dest("1.2.3.4", 80)) == "1.2.3.4:80"
    assert str(dest("::1", 80)) == "[::1]:80"
