"""ResolverCache: answers kept for their TTL, shared lookups, failures never cached.

dnspython's resolver is replaced by a fake that answers from a table and counts queries; the
clock is the test's. (The real resolver against a real DNS server: tests/integration/
test_egress_names.py.)
"""

from __future__ import annotations

import asyncio
import ipaddress
from types import SimpleNamespace
from typing import Any, cast

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
import pytest

from pf_proxy.tcp.access import ResolveError
from pf_proxy.tcp.resolver import MIN_TTL, NEGATIVE_TTL, ResolverCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeResolver:
    """Answers (name, "A"/"AAAA") -> (addresses, ttl) from `table`; a name mapped to an
    exception raises it. `gate`, when set, holds every query until it is set."""

    lifetime = 2.5

    def __init__(self, table: dict[str, Any]) -> None:
        self.nameservers = ["192.0.2.53"]
        self.table = table
        self.queries: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None

    async def resolve(self, qname: Any, rdtype: Any, **options: Any) -> Any:
        assert options == {"search": False, "raise_on_no_answer": False}
        name, kind = str(qname), dns.rdatatype.to_text(rdtype)
        assert name.endswith("."), "queries are for absolute names"
        self.queries.append((name[:-1], kind))
        if self.gate is not None:
            await self.gate.wait()
        entry = self.table.get(name[:-1])
        if isinstance(entry, BaseException):
            raise entry
        if entry is None:
            raise dns.resolver.NXDOMAIN()
        addresses, ttl = entry.get(kind, ([], None))
        rrset = [SimpleNamespace(address=a) for a in addresses] or None
        return SimpleNamespace(rrset=rrset, chaining_result=SimpleNamespace(minimum_ttl=ttl))


def cache(table: dict[str, Any], clock: Clock, **kwargs: Any) -> tuple[ResolverCache, FakeResolver]:
    fake = FakeResolver(table)
    resolver = cast(dns.asyncresolver.Resolver, fake)
    return ResolverCache(resolver, clock=clock, **kwargs), fake


def addresses(*texts: str) -> frozenset[Any]:
    return frozenset(map(ipaddress.ip_address, texts))


TABLE = {
    "api.example.com": {"A": (["93.184.216.34"], 30), "AAAA": (["2606:2800::1"], 60)},
    "v4.example.com": {"A": (["93.184.216.35", "93.184.216.36"], 10)},
    "mapped.example.com": {"AAAA": (["::ffff:93.184.216.37"], 10)},
    "zero.example.com": {"A": (["93.184.216.38"], 0)},
}


def test_a_and_aaaa_together_kept_for_the_shortest_ttl() -> None:
    clock = Clock()
    names, fake = cache(TABLE, clock)

    async def scenario() -> None:
        both = addresses("93.184.216.34", "2606:2800::1")
        assert await names.addresses("api.example.com") == both
        assert fake.queries == [("api.example.com", "A"), ("api.example.com", "AAAA")]
        clock.now += 29.9
        assert await names.addresses("api.example.com") == both
        assert len(fake.queries) == 2  # cached: no query
        clock.now += 0.1
        assert await names.addresses("api.example.com") == both
        assert len(fake.queries) == 4  # expired at the A record's 30 s: asked again

    asyncio.run(scenario())
    assert names.lookups == 2


def test_a_changed_answer_is_seen_after_the_ttl() -> None:
    clock = Clock()
    table = dict(TABLE)
    names, _ = cache(table, clock)

    async def scenario() -> None:
        assert await names.addresses("v4.example.com") == addresses(
            "93.184.216.35", "93.184.216.36"
        )
        table["v4.example.com"] = {"A": (["93.184.216.99"], 10)}
        clock.now += 9
        assert await names.addresses("v4.example.com") == addresses(
            "93.184.216.35", "93.184.216.36"
        )
        clock.now += 1
        assert await names.addresses("v4.example.com") == addresses("93.184.216.99")

    asyncio.run(scenario())


def test_ipv4_mapped_answers_are_ipv4() -> None:
    names, _ = cache(TABLE, Clock())
    assert asyncio.run(names.addresses("mapped.example.com")) == addresses("93.184.216.37")


def test_a_zero_ttl_is_kept_for_the_minimum() -> None:
    clock = Clock()
    names, fake = cache(TABLE, clock)

    async def scenario() -> None:
        await names.addresses("zero.example.com")
        await names.addresses("zero.example.com")
        assert len(fake.queries) == 2
        clock.now += MIN_TTL
        await names.addresses("zero.example.com")
        assert len(fake.queries) == 4

    asyncio.run(scenario())


def test_no_address_is_an_empty_set_kept_for_the_negative_ttl() -> None:
    clock = Clock()
    names, fake = cache({"empty.example.com": {}}, clock)

    async def scenario() -> None:
        for name in ("nxdomain.example.com", "empty.example.com"):
            assert await names.addresses(name) == frozenset()
            assert await names.addresses(name) == frozenset()
        assert len(fake.queries) == 4
        clock.now += NEGATIVE_TTL
        assert await names.addresses("empty.example.com") == frozenset()
        assert len(fake.queries) == 6

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (dns.resolver.LifetimeTimeout(timeout=2.5, errors=[]), "no answer within 2.5 s"),
        (
            dns.resolver.NoNameservers(
                request=SimpleNamespace(question=["broken.example.com. IN A"]), errors=[]
            ),
            "All nameservers failed",
        ),
        (dns.exception.DNSException(), "DNSException"),
    ],
)
def test_failures_raise_and_are_not_cached(error: Exception, message: str) -> None:
    names, fake = cache({"broken.example.com": error}, Clock())

    async def scenario() -> None:
        for _ in range(2):
            with pytest.raises(ResolveError, match=message):
                await names.addresses("broken.example.com")
        assert len(fake.queries) == 4  # asked again each time

    asyncio.run(scenario())


def test_concurrent_connections_share_one_lookup() -> None:
    names, fake = cache(TABLE, Clock())

    async def scenario() -> None:
        fake.gate = asyncio.Event()
        waiting = [asyncio.create_task(names.addresses("api.example.com")) for _ in range(50)]
        await asyncio.sleep(0.01)
        fake.gate.set()
        results = await asyncio.gather(*waiting)
        assert len(set(results)) == 1
        assert len(fake.queries) == 2

    asyncio.run(scenario())
    assert names.lookups == 1


def test_a_cancelled_caller_does_not_cancel_the_shared_lookup() -> None:
    names, fake = cache(TABLE, Clock())

    async def scenario() -> None:
        fake.gate = asyncio.Event()
        first = asyncio.create_task(names.addresses("api.example.com"))
        second = asyncio.create_task(names.addresses("api.example.com"))
        await asyncio.sleep(0.01)
        first.cancel()  # e.g. its connection timed out
        await asyncio.sleep(0.01)
        fake.gate.set()
        assert await second == addresses("93.184.216.34", "2606:2800::1")
        assert first.cancelled()
        assert await names.addresses("api.example.com") == await second
        assert len(fake.queries) == 2

    asyncio.run(scenario())


def test_a_failed_lookup_with_every_caller_gone_leaves_no_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    names, fake = cache({"broken.example.com": dns.exception.DNSException()}, Clock())

    async def scenario() -> None:
        fake.gate = asyncio.Event()
        caller = asyncio.create_task(names.addresses("broken.example.com"))
        await asyncio.sleep(0.01)
        caller.cancel()
        fake.gate.set()
        await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert "exception was never retrieved" not in caplog.text


def test_the_number_of_names_is_bounded() -> None:
    clock = Clock()
    table = {f"n{i}.example.com": {"A": ([f"93.184.216.{i}"], 100 + i)} for i in range(10)}
    names, fake = cache(table, clock, max_entries=4)

    async def scenario() -> None:
        for i in range(10):
            await names.addresses(f"n{i}.example.com")
        assert len(fake.queries) == 20
        for i in range(6, 10):  # the newest four are still cached
            await names.addresses(f"n{i}.example.com")
        assert len(fake.queries) == 20
        await names.addresses("n0.example.com")  # evicted: asked again
        assert len(fake.queries) == 22

    asyncio.run(scenario())


def test_from_system_reads_a_resolv_conf(tmp_path: Any) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.53\nnameserver 2001:db8::53\noptions timeout:9\n")
    names = ResolverCache.from_system(3.0, str(conf))
    assert names.nameservers == ["192.0.2.53", "2001:db8::53"]


def test_from_system_without_a_resolver(tmp_path: Any) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# nothing\n")
    with pytest.raises(ResolveError, match="no resolver in"):
        ResolverCache.from_system(3.0, str(conf))
    with pytest.raises(ResolveError, match="no resolver in"):
        ResolverCache.from_system(3.0, str(tmp_path / "missing"))
