"""The transparent pair with names: an enclave, a host and an "internet" of TLS servers and DNS.

    enclave (lo only)  ==vsock==  host  --veth--  internet

- "internet": `eth0` at INTERNET (its side of the veth), the servers' addresses on `lo`
  (SERVERS), on each an `openssl s_server -WWW` on port 443 and a `python3 -m http.server` on
  port 80, each serving `id.txt` = "server <address>", with one certificate for every name in
  NAMES (signed by a CA made here); dnsmasq on INTERNET answering NAMES (test records only).
- "host": `eth0` at HOST, a route to the servers; /etc/netns/<host>/resolv.conf points at the
  dnsmasq (`ip netns exec` mounts it over /etc/resolv.conf for every process started in the
  namespace); `vsock-to-ip-transparent` with the flags the caller gives.
- "enclave": only `lo`, iptables REDIRECT of the servers' range (and of 169.254.169.254) to
  `ip-to-vsock-transparent` on port 1200. It has no DNS: clients name the address themselves
  (`curl --resolve NAME:443:ADDRESS`), exactly what an enclave's client may lie about.

The three namespaces are linked to each other and to nothing else (asserted, as in tuna.py).
`network()` builds them without the pair or the enclave's redirects, for other proxies
(test_explicit_proxy.py).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.integration.dnsserver import DnsServer, dnsmasq
from tests.integration.namespaced import (
    WAIT,
    NsProxy,
    enclave_namespace,
    in_netns,
    proxy,
    redirect,
)
from tests.integration.tuna import assert_isolated
from tests.netns import Netns, netns, veth
from tests.vsocks import Vsock

HOST = "11.22.40.1"  # the host's eth0
INTERNET = "11.22.40.2"  # the internet's eth0: dnsmasq listens here
SERVERS = ("11.22.41.10", "11.22.41.11", "11.22.41.12")  # on the internet's lo
SERVER_RANGE = "11.22.41.0/24"
METADATA = "169.254.169.254"  # on the host's lo, with a listener nothing may reach
# name -> address, as dnsmasq answers them
NAMES = {
    "api.example.org": SERVERS[0],
    "other.example.org": SERVERS[0],  # the same server, a name no pattern allows
    "www.example.com": SERVERS[1],
    "a.b.example.com": SERVERS[1],
    "example.com": SERVERS[1],
    "example.com.evil.net": SERVERS[2],
    "notexample.com": SERVERS[2],
    "moving.example.com": SERVERS[1],
}


@dataclass
class Network:
    """The three namespaces, the servers, the CA their certificate is signed by, dnsmasq."""

    enclave: Netns
    host: Netns
    internet: Netns
    log_dir: Path
    ca: Path
    cert: Path
    key: Path
    dns: DnsServer


@dataclass
class World:
    enclave: Netns
    host: Netns
    internet: Netns
    vsock: Vsock
    log_dir: Path
    ca: Path
    dns: DnsServer
    inner: NsProxy  # vsock-to-ip-transparent, in the host
    outer: NsProxy  # ip-to-vsock-transparent, in the enclave

    def curl(
        self, url: str, *resolve: str, timeout: float = WAIT
    ) -> subprocess.CompletedProcess[str]:
        """curl in the enclave; `resolve`: NAME:PORT:ADDRESS entries (the enclave has no DNS)."""
        args = ["curl", "-sS", "--max-time", f"{timeout:g}", "--cacert", str(self.ca)]
        for entry in resolve:
            args += ["--resolve", entry]
        return self.enclave.run(*args, url, check=False, timeout=timeout + 10)

    def queries(self, name: str, kind: str = "A") -> int:
        """How many queries of `kind` for `name` dnsmasq has answered so far."""
        return self.dns.log.count(f"query[{kind}] {name} from {HOST}")


class Listener:
    """A listener in `ns` nothing may reach: counts what connected."""

    def __init__(self, ns: Netns, address: str, port: int) -> None:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(16)
            sock.setblocking(False)
            return sock

        self.sock = in_netns(ns, make)

    def was_connected(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True


def _certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for every name in NAMES, signed by it."""
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    openssl = ["openssl"]
    subprocess.run(
        [*openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=pf-proxy test CA"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [*openssl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", csr, "-subj", "/CN=pf-proxy test server"],
        check=True, capture_output=True,
    )  # fmt: skip
    names = ",".join(f"DNS:{name}" for name in NAMES)
    extensions = directory / "server.ext"
    extensions.write_text(f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n")
    subprocess.run(
        [*openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", extensions],
        check=True, capture_output=True,
    )  # fmt: skip
    return ca, cert, key


def wait_listening(ns: Netns, address: str, port: int) -> None:
    deadline = time.monotonic() + WAIT
    while f"{address}:{port} " not in ns.run("ss", "-Hltn").stdout:
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {address}:{port} in {ns.name}")
        time.sleep(0.05)


def _servers(internet: Netns, log_dir: Path, cert: Path, key: Path) -> None:
    """On each server address: s_server -WWW on 443 and http.server on 80, serving id.txt."""
    for address in SERVERS:
        root = log_dir / f"www-{address}"
        root.mkdir()
        (root / "id.txt").write_text(f"server {address}\n")
        output = open(log_dir / f"s_server-{address}.log", "wb")  # noqa: SIM115
        internet.popen(
            ["openssl", "s_server", "-accept", f"{address}:443", "-cert", str(cert),
             "-key", str(key), "-WWW"],  # logs FILE:id.txt for each file served
            cwd=root, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        internet.popen(
            ["python3", "-m", "http.server", "80", "--bind", address, "--directory", str(root)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        output.close()
    for address in SERVERS:
        wait_listening(internet, address, 443)
        wait_listening(internet, address, 80)


@contextmanager
def resolv_conf(ns: Netns, text: str) -> Iterator[Path]:
    """/etc/netns/<ns>/resolv.conf: what processes started in `ns` see as /etc/resolv.conf."""
    directory = Path("/etc/netns") / ns.name
    directory.mkdir(parents=True)
    try:
        (directory / "resolv.conf").write_text(text)
        yield directory / "resolv.conf"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def network(
    log_dir: Path, *, ttl: int = 60, names: dict[str, str] = NAMES, prefix: str = "pfp-egress"
) -> Iterator[Network]:
    """The namespaces (the enclave with only lo, no redirect yet), the servers and dnsmasq,
    with the host resolving through it; no proxies."""
    with ExitStack() as stack:
        enclave = stack.enter_context(netns(f"{prefix}-enclave"))
        host = stack.enter_context(netns(f"{prefix}-host"))
        internet = stack.enter_context(netns(f"{prefix}-inet"))
        veth(host, "eth0", internet, "eth0")
        host.run("ip", "addr", "add", f"{HOST}/24", "dev", "eth0")
        host.run("ip", "route", "add", SERVER_RANGE, "via", INTERNET)
        host.run("ip", "addr", "add", f"{METADATA}/32", "dev", "lo")
        internet.run("ip", "addr", "add", f"{INTERNET}/24", "dev", "eth0")
        for address in SERVERS:
            internet.run("ip", "addr", "add", f"{address}/32", "dev", "lo")
        enclave_namespace(enclave)
        assert_isolated(
            {"enclave": enclave, "host": host, "internet": internet},
            {"enclave": {"lo"}, "host": {"lo", "eth0"}, "internet": {"lo", "eth0"}},
        )

        ca, cert, key = _certificate(log_dir)
        _servers(internet, log_dir, cert, key)
        hosts = {name: [address] for name, address in names.items()}
        dns = stack.enter_context(dnsmasq(internet, INTERNET, log_dir, hosts=hosts, ttl=ttl))
        stack.enter_context(resolv_conf(host, f"nameserver {INTERNET}\n"))
        yield Network(enclave, host, internet, log_dir, ca, cert, key, dns)


@contextmanager
def world(
    vsock: Vsock, log_dir: Path, *flags: str, ttl: int = 60, names: dict[str, str] = NAMES
) -> Iterator[World]:
    """Build the three namespaces, the servers, dnsmasq and the pair; `flags` go to
    vsock-to-ip-transparent."""
    with ExitStack() as stack:
        net = stack.enter_context(network(log_dir, ttl=ttl, names=names))
        redirect(net.enclave, SERVER_RANGE)
        redirect(net.enclave, METADATA)
        env = vsock.env
        inner = stack.enter_context(
            proxy(
                net.host, "vsock-to-ip-transparent", "-v", vsock.listen_address(1200), *flags,
                log_dir=log_dir, env=env,
            )
        )  # fmt: skip
        outer = stack.enter_context(
            proxy(
                net.enclave, "ip-to-vsock-transparent", "-i", "127.0.0.1:1200",
                "-v", vsock.address(1200), log_dir=log_dir, env=env,
            )
        )  # fmt: skip
        yield World(
            net.enclave, net.host, net.internet, vsock, log_dir, net.ca, net.dns, inner, outer
        )
