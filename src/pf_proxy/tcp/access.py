"""What `vsock-to-ip-transparent` may connect to: --allow/--deny networks, --deny-private and
--allow-host names (pure; the name check's DNS lookups are the caller's, see `resolver`).

The enclave names the destination, so without a policy it can make the host connect anywhere
the host can reach, including the instance metadata service (169.254.169.254) that hands out
the host's credentials. The rules, in order:

1. a destination inside a --deny network, or a --deny-private range, is denied (deny wins);
2. a destination inside an --allow network is allowed;
3. with --allow-host patterns, the stream's own name decides (its TLS server_name or HTTP Host,
   see `sniff`): allowed when it matches a pattern *and* the destination is one of the
   addresses the name resolves to on the host now. The name comes from the enclave too, so it
   proves nothing by itself: "api.example.com" aimed at 169.254.169.254 is denied. A stream
   without a name is denied;
4. otherwise: denied if any --allow or --allow-host was given, allowed if none was (the
   originals' behaviour).

An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is judged as the IPv4 address it maps to, and
so is a network given in that form: connecting to ::ffff:169.254.169.254 reaches
169.254.169.254, so --deny 169.254.0.0/16 must cover it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from pf_proxy.tcp.sniff import Name, NoName, valid_host_name

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class CidrError(ValueError):
    """Text that is not an IPv4 or IPv6 network; the message says why."""


def parse_cidr(text: str) -> IpNetwork:
    """Parse `ADDRESS/PREFIX` or a bare address (a single host), IPv4 or IPv6.

    Host bits set below the prefix (10.0.0.1/8) are an error rather than silently masked:
    in a security rule the mistake is more likely than the intent.
    """
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise CidrError(str(exc)) from None
    return _unmapped_network(network)


def _unmapped_address(address: IpAddress) -> IpAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped_network(network: IpNetwork) -> IpNetwork:
    """::ffff:a.b.c.d/(96+n) is the IPv4 network a.b.c.d/n."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        base = _unmapped_address(network.network_address)
        return ipaddress.IPv4Network(f"{base}/{network.prefixlen - 96}")
    return network


# --- --deny-private -----------------------------------------------------------------------------

# What an enclave should never reach by accident: the host itself, the networks behind it, the
# metadata service, and addresses no public service has. IPv4-mapped forms are covered by the
# unmapping above; the NAT64 forms (64:ff9b::a.b.c.d, which a NAT64 gateway turns into a.b.c.d)
# of the IPv4 ranges are added below.
_PRIVATE_IPV4 = (
    "0.0.0.0/8",  # "this network": 0.0.0.0 reaches the host itself
    "10.0.0.0/8",  # RFC 1918
    "100.64.0.0/10",  # CGNAT shared space (RFC 6598)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local: the metadata service, Amazon DNS and time servers
    "172.16.0.0/12",  # RFC 1918
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation (TEST-NET-1)
    "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
    "192.168.0.0/16",  # RFC 1918
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation (TEST-NET-2)
    "203.0.113.0/24",  # documentation (TEST-NET-3)
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and the broadcast address 255.255.255.255
)
_PRIVATE_IPV6 = (
    "::/96",  # unspecified (::), loopback (::1) and the deprecated IPv4-compatible ::a.b.c.d
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
    "100::/64",  # discard-only
    "2001:2::/48",  # benchmarking
    "2001:db8::/32",  # documentation
    "fc00::/7",  # unique local (ULA), with the metadata service fd00:ec2::254
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated)
    "ff00::/8",  # multicast
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _nat64_form(network: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
    base = ipaddress.IPv6Address(int(_NAT64.network_address) + int(network.network_address))
    return ipaddress.IPv6Network(f"{base}/{96 + network.prefixlen}")


_PRIVATE_V4_NETWORKS = tuple(ipaddress.IPv4Network(text) for text in _PRIVATE_IPV4)
_PRIVATE_LISTED: tuple[IpNetwork, ...] = (
    *_PRIVATE_V4_NETWORKS,
    *(ipaddress.IPv6Network(text) for text in _PRIVATE_IPV6),
)
PRIVATE_NETWORKS: tuple[IpNetwork, ...] = (
    *_PRIVATE_LISTED,
    *(_nat64_form(network) for network in _PRIVATE_V4_NETWORKS),
)


# --- --allow-host -------------------------------------------------------------------------------


class HostPatternError(ValueError):
    """Text that is not a host name or `*.` followed by one; the message says why."""


@dataclass(frozen=True)
class HostPattern:
    """A host name (`api.example.com`: that name only) or a wildcard (`*.example.com`: any
    name below it, at any depth, not the name itself); lowercase, no trailing dot."""

    suffix: str
    wildcard: bool

    def __str__(self) -> str:
        return f"*.{self.suffix}" if self.wildcard else self.suffix

    def matches(self, host: str) -> bool:
        """Whether `host` (a lowercase host name without a trailing dot) matches."""
        if self.wildcard:
            return host.endswith(f".{self.suffix}")
        return host == self.suffix


def parse_host_pattern(text: str) -> HostPattern:
    """Parse `NAME` or `*.NAME`, case-insensitively, a trailing dot ignored."""
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if not name.isascii():
        raise HostPatternError(
            "not an ASCII host name (write an international name in its xn-- form)"
        )
    host = valid_host_name(name)
    if host is None:
        if "*" in name:
            raise HostPatternError("a wildcard is only allowed as the whole first label: *.NAME")
        raise HostPatternError(
            "not a host name (letters, digits and '-' in dot-separated labels, "
            "not an IP address: use --allow for addresses)"
        )
    return HostPattern(host, wildcard)


# --- the policy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What the policy decided for one destination, and which rule decided it."""

    allowed: bool
    rule: str  # e.g. "--deny-private 169.254.0.0/16", "--allow-host *.example.com"
    reason: str = ""  # e.g. "api.example.com resolves to 192.0.2.10, not 192.0.2.20"
    name: str | None = None  # the stream's host name, when one was read

    def describe(self, destination: object) -> str:
        """One log line's worth: address, name, decision, rule and reason."""
        name = f" for {self.name}" if self.name else ""
        decision = "allowed" if self.allowed else "denied"
        reason = f": {self.reason}" if self.reason else ""
        return f"destination {destination}{name} {decision} by {self.rule}{reason}"


ResolvedAddresses = frozenset[IpAddress]
Lookup = Callable[[str], Awaitable[ResolvedAddresses]]


class ResolveError(Exception):
    """A name could not be resolved (timeout, SERVFAIL, no resolver); the message says why."""


@dataclass(frozen=True)
class AccessPolicy:
    """--allow, --deny, --deny-private and --allow-host, applied as the module docstring says."""

    allow: tuple[IpNetwork, ...] = ()
    deny: tuple[IpNetwork, ...] = ()
    allow_hosts: tuple[HostPattern, ...] = ()
    deny_private: bool = False
    # the patterns by name, for a lookup per label of the name instead of a scan
    _exact: dict[str, HostPattern] = field(init=False, repr=False, compare=False)
    _below: dict[str, HostPattern] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("allow", "deny"):
            networks = tuple(_unmapped_network(n) for n in getattr(self, name))
            object.__setattr__(self, name, networks)
        exact = {p.suffix: p for p in reversed(self.allow_hosts) if not p.wildcard}
        below = {p.suffix: p for p in reversed(self.allow_hosts) if p.wildcard}
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_below", below)

    @property
    def needs_names(self) -> bool:
        """Whether some destinations are decided by the stream's name (--allow-host)."""
        return bool(self.allow_hosts)

    def judge_address(self, address: IpAddress) -> Verdict | None:
        """The verdict from the address alone, or None when the stream's name must decide."""
        address = _unmapped_address(address)
        if self.deny_private:
            for network in PRIVATE_NETWORKS:
                if address in network:
                    return Verdict(False, f"--deny-private {network}")
        for network in self.deny:
            if address in network:
                return Verdict(False, f"--deny {network}")
        for network in self.allow:
            if address in network:
                return Verdict(True, f"--allow {network}")
        if self.allow_hosts:
            return None
        if self.allow:
            return Verdict(False, "--allow", "the address is in no --allow network")
        return Verdict(True, "default", "no --allow or --allow-host rule")

    def permits(self, address: IpAddress) -> bool:
        """The address-only decision; a destination left to names is not permitted."""
        verdict = self.judge_address(address)
        return verdict is not None and verdict.allowed

    def pattern_for(self, host: str) -> HostPattern | None:
        """The --allow-host pattern `host` matches, the exact name first; None if none does."""
        if host in self._exact:
            return self._exact[host]
        dot = host.find(".")
        while dot >= 0:  # a.b.example.com: b.example.com, example.com, com
            parent = host[dot + 1 :]
            if parent in self._below:
                return self._below[parent]
            dot = host.find(".", dot + 1)
        return None

    async def judge_name(self, address: IpAddress, found: Name | NoName, lookup: Lookup) -> Verdict:
        """The verdict for a destination `judge_address` left undecided, from the stream's
        name: it must match a pattern, and `lookup(name)` (its current DNS answer) must
        contain the address. A failed lookup (`ResolveError`) denies."""
        if isinstance(found, NoName):
            return Verdict(
                False,
                "--allow-host",
                f"no host name in the stream ({found.reason}), and the address is in no "
                "--allow network",
            )
        host = found.host
        pattern = self.pattern_for(host)
        if pattern is None:
            return Verdict(False, "--allow-host", "the name matches no pattern", host)
        rule = f"--allow-host {pattern}"
        try:
            addresses = await lookup(host)
        except ResolveError as exc:
            return Verdict(False, rule, f"resolving {host} failed: {exc}", host)
        if _unmapped_address(address) in addresses:
            return Verdict(True, rule, f"{host} resolves to it", host)
        shown = ", ".join(sorted(map(str, addresses), key=_address_order)) or "no address"
        return Verdict(False, rule, f"{host} resolves to {shown}, not to {address}", host)

    def describe(self) -> str:
        """The whole policy in one line for the start-up log, e.g. "denied: 169.254.0.0/16;
        everything else allowed"."""
        parts = []
        if self.deny_private:
            parts.append(
                "denied by --deny-private: "
                + ", ".join(map(str, _PRIVATE_LISTED))
                + " (and the IPv4 ones' IPv4-mapped and NAT64 64:ff9b::/96 forms)"
            )
        if self.deny:
            parts.append("denied: " + ", ".join(map(str, self.deny)))
        if self.allow:
            parts.append("allowed: " + ", ".join(map(str, self.allow)))
        if self.allow_hosts:
            parts.append(
                "allowed by name (TLS server_name or HTTP Host, where the destination is an "
                "address the name resolves to): " + ", ".join(map(str, self.allow_hosts))
            )
        if self.allow or self.allow_hosts:
            parts.append("everything else denied")
        else:
            denies = self.deny or self.deny_private
            parts.append("everything else allowed" if denies else "everything allowed")
        return "; ".join(parts)


def unmapped_addresses(addresses: Iterable[IpAddress]) -> ResolvedAddresses:
    """A DNS answer as a set the policy compares with (IPv4-mapped AAAA records as IPv4)."""
    return frozenset(_unmapped_address(address) for address in addresses)


def _address_order(text: str) -> tuple[int, str]:
    return (":" in text, text)
