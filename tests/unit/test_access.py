"""The --allow/--deny access policy of vsock-to-ip-transparent."""

from __future__ import annotations

import asyncio
import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pf_proxy.tcp.access import (
    PRIVATE_NETWORKS,
    AccessPolicy,
    CidrError,
    HostPatternError,
    IpAddress,
    Lookup,
    NetworkRule,
    RequestVerdict,
    ResolveError,
    Verdict,
    embedded_ipv4,
    parse_cidr,
    parse_host_pattern,
    parse_network_rule,
    unmapped_addresses,
)
from pf_proxy.tcp.sniff import Name, NoName


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def policy(allow: list[str] | None = None, deny: list[str] | None = None) -> AccessPolicy:
    return AccessPolicy(
        tuple(map(parse_network_rule, allow or [])), tuple(map(parse_network_rule, deny or []))
    )


def rules(*texts: str) -> tuple[NetworkRule, ...]:
    return tuple(map(parse_network_rule, texts))


# --- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("169.254.169.254", "169.254.169.254/32"),
        ("169.254.169.254/32", "169.254.169.254/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("::1", "::1/128"),
        ("::/0", "::/0"),
        ("fd00:ec2::254/128", "fd00:ec2::254/128"),
        # IPv4-mapped networks are the IPv4 networks they map
        ("::ffff:169.254.0.0/112", "169.254.0.0/16"),
        ("::ffff:0:0/96", "0.0.0.0/0"),
        ("::ffff:10.1.2.3", "10.1.2.3/32"),
    ],
)
def test_parse_cidr(text: str, network: str) -> None:
    assert parse_cidr(text) == ipaddress.ip_network(network)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "does not appear to be an IPv4 or IPv6 network"),
        ("10.0.0.0/33", "does not appear to be an IPv4 or IPv6 network"),
        ("10.0.0.1/8", "has host bits set"),
        ("10.0.0/8", "does not appear to be an IPv4 or IPv6 network"),
        ("localhost", "does not appear to be an IPv4 or IPv6 network"),
        ("2001:db8::1/32", "has host bits set"),
        ("10.0.0.0/-1", "does not appear to be an IPv4 or IPv6 network"),
        ("10.0.0.0/8/8", "does not appear to be an IPv4 or IPv6 network"),
    ],
)
def test_malformed_cidr_is_an_error_saying_why(text: str, reason: str) -> None:
    with pytest.raises(CidrError, match=reason):
        parse_cidr(text)


@pytest.mark.parametrize(
    ("text", "network", "port", "shown"),
    [
        ("10.0.0.0/8", "10.0.0.0/8", None, "10.0.0.0/8"),
        ("10.0.0.0/8:443", "10.0.0.0/8", 443, "10.0.0.0/8:443"),
        ("169.254.169.254:80", "169.254.169.254/32", 80, "169.254.169.254/32:80"),
        (" 10.0.0.0/8:1 ", "10.0.0.0/8", 1, "10.0.0.0/8:1"),
        ("0.0.0.0/0:65535", "0.0.0.0/0", 65535, "0.0.0.0/0:65535"),
        ("[10.0.0.0/8]:22", "10.0.0.0/8", 22, "10.0.0.0/8:22"),
        ("2001:db8::/32", "2001:db8::/32", None, "2001:db8::/32"),
        ("[2001:db8::/32]", "2001:db8::/32", None, "2001:db8::/32"),
        ("[2001:db8::/32]:443", "2001:db8::/32", 443, "[2001:db8::/32]:443"),
        ("[::1]:22", "::1/128", 22, "[::1/128]:22"),
        ("::1:443", "::1:443/128", None, "::1:443/128"),  # an address: IPv6 ports need brackets
        ("[::ffff:169.254.0.0/112]:80", "169.254.0.0/16", 80, "169.254.0.0/16:80"),
    ],
)
def test_parse_network_rule(text: str, network: str, port: int | None, shown: str) -> None:
    rule = parse_network_rule(text)
    assert rule == NetworkRule(ipaddress.ip_network(network), port)
    assert str(rule) == shown
    assert parse_network_rule(shown) == rule


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("10.0.0.0/8:0", "port '0' is not a number from 1 to 65535"),
        ("10.0.0.0/8:65536", "port '65536' is not a number from 1 to 65535"),
        ("10.0.0.0/8:", "port '' is not a number"),
        ("10.0.0.0/8:https", "port 'https' is not a number"),
        ("10.0.0.0/8:+443", "port '+443' is not a number"),
        ("10.0.0.0/8:\u0664\u0664\u0663", "is not a number"),  # Arabic-Indic digits
        ("10.0.0.1/8:443", "has host bits set"),
        ("2001:db8::/32:443", "written in brackets, e.g. [2001:db8::/32]:443"),
        ("[2001:db8::/32", "'[' without ']'"),
        ("[2001:db8::/32]443", "only :PORT may follow it"),
        ("[2001:db8::/32]:", "port '' is not a number"),
        ("[]:443", "does not appear to be an IPv4 or IPv6 network"),
        ("metadata:80", "does not appear to be an IPv4 or IPv6 network"),
    ],
)
def test_malformed_network_rule_is_an_error_saying_why(text: str, reason: str) -> None:
    with pytest.raises(CidrError, match=re.escape(reason)):
        parse_network_rule(text)


@given(st.text(max_size=50))
def test_parse_network_rule_raises_only_cidr_error(text: str) -> None:
    try:
        parse_network_rule(text)
    except CidrError:
        pass


# --- the rules ------------------------------------------------------------------------------


def test_a_rule_with_a_port_applies_to_that_port_only() -> None:
    p = policy(deny=["10.0.0.0/8:22", "[2001:db8::/32]:22"])
    assert not p.permits(ip("10.1.2.3"), 22)
    assert p.permits(ip("10.1.2.3"), 443)
    assert not p.permits(ip("2001:db8::1"), 22)
    assert p.permits(ip("2001:db8::1"), 23)
    assert p.judge_address(ip("::ffff:10.1.2.3"), 22) == Verdict(False, "--deny 10.0.0.0/8:22")
    allow = policy(allow=["10.0.0.0/8:443", "192.0.2.1"])
    assert allow.judge_address(ip("10.1.2.3"), 443) == Verdict(True, "--allow 10.0.0.0/8:443")
    assert allow.judge_address(ip("10.1.2.3"), 80) == Verdict(
        False, "--allow", "the address is allowed on other ports only (10.0.0.0/8:443), not 80"
    )
    assert allow.permits(ip("192.0.2.1"), 80)  # no port: every port
    assert allow.judge_address(ip("11.0.0.1"), 443) == Verdict(
        False, "--allow", "the address is in no --allow network"
    )




def test_no_rules_allow_everything() -> None:
    empty = policy()
    for address in ("169.254.169.254", "127.0.0.1", "::1", "203.0.113.7", "::ffff:10.0.0.1"):
        assert empty.permits(ip(address), 443)


def test_deny_only_denies_its_networks() -> None:
    p = policy(deny=["169.254.0.0/16", "fd00:ec2::254/128"])
    assert not p.permits(ip("169.254.169.254"), 443)
    assert not p.permits(ip("169.254.0.0"), 443)
    assert not p.permits(ip("169.254.255.255"), 443)
    assert not p.permits(ip("fd00:ec2::254"), 443)
    assert p.permits(ip("169.253.255.255"), 443)
    assert p.permits(ip("169.255.0.0"), 443)
    assert p.permits(ip("fd00:ec2::253"), 443)
    assert p.permits(ip("93.184.216.34"), 443)


def test_any_allow_denies_everything_else() -> None:
    p = policy(allow=["10.0.0.0/8"])
    assert p.permits(ip("10.0.0.1"), 443)
    assert p.permits(ip("10.255.255.255"), 443)
    assert not p.permits(ip("11.0.0.0"), 443)
    assert not p.permits(ip("93.184.216.34"), 443)
    assert not p.permits(ip("2001:db8::1"), 443)  # an IPv4 allow says nothing for IPv6: denied


def test_deny_wins_over_allow() -> None:
    p = policy(allow=["0.0.0.0/0", "::/0"], deny=["169.254.0.0/16", "10.1.0.0/16"])
    assert not p.permits(ip("169.254.169.254"), 443)
    assert not p.permits(ip("10.1.2.3"), 443)
    assert p.permits(ip("10.2.0.1"), 443)
    assert p.permits(ip("2001:db8::1"), 443)


def test_deny_wins_regardless_of_order_and_overlap() -> None:
    a = policy(allow=["10.0.0.0/24"], deny=["10.0.0.0/8"])
    b = policy(allow=["10.0.0.0/8"], deny=["10.0.0.5/32"])
    assert not a.permits(ip("10.0.0.1"), 443)
    assert not b.permits(ip("10.0.0.5"), 443)
    assert b.permits(ip("10.0.0.6"), 443)


def test_ipv4_mapped_destination_is_judged_as_ipv4() -> None:
    """::ffff:169.254.169.254 reaches 169.254.169.254: a deny of 169.254.0.0/16 covers it."""
    p = policy(deny=["169.254.0.0/16"])
    assert not p.permits(ip("::ffff:169.254.169.254"), 443)
    assert p.permits(ip("::ffff:93.184.216.34"), 443)
    allow_only = policy(allow=["10.0.0.0/8"])
    assert allow_only.permits(ip("::ffff:10.0.0.1"), 443)
    assert not allow_only.permits(ip("::ffff:11.0.0.1"), 443)


def test_ipv4_mapped_rule_is_judged_as_ipv4() -> None:
    p = policy(deny=["::ffff:169.254.0.0/112"])
    assert not p.permits(ip("169.254.169.254"), 443)
    assert not p.permits(ip("::ffff:169.254.169.254"), 443)
    assert p.permits(ip("169.255.0.1"), 443)


def test_rules_built_directly_are_unmapped_too() -> None:
    p = AccessPolicy(deny=(NetworkRule(ipaddress.IPv6Network("::ffff:169.254.0.0/112")),))
    assert not p.permits(ip("169.254.169.254"), 443)


def test_describe() -> None:
    assert policy().describe() == "everything allowed"
    assert policy(deny=["169.254.0.0/16"]).describe() == (
        "denied: 169.254.0.0/16; everything else allowed"
    )
    assert policy(allow=["10.0.0.0/8", "::1"], deny=["10.0.0.5"]).describe() == (
        "denied: 10.0.0.5/32; allowed: 10.0.0.0/8, ::1/128; everything else denied"
    )


# --- properties -----------------------------------------------------------------------------

ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address).filter(lambda a: not a.ipv4_mapped)
networks = st.one_of(
    st.tuples(ipv4, st.integers(0, 32)).map(
        lambda t: ipaddress.IPv4Network(f"{t[0]}/{t[1]}", strict=False)
    ),
    st.tuples(ipv6, st.integers(0, 128)).map(
        lambda t: ipaddress.IPv6Network(f"{t[0]}/{t[1]}", strict=False)
    ),
)
labels = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
host_names = (
    st.lists(labels, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda name: not name.rsplit(".", 1)[-1].isdigit())
)
network_rules = st.builds(NetworkRule, networks, st.one_of(st.none(), st.sampled_from([22, 443])))
policies = st.builds(
    AccessPolicy,
    st.lists(network_rules, max_size=4).map(tuple),
    st.lists(network_rules, max_size=4).map(tuple),
)
ports = st.sampled_from([22, 80, 443])


def embedded_by_hand(address: IpAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, worked out bit by bit here rather than
    with the code under test (RFC 4291, 2765, 6052, 8215, 3056, 4380)."""
    if address.version == 4:
        return []
    n = int(address)
    raw = n.to_bytes(16, "big")
    low = ipaddress.IPv4Address(n & 0xFFFFFFFF)
    if n >> 32 == 0:  # ::a.b.c.d, but not :: or ::1
        return [low] if n > 1 else []
    if n >> 32 == 0xFFFF0000 or n >> 32 == 0x0064FF9B_00000000_00000000:  # ::ffff:0:x, 64:ff9b::x
        return [low]
    if n >> 80 == 0x0064_FF9B_0001:  # 64:ff9b:1::/48, after a /48, /56, /64 or /96 prefix
        return [
            ipaddress.IPv4Address(raw[6:8] + raw[9:11]),
            ipaddress.IPv4Address(raw[7:8] + raw[9:12]),
            ipaddress.IPv4Address(raw[9:13]),
            ipaddress.IPv4Address(raw[12:16]),
        ]
    if n >> 112 == 0x2002:
        return [ipaddress.IPv4Address(raw[2:6])]
    if n >> 96 == 0x2001_0000:  # Teredo: the server, and the client's inverted bits
        return [ipaddress.IPv4Address(raw[4:8]), ipaddress.IPv4Address(n & 0xFFFFFFFF ^ 0xFFFFFFFF)]
    return []


def _with_embedded(form: str, v4: ipaddress.IPv4Address, noise: int) -> ipaddress.IPv6Address:
    v = int(v4)
    value = {
        "compatible": v,
        "translated": 0xFFFF << 48 | v,
        "nat64": int(ipaddress.IPv6Address("64:ff9b::")) | v,
        "nat64-local": int(ipaddress.IPv6Address("64:ff9b:1::")) | noise % (1 << 80),
        "6to4": 0x2002 << 112 | v << 80 | noise % (1 << 80),
        "teredo": 0x2001_0000 << 96 | noise % (1 << 64) << 32 | (v ^ 0xFFFFFFFF),
    }[form]
    return ipaddress.IPv6Address(value)


FORMS = ["compatible", "translated", "nat64", "nat64-local", "6to4", "teredo"]
embedding = st.builds(_with_embedded, st.sampled_from(FORMS), ipv4, st.integers(0, 2**128 - 1))
any_address = st.one_of(ipv4, ipv6, embedding)


@given(policies, ipv4, ports)
def test_mapped_and_plain_ipv4_are_judged_alike(
    p: AccessPolicy, address: ipaddress.IPv4Address, port: int
) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    assert p.permits(mapped, port) == p.permits(address, port)


@given(policies, any_address, ports)
def test_the_rules(p: AccessPolicy, address: IpAddress, port: int) -> None:
    """Deny covers the address and every IPv4 address it embeds; allow the address only."""
    candidates = [address, *embedded_by_hand(address)]
    denied = any(
        c in rule.network and rule.port in (None, port) for c in candidates for rule in p.deny
    )
    allowed = not p.allow or any(
        address in rule.network and rule.port in (None, port) for rule in p.allow
    )
    assert p.permits(address, port) == (allowed and not denied)


@given(any_address)
def test_embedded_ipv4_is_the_rfcs_arithmetic(address: IpAddress) -> None:
    assert [v4 for _, v4 in embedded_ipv4(address)] == embedded_by_hand(address)


@given(st.text(max_size=50))
def test_parse_cidr_raises_only_cidr_error(text: str) -> None:
    try:
        parse_cidr(text)
    except CidrError:
        pass


# --- --deny-private -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "0.0.0.0",
        "127.0.0.1",
        "127.255.255.254",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",  # the instance metadata service
        "169.254.169.253",  # the Amazon DNS server
        "100.64.0.1",
        "100.127.255.255",
        "224.0.0.251",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.0.8",
        "192.0.2.1",
        "198.18.0.1",
        "198.51.100.1",
        "203.0.113.1",
        "::",
        "::1",
        "::127.0.0.1",  # IPv4-compatible (deprecated)
        "fd00:ec2::254",  # the instance metadata service over IPv6
        "fd12:3456::1",
        "fc00::1",
        "fe80::1",
        "febf::1",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
        "100::1",
        "64:ff9b:1::1",
        # the IPv4-mapped and NAT64 forms of the IPv4 ones
        "::ffff:169.254.169.254",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:0.0.0.0",
        "64:ff9b::169.254.169.254",
        "64:ff9b::10.0.0.1",
        "64:ff9b::127.0.0.1",
    ],
)
def test_deny_private_denies(address: str) -> None:
    p = AccessPolicy(deny_private=True)
    assert not p.permits(ip(address), 443)
    verdict = p.judge_address(ip(address), 443)
    assert verdict is not None and verdict.rule.startswith("--deny-private ")


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "1.1.1.1",
        "8.8.8.8",
        "11.22.33.2",
        "100.63.255.255",
        "100.128.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "169.253.255.255",
        "223.255.255.255",
        "2606:4700::1111",
        "2a05:d018::1",
        "::ffff:93.184.216.34",
        "64:ff9b::93.184.216.34",
        "fbff::1",
        "fe00::1",
        # the other IPv6 forms of a public address
        "::ffff:0:93.184.216.34",
        "2002:5db8:d822::1",
        "2001:0:4136:e378:8000:63bf:a247:27dd",  # Teredo: 65.54.227.120, client 93.184.216.34
    ],
)
def test_deny_private_allows_public_addresses(address: str) -> None:
    assert AccessPolicy(deny_private=True).permits(ip(address), 443)


# 169.254.169.254 (a9fe:a9fe) in each IPv6 form that embeds an IPv4 address
METADATA_FORMS = [
    ("::169.254.169.254", "IPv4-compatible"),
    ("::ffff:0:169.254.169.254", "IPv4-translated"),
    ("64:ff9b::169.254.169.254", "NAT64"),
    ("64:ff9b:1::a9fe:a9fe", "local-use NAT64 (/96)"),
    ("64:ff9b:1:0:a9:fea9:fe00:0", "local-use NAT64 (/64)"),
    ("64:ff9b:1:a9:fe:a9fe::", "local-use NAT64 (/56)"),
    ("64:ff9b:1:a9fe:a9:fe00::", "local-use NAT64 (/48)"),
    ("2002:a9fe:a9fe::", "6to4"),
    ("2002:a9fe:a9fe:1234:5678:9abc:def0:1", "6to4"),
    ("2001:0:a9fe:a9fe::", "Teredo server"),
    ("2001:0:4136:e378:8000:63bf:5601:5601", "Teredo client"),  # ~169.254.169.254
]


@pytest.mark.parametrize(("address", "form"), METADATA_FORMS)
def test_every_ipv6_form_of_a_denied_ipv4_address_is_denied(address: str, form: str) -> None:
    """--deny-private, and an explicit --deny of the IPv4 network (on any port, or on the
    port asked for), deny each form, saying which form of which address it is; an --allow of
    the IPv4 network does not allow them (an IPv4 rule is about IPv4 destinations)."""
    shown = ipaddress.ip_address(address)
    reason = f"{shown} is the {form} form of 169.254.169.254"
    private = AccessPolicy(deny_private=True).judge_address(ip(address), 80)
    if form == "IPv4-compatible":  # ::/96 and 64:ff9b:1::/48 are denied whole
        assert private == Verdict(False, "--deny-private ::/96")
    elif form.startswith("local-use NAT64"):
        assert private == Verdict(False, "--deny-private 64:ff9b:1::/48")
    else:
        assert private == Verdict(False, "--deny-private 169.254.0.0/16", reason)
    assert policy(deny=["169.254.0.0/16"]).judge_address(ip(address), 80) == Verdict(
        False, "--deny 169.254.0.0/16", reason
    )
    on_port = policy(deny=["169.254.169.254/32:80"])
    assert on_port.judge_address(ip(address), 80) == Verdict(
        False, "--deny 169.254.169.254/32:80", reason
    )
    assert on_port.permits(ip(address), 443)
    assert not policy(allow=["169.254.0.0/16"]).permits(ip(address), 80)


@pytest.mark.parametrize(
    ("address", "embedded"),
    [
        ("64:ff9b::100.64.0.1", "100.64.0.1"),
        ("::ffff:0:127.0.0.1", "127.0.0.1"),
        ("64:ff9b::192.168.1.1", "192.168.1.1"),
        ("2002:0a00:0001::", "10.0.0.1"),
        ("2002:7f00:1::", "127.0.0.1"),
        ("2001:0:5db8:d822:8000:63bf:f5ff:fffe", "10.0.0.1"),  # Teredo client 10.0.0.1
        ("2001:0:c0a8:101::", "192.168.1.1"),  # Teredo server 192.168.1.1
    ],
)
def test_ipv6_forms_of_other_private_addresses_are_denied(address: str, embedded: str) -> None:
    verdict = AccessPolicy(deny_private=True).judge_address(ip(address), 443)
    assert verdict is not None and not verdict.allowed, verdict
    assert verdict.reason.endswith(f" form of {embedded}"), verdict


def test_loopback_and_unspecified_are_not_ipv4_compatible() -> None:
    assert embedded_ipv4(ip("::")) == ()
    assert embedded_ipv4(ip("::1")) == ()
    assert policy(deny=["0.0.0.0/8"]).permits(ip("::1"), 443)
    assert not policy(deny=["0.0.0.0/8"]).permits(ip("::2"), 443)


def test_deny_private_wins_over_allow() -> None:
    p = AccessPolicy(allow=rules("0.0.0.0/0"), deny_private=True)
    verdict = p.judge_address(ip("169.254.169.254"), 443)
    assert verdict == Verdict(False, "--deny-private 169.254.0.0/16")
    assert p.permits(ip("93.184.216.34"), 443)


# --- --allow-host patterns ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("api.example.com", "api.example.com"),
        ("API.Example.COM", "api.example.com"),
        ("api.example.com.", "api.example.com"),
        ("*.example.com", "*.example.com"),
        ("*.Example.COM.", "*.example.com"),
        ("kms.us-east-1.amazonaws.com", "kms.us-east-1.amazonaws.com"),
        ("*.s3.us-east-1.amazonaws.com", "*.s3.us-east-1.amazonaws.com"),
        ("localhost", "localhost"),
        ("*.com", "*.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("api.example.com:443", "api.example.com:443"),
        ("API.Example.COM.:8443", "api.example.com:8443"),
        ("*.s3.amazonaws.com:443", "*.s3.amazonaws.com:443"),
        ("localhost:1", "localhost:1"),
        ("*.example.com:65535", "*.example.com:65535"),
    ],
)
def test_parse_host_pattern(text: str, pattern: str) -> None:
    parsed = parse_host_pattern(text)
    assert str(parsed) == pattern
    assert parse_host_pattern(pattern) == parsed
    assert parsed.port == (int(pattern.rpartition(":")[2]) if ":" in pattern else None)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not a host name"),
        ("*", "a wildcard is only allowed as the whole first label"),
        ("*.", "not a host name"),
        ("**.example.com", "a wildcard is only allowed as the whole first label"),
        ("a*.example.com", "a wildcard is only allowed as the whole first label"),
        ("api.*.example.com", "a wildcard is only allowed as the whole first label"),
        ("*.*.example.com", "a wildcard is only allowed as the whole first label"),
        (".example.com", "not a host name"),
        ("example..com", "not a host name"),
        ("exa mple.com", "not a host name"),
        ("example.com:", "not a host name"),
        ("example.com:https", "not a host name"),
        ("example.com:+443", "not a host name"),
        ("example.com:443:443", "not a host name"),
        ("example.com:0", "port '0' is not a number from 1 to 65535"),
        ("example.com:65536", "port '65536' is not a number from 1 to 65535"),
        ("*.example.com:99999", "port '99999' is not a number from 1 to 65535"),
        ("192.0.2.1:443", "use --allow for addresses"),
        ("[::1]:443", "not a host name"),
        ("https://example.com", "not a host name"),
        ("192.0.2.1", "use --allow for addresses"),
        ("::1", "not a host name"),
        ("-example.com", "not a host name"),
        ("b\u00fccher.example", "xn--"),
        ("a" * 64 + ".com", "not a host name"),
    ],
)
def test_malformed_host_patterns(text: str, reason: str) -> None:
    with pytest.raises(HostPatternError, match=re.escape(reason)):
        parse_host_pattern(text)


def hosts_policy(*patterns: str, **kwargs: object) -> AccessPolicy:
    return AccessPolicy(allow_hosts=tuple(map(parse_host_pattern, patterns)), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("host", "pattern"),
    [
        ("api.example.com", "api.example.com"),
        ("a.example.com", "*.example.com"),
        ("a.b.c.example.com", "*.example.com"),
        ("kms.us-east-1.amazonaws.com", "kms.us-east-1.amazonaws.com"),
        ("example.com", None),  # a wildcard is not the name itself
        ("example.com.evil.net", None),
        ("notexample.com", None),
        ("xexample.com", None),
        ("api.example.com.evil.net", None),
        ("api.example.co", None),
        ("com", None),
        ("kms.us-east-2.amazonaws.com", None),
    ],
)
def test_pattern_for(host: str, pattern: str | None) -> None:
    p = hosts_policy("api.example.com", "*.example.com", "kms.us-east-1.amazonaws.com")
    found = p.pattern_for(host)
    assert (str(found) if found else None) == pattern


def test_an_exact_name_is_chosen_over_a_wildcard() -> None:
    p = hosts_policy("*.example.com", "api.example.com")
    assert str(p.pattern_for("api.example.com")) == "api.example.com"
    assert str(p.pattern_for("x.api.example.com")) == "*.example.com"


def test_the_nearest_wildcard_is_chosen() -> None:
    p = hosts_policy("*.example.com", "*.api.example.com")
    assert str(p.pattern_for("x.api.example.com")) == "*.api.example.com"


@pytest.mark.parametrize(
    ("host", "port", "pattern"),
    [
        ("api.example.com", 443, "api.example.com:443"),
        ("api.example.com", 8443, "api.example.com:8443"),
        ("api.example.com", 80, "*.example.com"),  # the exact name not on 80, the wildcard is
        ("www.example.com", 22, "*.example.com"),
        ("bucket.s3.amazonaws.com", 443, "*.s3.amazonaws.com:443"),
        ("bucket.s3.amazonaws.com", 80, None),
        ("a.b.s3.amazonaws.com", 443, "*.s3.amazonaws.com:443"),
        ("s3.amazonaws.com", 443, None),
        ("kms.amazonaws.com", 443, None),
    ],
)
def test_pattern_for_a_port(host: str, port: int, pattern: str | None) -> None:
    p = hosts_policy(
        "api.example.com:443", "*.example.com", "api.example.com:8443", "*.s3.amazonaws.com:443"
    )
    found = p.pattern_for(host, port)
    assert (str(found) if found else None) == pattern


@given(host_names, host_names)
def test_pattern_matching_is_the_suffix_rule(host: str, suffix: str) -> None:
    exact, below = parse_host_pattern(suffix), parse_host_pattern(f"*.{suffix}")
    host, suffix = host.lower(), suffix.lower()
    assert exact.matches(host) == (host == suffix)
    assert below.matches(host) == host.endswith("." + suffix)
    assert (hosts_policy(f"*.{suffix}").pattern_for(host) is not None) == below.matches(host)
    assert below.matches(f"{host}.{suffix}")
    assert not below.matches(suffix)


# --- names decide what addresses leave undecided --------------------------------------------


def lookup_of(answers: dict[str, list[str]], calls: list[str] | None = None) -> Lookup:
    async def lookup(name: str) -> frozenset[IpAddress]:
        if calls is not None:
            calls.append(name)
        if name not in answers:
            raise ResolveError("SERVFAIL")
        return unmapped_addresses(map(ipaddress.ip_address, answers[name]))

    return lookup


def judge(
    p: AccessPolicy, address: str, found: Name | NoName, lookup: Lookup, port: int = 443
) -> Verdict:
    assert p.judge_address(ip(address), port) is None
    return asyncio.run(p.judge_name(ip(address), port, found, lookup))


DNS = {"api.example.com": ["93.184.216.34", "2606:2800::1"], "a.b.example.com": ["93.184.216.35"]}


def test_a_matching_name_that_resolves_to_the_destination_is_allowed() -> None:
    p = hosts_policy("api.example.com", "*.example.com")
    tls = Name("api.example.com", "tls")
    assert judge(p, "93.184.216.34", tls, lookup_of(DNS)) == Verdict(
        True, "--allow-host api.example.com", "api.example.com resolves to it", "api.example.com"
    )
    assert judge(p, "2606:2800::1", tls, lookup_of(DNS)).allowed
    assert judge(p, "::ffff:93.184.216.34", tls, lookup_of(DNS)).allowed
    deep = judge(p, "93.184.216.35", Name("a.b.example.com", "http"), lookup_of(DNS))
    assert deep.allowed and deep.rule == "--allow-host *.example.com"


def test_a_matching_name_aimed_at_another_address_is_denied() -> None:
    p = hosts_policy("api.example.com")
    verdict = judge(p, "93.184.216.99", Name("api.example.com", "tls"), lookup_of(DNS))
    assert verdict == Verdict(
        False,
        "--allow-host api.example.com",
        "api.example.com resolves to 93.184.216.34, 2606:2800::1, not to 93.184.216.99",
        "api.example.com",
    )
    assert verdict.describe("93.184.216.99:443") == (
        "destination 93.184.216.99:443 for api.example.com denied by --allow-host "
        "api.example.com: api.example.com resolves to 93.184.216.34, 2606:2800::1, "
        "not to 93.184.216.99"
    )


def test_a_name_without_addresses_is_denied() -> None:
    p = hosts_policy("*.example.com")
    verdict = judge(
        p, "93.184.216.34", Name("gone.example.com", "tls"), lookup_of({"gone.example.com": []})
    )
    assert not verdict.allowed
    assert verdict.reason == "gone.example.com resolves to no address, not to 93.184.216.34"


def test_a_failed_lookup_denies() -> None:
    p = hosts_policy("api.example.com")
    verdict = judge(p, "93.184.216.34", Name("api.example.com", "tls"), lookup_of({}))
    assert verdict == Verdict(
        False, "--allow-host api.example.com", "resolving api.example.com failed: SERVFAIL",
        "api.example.com",
    )  # fmt: skip


def test_a_name_matching_no_pattern_is_denied_without_a_lookup() -> None:
    calls: list[str] = []
    p = hosts_policy("*.example.com")
    for host in ("example.com.evil.net", "notexample.com", "example.com"):
        verdict = judge(p, "93.184.216.34", Name(host, "tls"), lookup_of(DNS, calls))
        assert verdict == Verdict(False, "--allow-host", "the name matches no pattern", host)
    assert calls == []


def test_an_allowed_name_on_a_port_its_patterns_do_not_name_is_denied() -> None:
    calls: list[str] = []
    p = hosts_policy("api.example.com:443", "api.example.com:8443", "*.example.net")
    tls = Name("api.example.com", "tls")
    assert judge(p, "93.184.216.34", tls, lookup_of(DNS, calls)).allowed
    assert judge(p, "93.184.216.34", tls, lookup_of(DNS, calls), port=8443).allowed
    verdict = judge(p, "93.184.216.34", tls, lookup_of(DNS, calls), port=2222)
    assert verdict == Verdict(
        False,
        "--allow-host",
        "the name matches api.example.com:443, api.example.com:8443, not on port 2222",
        "api.example.com",
    )
    assert calls == ["api.example.com", "api.example.com"]  # no lookup for the denied port


def test_a_port_no_pattern_names_is_denied_before_reading_a_name() -> None:
    p = hosts_policy("api.example.com:443", "*.example.net:443")
    assert p.judge_address(ip("93.184.216.34"), 443) is None  # the name will decide
    assert p.judge_address(ip("93.184.216.34"), 80) == Verdict(
        False,
        "--allow-host",
        "no pattern allows port 80, and the address is in no --allow network",
    )
    with_allow = hosts_policy("api.example.com:443", allow=rules("93.184.216.0/24:22"))
    assert with_allow.judge_address(ip("93.184.216.34"), 22).allowed  # type: ignore[union-attr]
    assert with_allow.judge_address(ip("93.184.216.34"), 80) == Verdict(
        False,
        "--allow-host",
        "no pattern allows port 80, and the address is allowed on other ports only "
        "(93.184.216.0/24:22), not 80",
    )


def test_no_name_is_denied() -> None:
    p = hosts_policy("api.example.com")
    verdict = judge(p, "93.184.216.34", NoName("ClientHello without server_name"), lookup_of(DNS))
    assert verdict.describe("93.184.216.34:443") == (
        "destination 93.184.216.34:443 denied by --allow-host: no host name in the stream "
        "(ClientHello without server_name), and the address is in no --allow network"
    )


def test_addresses_decide_before_names() -> None:
    p = hosts_policy(
        "api.example.com",
        allow=rules("10.0.0.0/8"),
        deny=rules("93.184.216.0/24"),
        deny_private=True,
    )
    assert p.judge_address(ip("93.184.216.34"), 443) == Verdict(False, "--deny 93.184.216.0/24")
    assert p.judge_address(ip("169.254.169.254"), 443) == Verdict(
        False, "--deny-private 169.254.0.0/16"
    )
    # --deny-private comes first, so an --allow inside a private range is still denied
    assert p.judge_address(ip("10.1.2.3"), 443) == Verdict(False, "--deny-private 10.0.0.0/8")
    assert p.judge_address(ip("1.1.1.1"), 443) is None
    assert not p.permits(ip("1.1.1.1"), 443)  # left to a name: not permitted by address
    cidr_only = hosts_policy("api.example.com", allow=rules("1.1.1.0/24"))
    assert cidr_only.judge_address(ip("1.1.1.1"), 443) == Verdict(True, "--allow 1.1.1.0/24")


def test_describe_the_whole_policy() -> None:
    p = hosts_policy(
        "kms.us-east-1.amazonaws.com", "*.example.com",
        allow=rules("10.0.0.0/8"), deny=rules("10.1.0.0/16"), deny_private=True,
    )  # fmt: skip
    text = p.describe()
    assert text.startswith("denied by --deny-private: 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, ")
    assert "fd00::/8" not in text and "fc00::/7" in text
    assert (
        "ff00::/8 (and the IPv6 forms of the IPv4 ones: IPv4-mapped, IPv4-compatible, "
        "IPv4-translated, NAT64, 6to4 and Teredo); " in text
    )
    assert "; denied: 10.1.0.0/16; allowed: 10.0.0.0/8; " in text
    assert "64:ff9b::a9fe:0/112" not in text
    assert text.endswith(
        "allowed by name (TLS server_name or HTTP Host, where the destination is an address "
        "the name resolves to): kms.us-east-1.amazonaws.com, *.example.com; "
        "everything else denied"
    )
    assert AccessPolicy(deny_private=True).describe().endswith("; everything else allowed")


@given(any_address, ports)
def test_deny_private_is_membership_in_its_table(address: IpAddress, port: int) -> None:
    """The address, or an IPv4 address it embeds, in the table: denied on every port."""
    p = AccessPolicy(deny_private=True)
    candidates = [address, *embedded_by_hand(address)]
    listed = any(c in n for c in candidates for n in PRIVATE_NETWORKS)
    assert p.permits(address, port) == (not listed)
    mapped = ipaddress.IPv6Address(f"::ffff:{address}") if address.version == 4 else address
    assert p.permits(mapped, port) == p.permits(address, port)


def test_describe_names_ports_in_brackets_for_ipv6() -> None:
    p = AccessPolicy(
        allow=rules("10.0.0.0/8:443", "[2001:db8::/32]:443"),
        deny=rules("[::1]:22"),
        allow_hosts=(parse_host_pattern("*.s3.amazonaws.com:443"),),
    )
    assert p.describe() == (
        "denied: [::1/128]:22; allowed: 10.0.0.0/8:443, [2001:db8::/32]:443; allowed by name "
        "(TLS server_name or HTTP Host, where the destination is an address the name resolves "
        "to): *.s3.amazonaws.com:443; everything else denied"
    )


# --- the explicit proxy's requests: a name (or an address) and a port -----------------------


def request(
    p: AccessPolicy, host: str, port: int, answers: dict[str, list[str]], calls: list[str]
) -> RequestVerdict:
    try:
        address: IpAddress | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    return asyncio.run(p.judge_request(host, address, port, lookup_of(answers, calls)))


MIXED = {
    "api.example.com": ["2606:2800::1", "93.184.216.34", "93.184.216.33"],
    "metadata.example.com": ["169.254.169.254"],
    "inside.example.com": ["10.0.0.5", "169.254.169.254", "fd00:ec2::254"],
    "half.example.com": ["169.254.169.254", "93.184.216.40"],
    "gone.example.com": [],
}


def test_a_requested_name_that_matches_is_resolved_and_only_allowed_addresses_kept() -> None:
    calls: list[str] = []
    p = hosts_policy("*.example.com:443", deny_private=True)
    decided = request(p, "api.example.com", 443, MIXED, calls)
    assert decided == RequestVerdict(
        Verdict(
            True,
            "--allow-host *.example.com:443",
            "api.example.com resolves to 93.184.216.33, 93.184.216.34, 2606:2800::1",
            "api.example.com",
        ),
        tuple(map(ip, ["93.184.216.33", "93.184.216.34", "2606:2800::1"])),  # IPv4 first
    )
    half = request(p, "half.example.com", 443, MIXED, calls)
    assert half.addresses == (ip("93.184.216.40"),)  # the metadata address is never dialled
    assert half.verdict.reason == (
        "half.example.com resolves to 93.184.216.40, and to denied 169.254.169.254 by "
        "--deny-private 169.254.0.0/16"
    )
    assert calls == ["api.example.com", "half.example.com"]


def test_a_requested_name_whose_addresses_are_all_denied() -> None:
    p = hosts_policy("*.example.com", deny_private=True)
    one = request(p, "metadata.example.com", 80, MIXED, [])
    assert one == RequestVerdict(
        Verdict(
            False,
            "--deny-private 169.254.0.0/16",
            "metadata.example.com resolves to 169.254.169.254",
            "metadata.example.com",
        )
    )
    several = request(p, "inside.example.com", 80, MIXED, [])
    assert not several.verdict.allowed and several.addresses == ()
    assert several.verdict.reason == (
        "every address of inside.example.com is denied: 10.0.0.5 by --deny-private 10.0.0.0/8; "
        "169.254.169.254 by --deny-private 169.254.0.0/16; fd00:ec2::254 by --deny-private "
        "fc00::/7"
    )


def test_a_requested_name_no_pattern_allows_is_denied_without_a_lookup() -> None:
    """The enclave cannot make the host resolve names no rule allows (a DNS channel out)."""
    calls: list[str] = []
    p = hosts_policy("api.example.com:443")
    name = "secret-data.attacker.example"
    assert request(p, name, 443, MIXED, calls) == RequestVerdict(
        Verdict(False, "--allow-host", "the name matches no pattern", name)
    )
    assert request(p, "api.example.com", 80, MIXED, calls) == RequestVerdict(
        Verdict(
            False,
            "--allow-host",
            "the name matches api.example.com:443, not on port 80",
            "api.example.com",
        )
    )
    assert calls == []


def test_a_requested_name_without_patterns_is_judged_by_its_addresses() -> None:
    calls: list[str] = []
    by_address = AccessPolicy(allow=rules("93.184.216.0/24:443"))
    decided = request(by_address, "api.example.com", 443, MIXED, calls)
    assert decided.verdict.rule == "--allow 93.184.216.0/24:443"
    assert decided.addresses == (ip("93.184.216.33"), ip("93.184.216.34"))
    assert not request(by_address, "api.example.com", 80, MIXED, calls).verdict.allowed
    default = request(AccessPolicy(), "api.example.com", 8080, MIXED, calls)
    assert default.verdict.rule == "default" and len(default.addresses) == 3
    # with patterns and --allow networks, a name no pattern matches may still get in by address
    both = hosts_policy("other.example.net", allow=rules("93.184.216.34"))
    mixed = request(both, "api.example.com", 443, MIXED, calls)
    assert mixed.addresses == (ip("93.184.216.34"),)
    assert mixed.verdict.reason.endswith(
        "and to denied 93.184.216.33 by --allow-host (the name matches no pattern); "
        "2606:2800::1 by --allow-host (the name matches no pattern)"
    )


def test_a_requested_address_is_judged_as_an_address() -> None:
    calls: list[str] = []
    p = hosts_policy("api.example.com", allow=rules("44.1.2.0/24:22"), deny_private=True)
    assert request(p, "93.184.216.34", 443, MIXED, calls) == RequestVerdict(
        Verdict(
            False,
            "--allow-host",
            "an address was asked for, not a name, and the address is in no --allow network",
        )
    )
    allowed = request(p, "44.1.2.7", 22, MIXED, calls)
    assert allowed == RequestVerdict(Verdict(True, "--allow 44.1.2.0/24:22"), (ip("44.1.2.7"),))
    assert request(p, "2002:a9fe:a9fe::", 443, MIXED, calls).verdict == Verdict(
        False,
        "--deny-private 169.254.0.0/16",
        "2002:a9fe:a9fe:: is the 6to4 form of 169.254.169.254",
    )
    assert calls == []


def test_a_requested_name_that_does_not_resolve() -> None:
    p = hosts_policy("*.example.com")
    with pytest.raises(ResolveError, match=r"gone\.example\.com has no address"):
        request(p, "gone.example.com", 443, MIXED, [])
    with pytest.raises(ResolveError, match="SERVFAIL"):
        request(p, "unknown.example.com", 443, MIXED, [])
