"""What `vsock-to-ip-transparent` and `vsock-to-ip-proxy` may connect to: --allow/--deny
networks, --deny-private and --allow-host names (pure; the name check's DNS lookups are the
caller's, see `resolver`).

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

The explicit proxy (`judge_request`) is told the name itself, by the client's CONNECT or
SOCKS5 request: the name and port are checked against the patterns, every address the name
resolves to on the host against the rules above, and only the allowed addresses are dialled.
An address in the request is judged as an address; with --allow-host, it needs an --allow.

Every rule may name a port (`10.0.0.0/8:443`, `[2001:db8::/32]:443`, `api.example.com:443`)
and then applies to that port only; a rule without a port applies to every port, as before
rules could name one.

An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is judged as the IPv4 address it maps to, and
so is a network given in that form: connecting to ::ffff:169.254.169.254 reaches
169.254.169.254, so --deny 169.254.0.0/16 must cover it. The other IPv6 forms that embed an
IPv4 address (IPv4-compatible, IPv4-translated, NAT64, 6to4, Teredo: see `embedded_ipv4`)
reach it only through a translator or relay, if one is on the path; they are denied when the
address they embed is (by --deny or --deny-private), but an --allow of the IPv4 network
does not allow them: a deny must not be bypassed by a spelling, an allow is not widened by one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

from pf_proxy.tcp.sniff import Name, NoName, valid_host_name

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class CidrError(ValueError):
    """Text that is not an IPv4 or IPv6 network (with or without a port); the message says
    why."""


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


_PORT = re.compile(r"[0-9]{1,5}")


def parse_port(text: str) -> int:
    """A TCP port, 1 to 65535, in decimal digits; `ValueError` saying so otherwise."""
    if not _PORT.fullmatch(text) or not 0 < int(text) <= 0xFFFF:
        raise ValueError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


@dataclass(frozen=True)
class NetworkRule:
    """An --allow or --deny rule: a network, on one port or (`port` None) on every port."""

    network: IpNetwork
    port: int | None = None

    def __str__(self) -> str:
        if self.port is None:
            return str(self.network)
        if self.network.version == 6:
            return f"[{self.network}]:{self.port}"
        return f"{self.network}:{self.port}"

    def covers(self, address: IpAddress, port: int) -> bool:
        return address in self.network and (self.port is None or self.port == port)


def parse_network_rule(text: str) -> NetworkRule:
    """Parse a network with an optional port: `10.0.0.0/8`, `10.0.0.0/8:443`,
    `169.254.169.254:80`, `2001:db8::/32`, `[2001:db8::/32]` or `[2001:db8::/32]:443` (an
    IPv6 network takes a port only in brackets: in `::1:443` the 443 is part of the address).
    """
    text = text.strip()
    try:
        if text.startswith("["):
            inside, bracket, rest = text[1:].partition("]")
            if not bracket:
                raise CidrError("'[' without ']': write [NETWORK] or [NETWORK]:PORT")
            if rest and not rest.startswith(":"):
                raise CidrError(f"{rest!r} after ']': only :PORT may follow it")
            return NetworkRule(parse_cidr(inside), parse_port(rest[1:]) if rest else None)
        if text.count(":") == 1:  # IPv4 with a port; IPv6 has at least two colons
            network, _, port = text.partition(":")
            return NetworkRule(parse_cidr(network), parse_port(port))
        if ":" in text.partition("/")[2]:
            raise CidrError(
                "an IPv6 network with a port is written in brackets, e.g. [2001:db8::/32]:443"
            )
        return NetworkRule(parse_cidr(text))
    except CidrError:
        raise
    except ValueError as exc:  # the port's
        raise CidrError(str(exc)) from None


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


# --- IPv6 addresses that embed an IPv4 address --------------------------------------------------

_COMPATIBLE = ipaddress.IPv6Network("::/96")  # ::a.b.c.d (RFC 4291 2.5.5.1, deprecated)
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # ::ffff:0:a.b.c.d (RFC 2765 SIIT)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known prefix (RFC 6052)
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # local use (RFC 8215)
# Where an operator's prefix inside 64:ff9b:1::/48 may end; RFC 6052 2.2 places the IPv4
# address after it, skipping bits 64-71. The prefix in use is unknown here: every one counts.
_NAT64_LOCAL_PREFIXES = (48, 56, 64, 96)
_LOW_32 = 0xFFFFFFFF
_LOW_56 = (1 << 56) - 1


def _rfc6052_ipv4(address: ipaddress.IPv6Address, prefix: int) -> ipaddress.IPv4Address:
    """The IPv4 address embedded after a `prefix`-bit NAT64 prefix (RFC 6052 section 2.2)."""
    value = int(address)
    without_u = (value >> 64) << 56 | (value & _LOW_56)  # bits 64-71 (the "u" octet) left out
    start = prefix if prefix <= 64 else prefix - 8
    return ipaddress.IPv4Address((without_u >> (120 - start - 32)) & _LOW_32)


def embedded_ipv4(address: IpAddress) -> tuple[tuple[str, ipaddress.IPv4Address], ...]:
    """The IPv4 addresses an IPv6 address carries, each with the name of its form; () for
    an IPv4 address and for IPv6 addresses of no such form. IPv4-mapped addresses are not
    listed: the policy judges them as the IPv4 address itself.

    - IPv4-compatible `::a.b.c.d` (not `::` or `::1`);
    - IPv4-translated `::ffff:0:a.b.c.d`;
    - NAT64 `64:ff9b::a.b.c.d`, and in the local-use `64:ff9b:1::/48` the address after each
      prefix length an operator may use there (/48, /56, /64, /96);
    - 6to4 `2002:AABB:CCDD::/48`;
    - Teredo `2001:0:SSSS:SSSS:...`: the server's address, and the client's (stored with its
      bits inverted, RFC 4380 section 4), which a Teredo relay delivers to.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return ()
    low = ipaddress.IPv4Address(int(address) & _LOW_32)
    if address in _COMPATIBLE:
        return (("IPv4-compatible", low),) if int(address) > 1 else ()
    if address in _TRANSLATED:
        return (("IPv4-translated", low),)
    if address in _NAT64:
        return (("NAT64", low),)
    if address in _NAT64_LOCAL:
        return tuple(
            (f"local-use NAT64 (/{prefix})", _rfc6052_ipv4(address, prefix))
            for prefix in _NAT64_LOCAL_PREFIXES
        )
    if address.sixtofour is not None:
        return (("6to4", address.sixtofour),)
    if address.teredo is not None:
        server, client = address.teredo
        return (("Teredo server", server), ("Teredo client", client))
    return ()


# --- --deny-private -----------------------------------------------------------------------------

# What an enclave should never reach by accident: the host itself, the networks behind it, the
# metadata service, and addresses no public service has. IPv4-mapped forms are covered by the
# unmapping above, the other IPv6 forms of the IPv4 ranges by `embedded_ipv4`.
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
PRIVATE_NETWORKS: tuple[IpNetwork, ...] = (
    *(ipaddress.IPv4Network(text) for text in _PRIVATE_IPV4),
    *(ipaddress.IPv6Network(text) for text in _PRIVATE_IPV6),
)


# --- --allow-host -------------------------------------------------------------------------------


class HostPatternError(ValueError):
    """Text that is not a host name or `*.` followed by one, with an optional `:PORT`; the
    message says why."""


@dataclass(frozen=True)
class HostPattern:
    """A host name (`api.example.com`: that name only) or a wildcard (`*.example.com`: any
    name below it, at any depth, not the name itself), lowercase, no trailing dot; on one
    port, or (`port` None) on every port."""

    suffix: str
    wildcard: bool
    port: int | None = None

    def __str__(self) -> str:
        name = f"*.{self.suffix}" if self.wildcard else self.suffix
        return name if self.port is None else f"{name}:{self.port}"

    def matches(self, host: str) -> bool:
        """Whether `host` (a lowercase host name without a trailing dot) matches, whatever
        the port."""
        if self.wildcard:
            return host.endswith(f".{self.suffix}")
        return host == self.suffix

    def allows_port(self, port: int) -> bool:
        return self.port is None or self.port == port


def parse_host_pattern(text: str) -> HostPattern:
    """Parse `NAME`, `*.NAME`, `NAME:PORT` or `*.NAME:PORT`, case-insensitively, a trailing
    dot ignored."""
    name, colon, port_text = text.partition(":")
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[2:]
    if not name.isascii():
        raise HostPatternError(
            "not an ASCII host name (write an international name in its xn-- form)"
        )
    host = valid_host_name(name)
    if host is None or (colon and not (port_text.isascii() and port_text.isdigit())):
        if "*" in name:
            raise HostPatternError("a wildcard is only allowed as the whole first label: *.NAME")
        raise HostPatternError(
            "not a host name (letters, digits and '-' in dot-separated labels, optionally "
            "followed by :PORT; not an IP address: use --allow for addresses)"
        )
    try:
        port = parse_port(port_text) if colon else None
    except ValueError as exc:
        raise HostPatternError(str(exc)) from None
    return HostPattern(host, wildcard, port)


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
class RequestVerdict:
    """The decision on an explicit proxy's request: allowed or not (and by which rule, for
    which reason), and the addresses it may be connected to, in the order to try them."""

    verdict: Verdict
    addresses: tuple[IpAddress, ...] = ()


@dataclass(frozen=True)
class AccessPolicy:
    """--allow, --deny, --deny-private and --allow-host, applied as the module docstring says."""

    allow: tuple[NetworkRule, ...] = ()
    deny: tuple[NetworkRule, ...] = ()
    allow_hosts: tuple[HostPattern, ...] = ()
    deny_private: bool = False
    # the patterns by name, for a lookup per label of the name instead of a scan
    _exact: dict[str, tuple[HostPattern, ...]] = field(init=False, repr=False, compare=False)
    _below: dict[str, tuple[HostPattern, ...]] = field(init=False, repr=False, compare=False)
    # the ports some --allow-host pattern allows; None: every port (a pattern without one)
    _host_ports: frozenset[int] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("allow", "deny"):
            rules = tuple(
                NetworkRule(_unmapped_network(rule.network), rule.port)
                for rule in getattr(self, name)
            )
            object.__setattr__(self, name, rules)
        exact: dict[str, tuple[HostPattern, ...]] = {}
        below: dict[str, tuple[HostPattern, ...]] = {}
        for pattern in self.allow_hosts:
            by_name = below if pattern.wildcard else exact
            by_name[pattern.suffix] = (*by_name.get(pattern.suffix, ()), pattern)
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_below", below)
        ports = {pattern.port for pattern in self.allow_hosts}
        host_ports = None if None in ports else frozenset(p for p in ports if p is not None)
        object.__setattr__(self, "_host_ports", host_ports)

    @property
    def needs_names(self) -> bool:
        """Whether some destinations are decided by the stream's name (--allow-host)."""
        return bool(self.allow_hosts)

    def judge_address(self, address: IpAddress, port: int) -> Verdict | None:
        """The verdict from the address and port alone, or None when the stream's name must
        decide."""
        address = _unmapped_address(address)
        denied = self._denial(address, port)
        if denied is not None:
            return denied
        for rule in self.allow:
            if rule.covers(address, port):
                return Verdict(True, f"--allow {rule}")
        if self.allow_hosts:
            if self._host_ports is None or port in self._host_ports:
                return None
            return Verdict(
                False,
                "--allow-host",
                f"no pattern allows port {port}, and {self._allow_miss(address, port)}",
            )
        if self.allow:
            return Verdict(False, "--allow", self._allow_miss(address, port))
        return Verdict(True, "default", "no --allow or --allow-host rule")

    def _denial(self, address: IpAddress, port: int) -> Verdict | None:
        """The --deny-private or --deny verdict for the address or an IPv4 address it embeds."""
        candidates: list[tuple[IpAddress, str]] = [(address, "")]
        for form, embedded in embedded_ipv4(address):
            candidates.append((embedded, f"{address} is the {form} form of {embedded}"))
        if self.deny_private:
            for candidate, reason in candidates:
                for network in PRIVATE_NETWORKS:
                    if candidate in network:
                        return Verdict(False, f"--deny-private {network}", reason)
        for candidate, reason in candidates:
            for rule in self.deny:
                if rule.covers(candidate, port):
                    return Verdict(False, f"--deny {rule}", reason)
        return None

    def _allow_miss(self, address: IpAddress, port: int) -> str:
        """Why no --allow rule allows the destination, for the log."""
        near = [str(rule) for rule in self.allow if address in rule.network]
        if near:
            return f"the address is allowed on other ports only ({', '.join(near)}), not {port}"
        return "the address is in no --allow network"

    def permits(self, address: IpAddress, port: int) -> bool:
        """The address-only decision; a destination left to names is not permitted."""
        verdict = self.judge_address(address, port)
        return verdict is not None and verdict.allowed

    def pattern_for(self, host: str, port: int | None = None) -> HostPattern | None:
        """The --allow-host pattern that allows `host` on `port` (None: on any port), the
        exact name first, then the nearest wildcard; None if none does."""
        for patterns in self._patterns_by_nearness(host):
            for pattern in patterns:
                if port is None or pattern.allows_port(port):
                    return pattern
        return None

    def _patterns_by_nearness(self, host: str) -> Iterator[tuple[HostPattern, ...]]:
        if host in self._exact:
            yield self._exact[host]
        dot = host.find(".")
        while dot >= 0:  # a.b.example.com: b.example.com, example.com, com
            parent = host[dot + 1 :]
            if parent in self._below:
                yield self._below[parent]
            dot = host.find(".", dot + 1)

    async def judge_name(
        self, address: IpAddress, port: int, found: Name | NoName, lookup: Lookup
    ) -> Verdict:
        """The verdict for a destination `judge_address` left undecided, from the stream's
        name: it must match a pattern that allows `port`, and `lookup(name)` (its current DNS
        answer) must contain the address. A failed lookup (`ResolveError`) denies."""
        if isinstance(found, NoName):
            return Verdict(
                False,
                "--allow-host",
                f"no host name in the stream ({found.reason}), and "
                f"{self._allow_miss(_unmapped_address(address), port)}",
            )
        host = found.host
        pattern = self.pattern_for(host, port)
        if pattern is None:
            return Verdict(False, "--allow-host", self._no_pattern(host, port), host)
        rule = f"--allow-host {pattern}"
        try:
            addresses = await lookup(host)
        except ResolveError as exc:
            return Verdict(False, rule, f"resolving {host} failed: {exc}", host)
        if _unmapped_address(address) in addresses:
            return Verdict(True, rule, f"{host} resolves to it", host)
        shown = ", ".join(sorted(map(str, addresses), key=_address_order)) or "no address"
        return Verdict(False, rule, f"{host} resolves to {shown}, not to {address}", host)

    async def judge_request(
        self, host: str, address: IpAddress | None, port: int, lookup: Lookup
    ) -> RequestVerdict:
        """The verdict on a request for `host` (a lowercase host name; or `address`, when the
        client named one) on `port`. A name is looked up only if some rule could allow it, so
        the client cannot make this host resolve names no rule allows; each address it
        resolves to is judged as a destination, and a pattern the name and port match
        decides for those the address rules leave open. `ResolveError` when the lookup fails
        or finds no address."""
        if address is not None:
            verdict = self.judge_address(address, port)
            if verdict is None:
                verdict = Verdict(
                    False,
                    "--allow-host",
                    "an address was asked for, not a name, and "
                    + self._allow_miss(_unmapped_address(address), port),
                )
            return RequestVerdict(verdict, (address,) if verdict.allowed else ())
        pattern = self.pattern_for(host, port)
        if pattern is None and self.allow_hosts and not self.allow:
            denied = Verdict(False, "--allow-host", self._no_pattern(host, port), host)
            return RequestVerdict(denied)
        found = await lookup(host)
        if not found:
            raise ResolveError(f"{host} has no address")
        allowed: list[tuple[IpAddress, Verdict]] = []
        denials: list[tuple[IpAddress, Verdict]] = []
        for candidate in sorted(found, key=_ipv4_first):
            verdict = self.judge_address(candidate, port)
            if verdict is None:  # the name decides: it resolves to this address by definition
                if pattern is None:
                    verdict = Verdict(False, "--allow-host", self._no_pattern(host, port))
                else:
                    verdict = Verdict(True, f"--allow-host {pattern}")
            (allowed if verdict.allowed else denials).append((candidate, verdict))
        each_denial = "; ".join(_denied_address(a, v) for a, v in denials)
        if allowed:
            reason = f"{host} resolves to {', '.join(str(a) for a, _ in allowed)}"
            if denials:
                reason += f", and to denied {each_denial}"
            verdict = Verdict(True, allowed[0][1].rule, reason, host)
            return RequestVerdict(verdict, tuple(a for a, _ in allowed))
        if len(denials) == 1:
            ((only, verdict),) = denials
            why = f"; {verdict.reason}" if verdict.reason else ""
            return RequestVerdict(
                Verdict(False, verdict.rule, f"{host} resolves to {only}{why}", host)
            )
        reason = f"every address of {host} is denied: {each_denial}"
        return RequestVerdict(Verdict(False, denials[0][1].rule, reason, host))

    def _no_pattern(self, host: str, port: int) -> str:
        """Why no pattern allows `host` on `port`, for the log."""
        named = [str(p) for patterns in self._patterns_by_nearness(host) for p in patterns]
        if named:
            return f"the name matches {', '.join(named)}, not on port {port}"
        return "the name matches no pattern"

    def describe(
        self,
        names: str = "TLS server_name or HTTP Host, where the destination is an address the "
        "name resolves to",
    ) -> str:
        """The whole policy in one line for the start-up log, e.g. "denied: 169.254.0.0/16;
        everything else allowed"; `names` says where the names --allow-host judges come
        from."""
        parts = []
        if self.deny_private:
            parts.append(
                "denied by --deny-private: "
                + ", ".join(map(str, PRIVATE_NETWORKS))
                + " (and the IPv6 forms of the IPv4 ones: IPv4-mapped, IPv4-compatible, "
                "IPv4-translated, NAT64, 6to4 and Teredo)"
            )
        if self.deny:
            parts.append("denied: " + ", ".join(map(str, self.deny)))
        if self.allow:
            parts.append("allowed: " + ", ".join(map(str, self.allow)))
        if self.allow_hosts:
            parts.append(f"allowed by name ({names}): " + ", ".join(map(str, self.allow_hosts)))
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


def _ipv4_first(address: IpAddress) -> tuple[int, int]:
    return (address.version, int(address))


def _denied_address(address: IpAddress, verdict: Verdict) -> str:
    return f"{address} by {verdict.rule}" + (f" ({verdict.reason})" if verdict.reason else "")
