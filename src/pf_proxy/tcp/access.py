"""Which destinations `vsock-to-ip-transparent` may connect to: the --allow/--deny policy (pure).

The enclave names the destination, so without a policy it can make the host connect anywhere
the host can reach, including the instance metadata service (169.254.169.254) that hands out
the host's credentials. The rules:

- no rules: everything is allowed (the originals' behaviour);
- a destination inside any --deny network is denied (deny wins);
- with at least one --allow, a destination must be inside an --allow network.

An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is judged as the IPv4 address it maps to, and
so is a network given in that form: connecting to ::ffff:169.254.169.254 reaches
169.254.169.254, so --deny 169.254.0.0/16 must cover it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

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


@dataclass(frozen=True)
class AccessPolicy:
    """--allow and --deny networks; `permits(address)` applies the rules above."""

    allow: tuple[IpNetwork, ...] = ()
    deny: tuple[IpNetwork, ...] = ()

    def __post_init__(self) -> None:
        for field in ("allow", "deny"):
            networks = tuple(_unmapped_network(n) for n in getattr(self, field))
            object.__setattr__(self, field, networks)

    def permits(self, address: IpAddress) -> bool:
        address = _unmapped_address(address)
        if any(address in network for network in self.deny):
            return False
        if self.allow:
            return any(address in network for network in self.allow)
        return True

    def describe(self) -> str:
        """One line for the start-up log, e.g. "denied: 169.254.0.0/16; everything else allowed"."""
        parts = []
        if self.deny:
            parts.append("denied: " + ", ".join(map(str, self.deny)))
        if self.allow:
            parts.append("allowed: " + ", ".join(map(str, self.allow)))
            parts.append("everything else denied")
        else:
            parts.append("everything else allowed" if self.deny else "everything allowed")
        return "; ".join(parts)
