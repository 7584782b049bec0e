"""The tuna images' raw-proxy deployment, built in network namespaces for tests and benchmarks.

    internet (S)  --veth, MTU 9001--  host (eth0: X)  ==vsock==  enclave (lo: X)

- "enclave": only ``lo``, MTU 9001, carrying the shared address X, default route
  ``dev lo src X``; the nat-free OUTPUT rule of ``reference.md`` (ipsets ``portfilter`` and
  ``internal``) queues its outgoing TCP to nfqueue 0. ``ip-to-vsock-raw-outgoing`` sends the
  queue to the host, ``vsock-to-ip-raw-incoming`` writes the host's packets into ``lo``.
- "host": ``eth0`` with X, INPUT rules queueing TCP to ports 80, 443 and 1024:61439 to
  nfqueue 0. ``ip-to-vsock-raw-incoming`` sends the queue to the enclave,
  ``vsock-to-ip-raw-outgoing`` (finding ``eth0`` by itself) sends the enclave's packets out.
- "internet": the other end of the veth, address S, and a second address in a reserved range.

The vsock between host and enclave is the emulation (CIDs 3 and 88, port 1200 both ways, as
deployed), or real AF_VSOCK in the guest stage (one kernel: both listeners on VMADDR_CID_ANY,
reached at CID 1, so the two links take ports 1200 and 1201).

X and S are outside the reserved list (they must be, to pass the outgoing filter). That is safe
only because these three namespaces are linked to each other and to nothing else: build()
asserts that no interface leads out of them and no route points anywhere else.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.namespaced import WAIT, NsProxy
from tests.netns import Netns, netns, veth
from tests.vsocks import Vsock, vsock_under_test

MiB = 1 << 20
MTU = 9001
SHARED = "11.22.33.1"  # X: the host's eth0 and the enclave's lo (see the module docstring)
SERVER = "11.22.33.2"  # S: the internet namespace
RESERVED_SERVER = "10.99.0.2"  # in 10.0.0.0/8: the enclave must never reach it
RESERVED_RANGES = (  # reference.md's list, as the enclave's `internal` ipset holds it
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "233.252.0.0/24", "240.0.0.0/4",
    "255.255.255.255/32",
)  # fmt: skip
ENCLAVE_CID, HOST_CID, LINK_PORT = 88, 3, 1200


@dataclass
class Deployment:
    enclave: Netns
    host: Netns
    internet: Netns
    vsock: Vsock
    log_dir: Path
    ip_file: Path
    proxies: dict[str, NsProxy]
    extra_args: dict[str, list[str]] = field(default_factory=dict)  # per command, appended

    @property
    def env(self) -> dict[str, str]:
        return self.vsock.env

    @property
    def to_host(self) -> tuple[str, str]:
        """The enclave->host link: (the host's listening address, the address dialled)."""
        return (
            self.vsock.listen_address(LINK_PORT, HOST_CID),
            self.vsock.address(LINK_PORT, HOST_CID),
        )

    @property
    def to_enclave(self) -> tuple[str, str]:
        """The host->enclave link, likewise (port 1201 over real vsock: one kernel)."""
        port = LINK_PORT + 1 if self.vsock.real else LINK_PORT
        return (
            self.vsock.listen_address(port, ENCLAVE_CID),
            self.vsock.address(port, ENCLAVE_CID),
        )

    def start(self, command: str) -> NsProxy:
        """Start one of the four proxies where it runs in the tuna images."""
        ns, args = self.where(command)
        args = [command, *args, "--stats-interval", "0.5", *self.extra_args.get(command, [])]
        running = NsProxy(ns, args, self.log_dir, self.env)
        running.wait_for("Listening on:")
        if command.startswith("ip-to-vsock"):
            running.wait_for("Connected to vsock")
        self.proxies[command] = running
        return running

    def where(self, command: str) -> tuple[Netns, list[str]]:
        return {
            "vsock-to-ip-raw-outgoing": (self.host, ["-v", self.to_host[0]]),
            "vsock-to-ip-raw-incoming": (
                self.enclave,
                ["-v", self.to_enclave[0], "-d", "lo", "--ip-file", str(self.ip_file)],
            ),
            "ip-to-vsock-raw-outgoing": (self.enclave, ["-v", self.to_host[1], "-q", "0"]),
            "ip-to-vsock-raw-incoming": (self.host, ["-v", self.to_enclave[1], "-q", "0"]),
        }[command]

    def kill(self, command: str) -> None:
        running = self.proxies.pop(command)
        os.kill(running.process.pid, signal.SIGKILL)
        running.process.wait(WAIT)


def _json(ns: Netns, *args: str) -> list[dict[str, Any]]:
    return json.loads(ns.run("ip", "-j", *args).stdout or "[]")  # type: ignore[no-any-return]


def assert_isolated(namespaces: dict[str, Netns], allowed_links: dict[str, set[str]]) -> None:
    """Every interface of the test's namespaces is `lo` or a veth whose peer is in one of
    them, and no route leads anywhere else: nothing here can reach the outside world."""
    ours = {ns.name for ns in namespaces.values()}
    for name, ns in namespaces.items():
        links = _json(ns, "link", "show")
        assert {link["ifname"] for link in links} == allowed_links[name], links
        peer_names = {entry["nsid"]: entry.get("name") for entry in _json(ns, "netns", "list-id")}
        for link in links:
            if link["ifname"] != "lo":
                assert peer_names.get(link.get("link_netnsid")) in ours, (name, link, peer_names)
        for route in _json(ns, "route", "show"):
            if route["dst"] == "default":
                assert (name, route["dev"]) == ("enclave", "lo"), route
            assert route["dev"] in allowed_links[name], route


def _ipset(ns: Netns, *args: str) -> None:
    ns.run("ipset", *args)


def build(
    stack: ExitStack, tmp: Path, enclave_rule: str = "deployed", vsock: Vsock | None = None
) -> Deployment:
    """The three namespaces, their addresses, routes and iptables rules as deployed; the
    emulation unless `vsock` says otherwise."""
    enclave = stack.enter_context(netns("pfp-raw-enclave"))
    host = stack.enter_context(netns("pfp-raw-host"))
    internet = stack.enter_context(netns("pfp-raw-inet"))
    veth(host, "eth0", internet, "eth0", mtu=MTU)
    host.run("ip", "addr", "add", f"{SHARED}/24", "dev", "eth0")
    internet.run("ip", "addr", "add", f"{SERVER}/24", "dev", "eth0")
    host.run("ip", "addr", "add", "10.99.0.1/24", "dev", "eth0")
    internet.run("ip", "addr", "add", f"{RESERVED_SERVER}/24", "dev", "eth0")

    enclave.run("ip", "link", "set", "lo", "mtu", str(MTU))
    enclave.run("ip", "addr", "add", f"{SHARED}/32", "dev", "lo")
    enclave.run("ip", "route", "add", "default", "dev", "lo", "src", SHARED)
    _ipset(enclave, "create", "portfilter", "bitmap:port", "range", "0-65535")
    for ports in ("80", "443", "1024-61439"):
        _ipset(enclave, "add", "portfilter", ports)
    _ipset(enclave, "create", "internal", "hash:net")
    for network in RESERVED_RANGES:
        _ipset(enclave, "add", "internal", network)
    if enclave_rule == "deployed":
        match = ["-m", "set", "--match-set", "portfilter", "src",
                 "-m", "set", "!", "--match-set", "internal", "dst"]  # fmt: skip
    else:  # queue all of the enclave's TCP: only the proxy's own filter stands in the way
        match = []
    enclave.run("iptables", "-A", "OUTPUT", "-p", "tcp", "-s", SHARED, *match,
                "-j", "NFQUEUE", "--queue-num", "0")  # fmt: skip
    for ports in ("80", "443", "1024:61439"):
        host.run("iptables", "-A", "INPUT", "-i", "eth0", "-p", "tcp", "--dport", ports,
                 "-j", "NFQUEUE", "--queue-num", "0")  # fmt: skip

    assert_isolated(
        {"enclave": enclave, "host": host, "internet": internet},
        {"enclave": {"lo"}, "host": {"lo", "eth0"}, "internet": {"lo", "eth0"}},
    )

    if vsock is None:
        vsock = stack.enter_context(vsock_under_test())
    ip_file = tmp / "ip.txt"
    ip_file.write_text(f"{SHARED}\n")
    return Deployment(enclave, host, internet, vsock, tmp, ip_file, {})


@contextmanager
def deployment(
    tmp: Path,
    enclave_rule: str = "deployed",
    vsock: Vsock | None = None,
    extra_args: dict[str, list[str]] | None = None,
) -> Iterator[Deployment]:
    with ExitStack() as stack:
        deployed = build(stack, tmp, enclave_rule, vsock)
        deployed.extra_args = extra_args or {}
        try:
            for command in (
                "vsock-to-ip-raw-outgoing",
                "vsock-to-ip-raw-incoming",
                "ip-to-vsock-raw-outgoing",
                "ip-to-vsock-raw-incoming",
            ):
                deployed.start(command)
            yield deployed
        finally:
            codes = {name: running.stop() for name, running in deployed.proxies.items()}
            assert all(code == 0 for code in codes.values()), codes
            for name, running in deployed.proxies.items():  # SIGTERM: counters, then exit 0
                after_stop = running.stdout.partition("INFO Shutting down\n")[2]
                assert f"INFO {name}: forwarded " in after_stop, running.stdout
