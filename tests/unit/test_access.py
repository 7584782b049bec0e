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
    ResolveError,
    Verdict,
    parse_cidr,
    parse_host_pattern,
    unmapped_addresses,
)
from pf_proxy.tcp.sniff import Name, NoName


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
labels = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
host_names = (
    st.lists(labels, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda name: not name.rsplit(".", 1)[-1].isdigit())
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
    assert not p.permits(ip(address))
    verdict = p.judge_address(ip(address))
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
    ],
)
def test_deny_private_allows_public_addresses(address: str) -> None:
    assert AccessPolicy(deny_private=True).permits(ip(address))


def test_deny_private_wins_over_allow() -> None:
    p = AccessPolicy(allow=(parse_cidr("0.0.0.0/0"),), deny_private=True)
    verdict = p.judge_address(ip("169.254.169.254"))
    assert verdict == Verdict(False, "--deny-private 169.254.0.0/16")
    assert p.permits(ip("93.184.216.34"))


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
    ],
)
def test_parse_host_pattern(text: str, pattern: str) -> None:
    assert str(parse_host_pattern(text)) == pattern


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
        ("example.com:443", "not a host name"),
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


def judge(p: AccessPolicy, address: str, found: Name | NoName, lookup: Lookup) -> Verdict:
    assert p.judge_address(ip(address)) is None
    return asyncio.run(p.judge_name(ip(address), found, lookup))


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
        allow=(parse_cidr("10.0.0.0/8"),),
        deny=(parse_cidr("93.184.216.0/24"),),
        deny_private=True,
    )
    assert p.judge_address(ip("93.184.216.34")) == Verdict(False, "--deny 93.184.216.0/24")
    assert p.judge_address(ip("169.254.169.254")) == Verdict(False, "--deny-private 169.254.0.0/16")
    # --deny-private comes first, so an --allow inside a private range is still denied
    assert p.judge_address(ip("10.1.2.3")) == Verdict(False, "--deny-private 10.0.0.0/8")
    assert p.judge_address(ip("1.1.1.1")) is None
    assert not p.permits(ip("1.1.1.1"))  # left to a name: not permitted by address
    cidr_only = hosts_policy("api.example.com", allow=(parse_cidr("1.1.1.0/24"),))
    assert cidr_only.judge_address(ip("1.1.1.1")) == Verdict(True, "--allow 1.1.1.0/24")


def test_describe_the_whole_policy() -> None:
    p = hosts_policy(
        "kms.us-east-1.amazonaws.com", "*.example.com",
        allow=(parse_cidr("10.0.0.0/8"),), deny=(parse_cidr("10.1.0.0/16"),), deny_private=True,
    )  # fmt: skip
    text = p.describe()
    assert text.startswith("denied by --deny-private: 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, ")
    assert "fd00::/8" not in text and "fc00::/7" in text
    assert "ff00::/8 (and the IPv4 ones' IPv4-mapped and NAT64 64:ff9b::/96 forms); " in text
    assert "; denied: 10.1.0.0/16; allowed: 10.0.0.0/8; " in text
    assert "64:ff9b::a9fe:0/112" not in text
    assert text.endswith(
        "allowed by name (TLS server_name or HTTP Host, where the destination is an address "
        "the name resolves to): kms.us-east-1.amazonaws.com, *.example.com; "
        "everything else denied"
    )
    assert AccessPolicy(deny_private=True).describe().endswith("; everything else allowed")


@given(st.one_of(ipv4, ipv6))
def test_deny_private_is_membership_in_its_table(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    p = AccessPolicy(deny_private=True)
    assert p.permits(address) == (not any(address in n for n in PRIVATE_NETWORKS))
    mapped = ipaddress.IPv6Address(f"::ffff:{address}") if address.version == 4 else address
    assert p.permits(mapped) == p.permits(address)
