"""A real DNS server for tests: dnsmasq in a network namespace, answering only its own records.

    with dnsmasq(ns, "192.0.2.53", log_dir, hosts={"api.example.com": ["192.0.2.80"]},
                 txt={"big.example.com": ["x" * 255] * 20}, ttl=5) as server:
        ...
        server.set_hosts({"api.example.com": ["192.0.2.81"]})   # a changed answer (SIGHUP)

It asks no upstream (`--no-resolv`), reads no /etc/hosts, and listens on the given address,
UDP and TCP port 53 (or `port`). Names it does not know get NXDOMAIN. Host records come from a
hosts file it rereads on SIGHUP, with `ttl` seconds as their TTL; TXT records are fixed at
start (each string at most 255 bytes, without commas; several strings make one large
answer). The process runs in the namespace and is stopped by pid when the block ends (and
with the namespace anyway).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.netns import Netns


@dataclass
class DnsServer:
    ns: Netns
    address: str
    port: int
    process: subprocess.Popen[bytes]
    hosts_file: Path
    log_path: Path

    def set_hosts(self, hosts: dict[str, list[str]]) -> None:
        """Replace the host records and make dnsmasq reread them (its cache is cleared)."""
        _write_hosts(self.hosts_file, hosts)
        os.kill(self.process.pid, signal.SIGHUP)
        time.sleep(0.2)  # dnsmasq rereads on its next turn; queries after this see the change

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _write_hosts(path: Path, hosts: dict[str, list[str]]) -> None:
    lines = [f"{address} {name}" for name, addresses in hosts.items() for address in addresses]
    path.write_text("\n".join(lines) + "\n")


@contextmanager
def dnsmasq(
    ns: Netns,
    address: str,
    log_dir: Path,
    *,
    hosts: dict[str, list[str]] | None = None,
    txt: dict[str, list[str]] | None = None,
    ttl: int = 60,
    port: int = 53,
) -> Iterator[DnsServer]:
    """dnsmasq serving `hosts` (name -> IPv4/IPv6 addresses) and `txt` (name -> strings) on
    `address`:`port` in `ns`; waits until it answers."""
    stem = log_dir / f"dnsmasq-{ns.name}-{time.monotonic_ns()}"
    hosts_file = stem.with_suffix(".hosts")
    _write_hosts(hosts_file, hosts or {})
    log_path = stem.with_suffix(".log")
    args = [
        "dnsmasq",
        "--keep-in-foreground",
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        f"--addn-hosts={hosts_file}",
        f"--local-ttl={ttl}",
        f"--listen-address={address}",
        "--bind-interfaces",
        f"--port={port}",
        "--user=root",
        "--pid-file=",
        "--log-queries",
        f"--log-facility={log_path}",
        "--edns-packet-max=4096",
        "--local=/#/",  # every name is local: unknown ones are NXDOMAIN, nothing is forwarded
    ]
    for name, strings in (txt or {}).items():
        # No quotes: on its command line dnsmasq would keep them as part of each string.
        assert not any("," in text for text in strings), "a TXT string with a comma"
        args.append(f"--txt-record={name},{','.join(strings)}")
    # Not a pipe: in the foreground dnsmasq logs every query to stderr too, and an unread pipe
    # fills after a few hundred queries and stops it.
    with open(stem.with_suffix(".err"), "wb") as errors:
        process = ns.popen(args, stdout=subprocess.DEVNULL, stderr=errors)
    server = DnsServer(ns, address, port, process, hosts_file, log_path)
    try:
        _wait_until_answering(server)
        yield server
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


def _wait_until_answering(server: DnsServer, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    at = f"@{server.address}"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            err = server.log_path.with_suffix(".err").read_text(errors="replace")
            raise RuntimeError(f"dnsmasq exited {server.process.returncode}: {err}")
        probe = server.ns.run(
            "dig", at, "-p", str(server.port), "+time=1", "+tries=1", "+short",
            "probe.invalid", check=False,
        )  # fmt: skip
        if probe.returncode == 0:  # any answer, NXDOMAIN included
            return
        time.sleep(0.1)
    raise RuntimeError(f"dnsmasq on {server.address}:{server.port} did not answer in {timeout} s")
