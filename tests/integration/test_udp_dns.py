"""DNS for an enclave through udp-to-vsock and vsock-to-udp, with a real DNS server and real
clients, in network namespaces.

    enclave (lo only)                    host                         internet
    dig, getent, getaddrinfo             vsock-to-udp -v 3:53   --veth-- dnsmasq on DNS_SERVER:53
      -> 127.0.0.1:53 udp-to-vsock  ==vsock==>       -i DNS_SERVER:53
      -> 127.0.0.1:53 ip-to-vsock   ==vsock==> vsock-to-ip -v 3:5353 (DNS over TCP, for answers
                                                -i DNS_SERVER:53        truncated over UDP)

The enclave's /etc/resolv.conf (through /etc/netns/<enclave>/resolv.conf) names 127.0.0.1, so
the system resolver itself (glibc's stub, a new source port for every lookup) goes through the
pair. Over emulated vsock here, over real AF_VSOCK in the guest stage.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.dnsserver import DnsServer, dnsmasq
from tests.integration.namespaced import NsProxy, enclave_namespace, etc_file, proxy
from tests.netns import Netns, netns, veth
from tests.vsocks import SLOWDOWN, Vsock

pytestmark = [pytest.mark.root, pytest.mark.vsock, pytest.mark.timeout(300)]

HOST = "198.51.100.1"
DNS_SERVER = "198.51.100.53"
HOSTS = {"api.example.com": ["192.0.2.80", "2001:db8::80"], "www.example.com": ["192.0.2.81"]}
# An answer of several KiB: 15 strings of 250 bytes (about 3.8 KiB with EDNS0, 4,096 allowed).
BIG_TXT = [chr(ord("a") + n) * 250 for n in range(15)]
DIG_WAIT = f"+time={int(5 * SLOWDOWN)}"


@dataclass
class Dns:
    enclave: Netns
    host: Netns
    server: DnsServer
    udp_to_vsock: NsProxy
    vsock_to_udp: NsProxy
    ip_to_vsock: NsProxy
    vsock_to_ip: NsProxy

    def dig(self, *args: str) -> str:
        done = self.enclave.run("dig", "@127.0.0.1", DIG_WAIT, "+tries=1", *args, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout


@pytest.fixture
def dns(vsock_link: Vsock, tmp_path: Path) -> Iterator[Dns]:
    env = vsock_link.env
    with ExitStack() as stack:
        enclave = stack.enter_context(netns("pfp-dns-enclave"))
        host = stack.enter_context(netns("pfp-dns-host"))
        internet = stack.enter_context(netns("pfp-dns-inet"))
        enclave_namespace(enclave)
        veth(host, "eth0", internet, "eth0")
        host.run("ip", "addr", "add", f"{HOST}/24", "dev", "eth0")
        internet.run("ip", "addr", "add", f"{DNS_SERVER}/24", "dev", "eth0")
        server = stack.enter_context(
            dnsmasq(internet, DNS_SERVER, tmp_path, hosts=HOSTS, txt={"big.example.com": BIG_TXT})
        )
        run = [
            (host, "vsock-to-udp", "-v", vsock_link.listen_address(53, cid=3), "-i",
             f"{DNS_SERVER}:53"),
            (host, "vsock-to-ip", "-v", vsock_link.listen_address(5353, cid=3), "-i",
             f"{DNS_SERVER}:53"),
            (enclave, "udp-to-vsock", "-i", "127.0.0.1:53", "-v", vsock_link.address(53, cid=3)),
            (enclave, "ip-to-vsock", "-i", "127.0.0.1:53", "-v", vsock_link.address(5353, cid=3)),
        ]  # fmt: skip
        started = [
            stack.enter_context(proxy(ns, *args, log_dir=tmp_path, env=env)) for ns, *args in run
        ]
        yield Dns(enclave, host, server, started[2], started[0], started[3], started[1])


def test_dig_gets_every_kind_of_answer_through_the_pair(dns: Dns) -> None:
    assert dns.dig("api.example.com", "A", "+short").split() == ["192.0.2.80"]
    assert dns.dig("api.example.com", "AAAA", "+short").split() == ["2001:db8::80"]
    missing = dns.dig("nothing.example.com", "A")
    assert "status: NXDOMAIN" in missing
    big = dns.dig("big.example.com", "TXT", "+bufsize=4096", "+ignore")
    assert "flags: qr aa rd ra" in big or "flags: qr aa rd" in big  # not truncated (no tc)
    assert " tc" not in big.split("flags:")[1].split(";")[0]
    size = int(re.search(r"MSG SIZE\s+rcvd: (\d+)", big).group(1))  # type: ignore[union-attr]
    assert size > 3500, big
    texts = re.findall(r'"([a-z]+)"', big)
    assert texts == BIG_TXT, big[:2000]
    for proxy_ in (dns.udp_to_vsock, dns.vsock_to_udp):
        assert "ERROR" not in proxy_.stderr, proxy_.stderr


def test_a_truncated_answer_is_retried_over_tcp_through_the_tcp_pair(dns: Dns) -> None:
    """Without EDNS0 a UDP answer stops at 512 bytes: dnsmasq sets TC, dig asks again over
    TCP, which goes through ip-to-vsock and vsock-to-ip on vsock port 5353."""
    answer = dns.dig("big.example.com", "TXT", "+noedns")
    assert ";; Truncated, retrying in TCP mode." in answer
    assert re.findall(r'"([a-z]+)"', answer) == BIG_TXT
    dns.vsock_to_ip.wait_for(f"Proxying to: {DNS_SERVER}:53")
    dns.ip_to_vsock.wait_for("ip to vsock IO copy done, from 127.0.0.1:")


def test_the_system_resolver_goes_through_the_pair(dns: Dns) -> None:
    """glibc's stub resolver, with the enclave's resolv.conf naming 127.0.0.1: getent (every
    lookup from a new source port) and Python's getaddrinfo.

    With AI_ADDRCONFIG (getent ahosts, and many programs) glibc looks a name up only for a
    family with an address other than loopback: an enclave with only 127.0.0.1 and ::1 gets
    "not found" without a query. A non-loopback address on lo (as the raw set-up has) is
    enough."""
    with etc_file(dns.enclave, "resolv.conf", "nameserver 127.0.0.1\noptions timeout:5\n"):
        hosts = dns.enclave.run("getent", "hosts", "api.example.com").stdout.split()
        assert hosts[0] in ("192.0.2.80", "2001:db8::80") and "api.example.com" in hosts
        script = (
            "import socket\n"
            "infos = socket.getaddrinfo('api.example.com', 443, type=socket.SOCK_STREAM)\n"
            "print(sorted({info[4][0] for info in infos}))\n"
        )
        looked_up = dns.enclave.run("python3", "-c", script).stdout.strip()
        assert looked_up == "['192.0.2.80', '2001:db8::80']"
        missing = dns.enclave.run("getent", "hosts", "nothing.example.com", check=False)
        assert missing.returncode == 2 and not missing.stdout  # NXDOMAIN: not found

        unasked = dns.enclave.run("getent", "ahostsv4", "www.example.com", check=False)
        assert unasked.returncode == 2 and "www.example.com" not in dns.server.log
        dns.enclave.run("ip", "addr", "add", "10.88.0.1/32", "dev", "lo")
        dns.enclave.run("ip", "addr", "add", "fd00:88::1/128", "dev", "lo")
        v4 = dns.enclave.run("getent", "ahostsv4", "www.example.com").stdout
        assert "192.0.2.81" in v4
        v6 = dns.enclave.run("getent", "ahostsv6", "api.example.com").stdout
        assert "2001:db8::80" in v6
    assert dns.server.log.count("query[") >= 6, dns.server.log
    for proxy_ in (dns.udp_to_vsock, dns.vsock_to_udp):
        assert "ERROR" not in proxy_.stderr, proxy_.stderr


def test_a_host_name_upstream_is_resolved_per_stream_each_address_in_turn(
    dns: Dns, vsock_link: Vsock, tmp_path: Path
) -> None:
    """vsock-to-udp -i resolver.test:53, whose first address refuses (nothing listens on
    port 53 at ::1 in the host namespace: ICMP port unreachable) and whose second is the DNS
    server: the flow moves on to the next address and the lookup is answered."""
    hosts = f"::1 resolver.test\n{DNS_SERVER} resolver.test\n"
    with (
        etc_file(dns.host, "hosts", hosts),
        proxy(
            dns.host, "vsock-to-udp", "-v", vsock_link.listen_address(5354, cid=3), "-i",
            "resolver.test:53", log_dir=tmp_path, env=vsock_link.env,
        ) as by_name,
        proxy(
            dns.enclave, "udp-to-vsock", "-i", "127.0.0.1:5354", "-v",
            vsock_link.address(5354, cid=3), log_dir=tmp_path, env=vsock_link.env,
        ),
    ):  # fmt: skip
        order = dns.host.run("getent", "ahosts", "resolver.test").stdout.split()
        answer = dns.enclave.run(
            "dig", "@127.0.0.1", "-p", "5354", DIG_WAIT, "+tries=1", "+short", "api.example.com"
        ).stdout
        assert answer.split() == ["192.0.2.80"]
        if order[0] == "::1":
            by_name.wait_for(
                "resolver.test:53 ([::1]:53) is unreachable: [Errno 111] Connection refused "
                f"(ICMP port unreachable); trying resolver.test:53 ({DNS_SERVER}:53)",
                stream="stderr",
            )
