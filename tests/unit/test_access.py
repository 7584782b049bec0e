"""The --allow/--deny access policy of vsock-to-ip-transparent."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pf_proxy.tcp.access import AccessPolicy, CidrError, parse_cidr


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def policy(allow: list[str] | None = None, deny: list[str] | None = None) -> AccessPolicy:
    return AccessPolicy(tuple(map(parse_cidr, allow or [])), tuple(map(parse_cidr, deny or [])))


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


# --- the rules ------------------------------------------------------------------------------


def test_no_rules_allow_everything() -> None:
    empty = policy()
    for address in ("169.254.169.254", "127.0.0.1", "::1", "203.0.113.7", "::ffff:10.0.0.1"):
        assert empty.permits(ip(address))


def test_deny_only_denies_its_networks() -> None:
    p = policy(deny=["169.254.0.0/16", "fd00:ec2::254/128"])
    assert not p.permits(ip("169.254.169.254"))
    assert not p.permits(ip("169.254.0.0"))
    assert not p.permits(ip("169.254.255.255"))
    assert not p.permits(ip("fd00:ec2::254"))
    assert p.permits(ip("169.253.255.255"))
    assert p.permits(ip("169.255.0.0"))
    assert p.permits(ip("fd00:ec2::253"))
    assert p.permits(ip("93.184.216.34"))


def test_any_allow_denies_everything_else() -> None:
    p = policy(allow=["10.0.0.0/8"])
    assert p.permits(ip("10.0.0.1"))
    assert p.permits(ip("10.255.255.255"))
    assert not p.permits(ip("11.0.0.0"))
    assert not p.permits(ip("93.184.216.34"))
    assert not p.permits(ip("2001:db8::1"))  # an IPv4 allow says nothing for IPv6: denied


def test_deny_wins_over_allow() -> None:
    p = policy(allow=["0.0.0.0/0", "::/0"], deny=["169.254.0.0/16", "10.1.0.0/16"])
    assert not p.permits(ip("169.254.169.254"))
    assert not p.permits(ip("10.1.2.3"))
    assert p.permits(ip("10.2.0.1"))
    assert p.permits(ip("2001:db8::1"))


def test_deny_wins_regardless_of_order_and_overlap() -> None:
    a = policy(allow=["10.0.0.0/24"], deny=["10.0.0.0/8"])
    b = policy(allow=["10.0.0.0/8"], deny=["10.0.0.5/32"])
    assert not a.permits(ip("10.0.0.1"))
    assert not b.permits(ip("10.0.0.5"))
    assert b.permits(ip("10.0.0.6"))


def test_ipv4_mapped_destination_is_judged_as_ipv4() -> None:
    """::ffff:169.254.169.254 reaches 169.254.169.254: a deny of 169.254.0.0/16 covers it."""
    p = policy(deny=["169.254.0.0/16"])
    assert not p.permits(ip("::ffff:169.254.169.254"))
    assert p.permits(ip("::ffff:93.184.216.34"))
    allow_only = policy(allow=["10.0.0.0/8"])
    assert allow_only.permits(ip("::ffff:10.0.0.1"))
    assert not allow_only.permits(ip("::ffff:11.0.0.1"))


def test_ipv4_mapped_rule_is_judged_as_ipv4() -> None:
    p = policy(deny=["::ffff:169.254.0.0/112"])
    assert not p.permits(ip("169.254.169.254"))
    assert not p.permits(ip("::ffff:169.254.169.254"))
    assert p.permits(ip("169.255.0.1"))


def test_rules_built_directly_are_unmapped_too() -> None:
    p = AccessPolicy(deny=(ipaddress.IPv6Network("::ffff:169.254.0.0/112"),))
    assert not p.permits(ip("169.254.169.254"))


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
policies = st.builds(
    AccessPolicy,
    st.lists(networks, max_size=4).map(tuple),
    st.lists(networks, max_size=4).map(tuple),
)


@given(policies, ipv4)
def test_mapped_and_plain_ipv4_are_judged_alike(
    p: AccessPolicy, address: ipaddress.IPv4Address
) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    assert p.permits(mapped) == p.permits(address)


@given(policies, st.one_of(ipv4, ipv6))
def test_the_rules(p: AccessPolicy, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    denied = any(address in n for n in p.deny)
    allowed = not p.allow or any(address in n for n in p.allow)
    assert p.permits(address) == (allowed and not denied)


@given(st.text(max_size=50))
def test_parse_cidr_raises_only_cidr_error(text: str) -> None:
    try:
        parse_cidr(text)
    except CidrError:
        pass
