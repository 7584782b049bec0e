"""Packet policies: reserved ranges at their edges, the port rules at theirs, drops by reason."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pf_proxy.raw.policy import (
    ALLOWED_SOURCE_PORTS,
    RESERVED_NETWORKS,
    Drop,
    DropCounters,
    IncomingPolicy,
    OutgoingPolicy,
    is_allowed_source_port,
    is_reserved,
)

HOST = IPv4Address("54.1.2.3")  # the shared address X (interface and enclave)
INTERNET = IPv4Address("93.184.216.34")


def packet(
    source: IPv4Address = HOST,
    destination: IPv4Address = INTERNET,
    protocol: int = 6,
    source_port: int = 443,
    options: bytes = b"",
    fragment: int = 0,
    payload: bytes = b"hello",
) -> bytes:
    """An IPv4 packet with a TCP header (or, for other protocols, the same 20 bytes)."""
    assert len(options) % 4 == 0
    transport = struct.pack("!HHIIBBHHH", source_port, 8080, 1, 0, 0x50, 0x18, 65535, 0, 0)
    total = 20 + len(options) + len(transport) + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | (5 + len(options) // 4),
        0,
        total,
        0x1234,
        fragment,
        64,
        protocol,
        0,
        source.packed,
        destination.packed,
    )
    return header + options + transport + payload


outgoing = OutgoingPolicy(HOST)
incoming = IncomingPolicy(HOST)

# The list in reference.md, copied by hand: the table must be exactly this.
REFERENCE_RESERVED = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "233.252.0.0/24",
    "240.0.0.0/4",
    "255.255.255.255/32",
]

# Neighbours of a range's ends that another range covers (worked out by hand).
NEIGHBOURS_ALSO_RESERVED = {
    "233.251.255.255",  # 224.0.0.0/4 around 233.252.0.0/24
    "233.252.1.0",
    "239.255.255.255",  # 224.0.0.0/4 before 240.0.0.0/4
    "240.0.0.0",  # 240.0.0.0/4 after 224.0.0.0/4
    "255.255.255.254",  # 240.0.0.0/4 before 255.255.255.255/32
}


def test_reserved_table_is_the_reference_list() -> None:
    assert [str(n) for n in RESERVED_NETWORKS] == REFERENCE_RESERVED


def edges() -> list[tuple[str, bool]]:
    cases = []
    for network in map(IPv4Network, REFERENCE_RESERVED):
        first, last = int(network.network_address), int(network.broadcast_address)
        cases += [(str(IPv4Address(first)), True), (str(IPv4Address(last)), True)]
        for outside in (first - 1, last + 1):
            if 0 <= outside <= 0xFFFFFFFF:
                address = str(IPv4Address(outside))
                cases.append((address, address in NEIGHBOURS_ALSO_RESERVED))
    return cases


@pytest.mark.parametrize(("address", "reserved"), edges())
def test_each_reserved_range_at_its_edges(address: str, reserved: bool) -> None:
    assert is_reserved(IPv4Address(address)) is reserved
    assert is_reserved(int(IPv4Address(address))) is reserved
    expected = Drop.RESERVED_DESTINATION if reserved else None
    assert outgoing.check(packet(destination=IPv4Address(address))) == expected


def test_edge_cases_cover_every_range() -> None:
    # 0.0.0.0 has no predecessor; 240.0.0.0/4 and 255.255.255.255/32 both end at the top.
    assert len(edges()) == 17 * 4 - 3


@settings(max_examples=2000)
@given(st.integers(0, 0xFFFFFFFF))
def test_is_reserved_agrees_with_ipaddress(value: int) -> None:
    address = IPv4Address(value)
    assert is_reserved(value) is any(address in network for network in RESERVED_NETWORKS)


@pytest.mark.parametrize(
    ("port", "allowed"),
    [
        (0, False),
        (79, False),
        (80, True),
        (81, False),
        (442, False),
        (443, True),
        (444, False),
        (1023, False),
        (1024, True),
        (30000, True),
        (61439, True),
        (61440, False),
        (65535, False),
    ],
)
def test_source_port_rules_at_their_edges(port: int, allowed: bool) -> None:
    assert is_allowed_source_port(port) is allowed
    assert any(port in ports for ports in ALLOWED_SOURCE_PORTS) is allowed
    assert outgoing.check(packet(source_port=port)) == (
        None if allowed else Drop.FORBIDDEN_SOURCE_PORT
    )


def test_source_port_is_read_after_ip_options() -> None:
    # The 4 option bytes would read as port 61440 if the options were not skipped.
    options = struct.pack("!HH", 61440, 0)
    assert outgoing.check(packet(source_port=443, options=options)) is None
    assert (
        outgoing.check(packet(source_port=61440, options=b"\x01" * 4)) == Drop.FORBIDDEN_SOURCE_PORT
    )


def test_source_must_be_the_interface_address() -> None:
    assert outgoing.check(packet(source=IPv4Address("54.1.2.4"))) == Drop.WRONG_SOURCE
    assert outgoing.check(packet(source=IPv4Address("10.0.0.1"))) == Drop.WRONG_SOURCE


@pytest.mark.parametrize("protocol", [0, 1, 17, 41, 47, 50, 132, 255])
def test_outgoing_non_tcp_is_dropped(protocol: int) -> None:
    assert outgoing.check(packet(protocol=protocol, source_port=443)) == Drop.NOT_TCP


def test_incoming_does_not_look_at_the_protocol() -> None:
    assert incoming.check(packet(source=INTERNET, destination=HOST, protocol=17)) is None


def test_outgoing_fragments() -> None:
    more_fragments = 0x2000
    assert outgoing.check(packet(fragment=more_fragments)) is None  # first fragment: has ports
    assert outgoing.check(packet(fragment=1)) == Drop.FRAGMENT
    assert outgoing.check(packet(fragment=more_fragments | 0x1FFF)) == Drop.FRAGMENT
    assert outgoing.check(packet(fragment=0x4000)) is None  # don't-fragment bit


@pytest.mark.parametrize("length", range(20))
def test_shorter_than_an_ip_header_is_truncated(length: int) -> None:
    for policy in (incoming, outgoing):
        assert policy.check(packet(destination=HOST)[:length]) == Drop.TRUNCATED


def test_header_length_past_the_packet_is_truncated() -> None:
    whole = packet(options=b"\x01" * 40)  # IHL 15: 60-byte header
    assert outgoing.check(whole) is None
    assert outgoing.check(whole[:59]) == Drop.TRUNCATED
    assert incoming.check(packet(destination=HOST, options=b"\x01" * 40)[:59]) == Drop.TRUNCATED


def test_header_length_under_five_is_truncated() -> None:
    bad = bytearray(packet(destination=HOST))
    bad[0] = 0x44
    assert incoming.check(bad) == Drop.TRUNCATED
    assert outgoing.check(bad) == Drop.TRUNCATED


@pytest.mark.parametrize("length", range(20, 40))
def test_missing_tcp_header_is_truncated(length: int) -> None:
    assert outgoing.check(packet()[:length]) == Drop.TRUNCATED


def test_tcp_header_without_payload_passes() -> None:
    assert outgoing.check(packet(payload=b"")) is None


def test_incoming_destination_must_be_the_enclave() -> None:
    assert incoming.check(packet(source=INTERNET, destination=HOST)) is None
    assert incoming.check(packet(source=INTERNET, destination=IPv4Address("54.1.2.4"))) == (
        Drop.WRONG_DESTINATION
    )
    assert incoming.check(packet(source=HOST, destination=INTERNET)) == Drop.WRONG_DESTINATION


def test_checks_take_memoryviews_and_bytearrays() -> None:
    good_out, good_in = packet(), packet(source=INTERNET, destination=HOST)
    for convert in (bytearray, memoryview):
        assert outgoing.check(convert(good_out)) is None
        assert incoming.check(convert(good_in)) is None
        assert outgoing.check(convert(packet(source_port=22))) == Drop.FORBIDDEN_SOURCE_PORT
        assert incoming.check(convert(good_out)) == Drop.WRONG_DESTINATION


@settings(max_examples=1000)
@given(st.binary(max_size=80))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    assert outgoing.check(data) in {*Drop, None}
    assert incoming.check(data) in {*Drop, None}


@settings(max_examples=500)
@given(
    source_port=st.integers(0, 0xFFFF),
    destination=st.integers(0, 0xFFFFFFFF).map(IPv4Address),
    protocol=st.integers(0, 255),
)
def test_outgoing_passes_exactly_what_the_rules_allow(
    source_port: int, destination: IPv4Address, protocol: int
) -> None:
    allowed = (
        protocol == 6
        and not is_reserved(destination)
        and (source_port in (80, 443) or 1024 <= source_port <= 61439)
    )
    verdict = outgoing.check(
        packet(destination=destination, protocol=protocol, source_port=source_port)
    )
    assert (verdict is None) is allowed


def test_drop_counters() -> None:
    counters = DropCounters()
    assert counters.format() == "dropped 0 packets"
    assert counters.total == 0
    counters.add(Drop.WRONG_SOURCE)
    assert counters.format() == "dropped 1 packet (wrong-source=1)"
    counters.add(Drop.WRONG_SOURCE)
    counters.add(Drop.NOT_TCP)
    counters.add("send-failed", 4)
    assert counters.total == 7
    assert counters[Drop.WRONG_SOURCE] == 2
    assert counters["wrong-source"] == 2
    assert counters[Drop.FRAGMENT] == 0
    assert counters.format() == "dropped 7 packets (not-tcp=1, send-failed=4, wrong-source=2)"
    assert list(counters.items()) == [("not-tcp", 1), ("send-failed", 4), ("wrong-source", 2)]
