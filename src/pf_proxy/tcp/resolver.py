"""Host names to addresses for --allow-host: the host's resolvers, each answer kept for its TTL.

`vsock-to-ip-transparent --allow-host` lets a stream through only when its destination is an
address its name resolves to *now*, so the proxy resolves the name itself, with the resolvers
of /etc/resolv.conf. getaddrinfo() would do that but hides the TTL, so either every connection
costs a lookup or a cached answer outlives its records; dnspython (pure Python, on the event
loop, no thread per lookup) gives each answer's TTL.

- A and AAAA are asked together; the set of both is kept until the shortest TTL among the
  answers (and their CNAME chain) runs out, then asked again by the next connection for it.
- Concurrent connections for the same name share one lookup.
- A name with no address at all (NXDOMAIN, or neither A nor AAAA) is an empty set, kept for
  NEGATIVE_TTL; the policy denies it.
- A resolver that fails or does not answer within `timeout` raises `ResolveError`; nothing is
  cached, so the next connection asks again. The policy denies: it fails closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from pf_proxy.tcp.access import IpAddress, ResolvedAddresses, ResolveError, unmapped_addresses

# A TTL of 0 ("do not cache") would cost a query per connection: each answer is kept at least
# this long. Shorter than any TTL a name meant to move between addresses uses in practice.
MIN_TTL = 1.0
# How long "this name has no address" is believed before asking again.
NEGATIVE_TTL = 5.0
# Names kept at once. Only names that match an --allow-host pattern are ever looked up, but a
# wildcard lets the enclave make up any number of them.
MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class _Entry:
    addresses: ResolvedAddresses
    expires: float  # on the cache's clock


class ResolverCache:
    """`await addresses(name)`: the name's current A and AAAA addresses, cached for their TTL."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._resolver = resolver
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[str, _Entry] = {}
        self._pending: dict[str, asyncio.Task[_Entry]] = {}
        self.lookups = 0  # lookups started (a pair of queries each), for tests and logs

    @classmethod
    def from_system(cls, timeout: float, resolv_conf: str = "/etc/resolv.conf") -> ResolverCache:
        """The host's resolvers from `resolv_conf`; each lookup gives up after `timeout`
        seconds. `ResolveError` when the file names no usable resolver."""
        try:
            resolver = dns.asyncresolver.Resolver(filename=resolv_conf)
        except (OSError, dns.exception.DNSException) as exc:
            raise ResolveError(f"no resolver in {resolv_conf}: {exc}") from None
        resolver.lifetime = timeout
        resolver.timeout = min(resolver.timeout, timeout)
        return cls(resolver)

    @property
    def nameservers(self) -> list[str]:
        return [str(server) for server in self._resolver.nameservers]

    async def addresses(self, name: str) -> ResolvedAddresses:
        """The addresses `name` (a lowercase host name, no trailing dot) resolves to now;
        `ResolveError` when the resolvers fail. Cancelling a caller never cancels a lookup
        that other connections wait for."""
        entry = self._entries.get(name)
        if entry is not None and entry.expires > self._clock():
            return entry.addresses
        task = self._pending.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lookup(name))
            self._pending[name] = task
            task.add_done_callback(lambda done: self._settle(name, done))
            self.lookups += 1
        return (await asyncio.shield(task)).addresses

    def _settle(self, name: str, task: asyncio.Task[_Entry]) -> None:
        del self._pending[name]
        if task.cancelled() or task.exception() is not None:  # retrieved: no warning later
            return
        if len(self._entries) >= self._max_entries and name not in self._entries:
            self._make_room()
        self._entries[name] = task.result()

    def _make_room(self) -> None:
        now = self._clock()
        for stale in [key for key, entry in self._entries.items() if entry.expires <= now]:
            del self._entries[stale]
        while len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]  # the oldest answer

    async def _lookup(self, name: str) -> _Entry:
        qname = dns.name.from_text(name)  # absolute: no search domains
        both = await asyncio.gather(
            self._query(qname, dns.rdatatype.A), self._query(qname, dns.rdatatype.AAAA)
        )
        addresses = unmapped_addresses(address for found, _ in both for address in found)
        ttls = [ttl for _, ttl in both if ttl is not None]
        ttl = max(MIN_TTL, min(ttls)) if ttls else NEGATIVE_TTL
        return _Entry(addresses, self._clock() + ttl)

    async def _query(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> tuple[list[IpAddress], float | None]:
        """One record type's addresses and TTL (None: no records of that type)."""
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return [], None
        except dns.exception.Timeout:
            raise ResolveError(f"no answer within {self._resolver.lifetime:g} s") from None
        except dns.exception.DNSException as exc:
            # dnspython's messages can run to several lines (a docstring, for some)
            first_line = str(exc).strip().split("\n", 1)[0]
            raise ResolveError(f"{type(exc).__name__}: {first_line}") from None
        if answer.rrset is None:
            return [], None
        addresses = [ipaddress.ip_address(record.address) for record in answer.rrset]
        return addresses, float(answer.chaining_result.minimum_ttl)
