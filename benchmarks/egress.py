"""The cost of --allow-host: connection rate through the transparent pair, with and without it.

Two network namespaces made here and removed afterwards (needs root, iproute2, iptables,
dnsmasq), linked by emulated vsock:

    enclave: the load generator, iptables REDIRECT of SERVER to ip-to-vsock-transparent
    host:    vsock-to-ip-transparent, the echo server at SERVER, dnsmasq on 127.0.0.1
             answering NAME -> SERVER (TTL 300 s; the host's resolv.conf points at it)

Each connection: connect, send a request, have it echoed, close (benchmarks/loadgen.py rate,
64 at once). Three setups, alternating run by run so that they share the machine's moods:

    plain      vsock-to-ip-transparent with no flags; the request: an HTTP request head
    http       --allow-host NAME; the same request, whose Host is NAME
    tls        --allow-host NAME; the request: a real ClientHello for NAME (517 bytes)

The figures: connections per second, and the DNS queries dnsmasq answered during the runs
(a cached name costs no round trip: one query pair per TTL, not per connection).

    python -m benchmarks.egress [--seconds S] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import ssl
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

from tests.integration.dnsserver import dnsmasq
from tests.integration.egress import resolv_conf
from tests.integration.namespaced import enclave_namespace, proxy, redirect
from tests.netns import Netns, netns

SERVER = "11.22.41.10"  # on the host namespace's lo only
PORT = 8443
NAME = "bench.example.com"
SETUPS = ("plain", "http", "tls")
CONCURRENCY = 64


def client_hello(name: str) -> bytes:
    """A real ClientHello (OpenSSL via Python's ssl, through a memory BIO)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _loadgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.loadgen", *args]


@contextmanager
def namespaces(workdir: Path) -> Iterator[tuple[Netns, Netns]]:
    """The enclave (REDIRECT of SERVER) and the host (the echo server at SERVER:PORT, dnsmasq
    answering NAME -> SERVER, resolv.conf pointing at it); also used by benchmarks/explicit.py."""
    with ExitStack() as stack:
        enclave = stack.enter_context(netns("pfp-bench-egress-enclave"))
        host = stack.enter_context(netns("pfp-bench-egress-host"))
        for ns in (enclave, host):
            # Thousands of connections a second between the same two addresses: without reuse
            # of TIME_WAIT ports the second run starves for ephemeral ports.
            ns.run("sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
            ns.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000")
            # ...but never the listeners' ports: a client's TIME_WAIT there (its sockets have
            # no SO_REUSEADDR) made the next setup's listener fail with EADDRINUSE.
            ns.run("sysctl", "-qw", "net.ipv4.ip_local_reserved_ports=1200,3128-3129,8888")
        enclave_namespace(enclave)
        redirect(enclave, SERVER)
        host.run("ip", "addr", "add", f"{SERVER}/32", "dev", "lo")
        echo = host.popen(
            _loadgen("echo", "--address", SERVER, "--port", str(PORT), "--lifetime", "900"),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert echo.stdout is not None and "listening" in echo.stdout.readline()
        stack.enter_context(dnsmasq(host, "127.0.0.1", workdir, hosts={NAME: [SERVER]}, ttl=300))
        stack.enter_context(resolv_conf(host, "nameserver 127.0.0.1\n"))
        yield enclave, host


def _rate(enclave: Netns, request: Path, seconds: float) -> dict[str, float]:
    args = ["rate", "--address", SERVER, "--port", str(PORT), "--request-file", str(request)]
    args += ["--concurrency", str(CONCURRENCY), "--duration", f"{seconds:g}"]
    done = subprocess.run(
        enclave.command(_loadgen(*args)),
        capture_output=True,
        text=True,
        timeout=seconds + 90,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


@dataclass(frozen=True)
class Result:
    runs: dict[str, list[float]]  # setup -> connections/s of each run
    failed: dict[str, float]  # setup -> failed connections over every run
    a_queries: int  # A queries for NAME that dnsmasq answered over every run with --allow-host
    starts_with_names: int  # vsock-to-ip-transparent processes started with --allow-host

    @property
    def median(self) -> dict[str, float]:
        return {setup: median(values) for setup, values in self.runs.items()}


def measure(seconds: float = 3.0, runs: int = 3) -> Result:
    """Connections/s per setup, failures, and DNS queries."""
    rates: dict[str, list[float]] = defaultdict(list)
    failed: dict[str, float] = defaultdict(float)
    queries = 0
    with tempfile.TemporaryDirectory(prefix="pfp-bench-egress-") as tmp:
        workdir = Path(tmp)
        vsock_dir = workdir / "vsock"
        vsock_dir.mkdir()
        env = {"PF_PROXY_VSOCK_DIR": str(vsock_dir)}
        requests = {
            "plain": workdir / "http.req",
            "http": workdir / "http.req",
            "tls": workdir / "hello.bin",
        }
        head = f"GET / HTTP/1.1\r\nHost: {NAME}\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
        requests["http"].write_bytes(head.encode())
        requests["tls"].write_bytes(client_hello(NAME))
        with namespaces(workdir) as (enclave, host):
            dns_log = next(workdir.glob("dnsmasq-*.log"))
            for run in range(runs):
                for setup in SETUPS:
                    flags = [] if setup == "plain" else ["--allow-host", NAME]
                    with (
                        proxy(
                            host, "vsock-to-ip-transparent", "-v", "88:1200", *flags,
                            log_dir=workdir, env=env,
                        ),
                        proxy(
                            enclave, "ip-to-vsock-transparent", "-i", "127.0.0.1:1200",
                            "-v", "88:1200", log_dir=workdir, env=env,
                        ),
                    ):  # fmt: skip
                        before = dns_log.read_text().count(f"query[A] {NAME}")
                        result = _rate(enclave, requests[setup], seconds)
                        queries += dns_log.read_text().count(f"query[A] {NAME}") - before
                    rates[setup].append(result["connections_per_s"])
                    failed[setup] += result["failed"]
                    print(
                        f"egress run {run + 1} {setup}: {result['connections_per_s']:.0f}/s "
                        f"({result['failed']:.0f} failed)",
                        file=sys.stderr,
                        flush=True,
                    )
                time.sleep(0.5)
    return Result(dict(rates), dict(failed), queries, 2 * runs)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.egress", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    result = measure(args.seconds, args.runs)
    print(json.dumps({"median": result.median, **asdict(result)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
