"""The raw path: iperf3 through the four raw proxies, against plain kernel routing.

Both in network namespaces made here and removed afterwards (needs root, iproute2, iptables,
ipset, iperf3), all at MTU 9001:

    raw       internet --veth-- host ==emulated vsock== enclave: the tuna deployment of
              tests/integration/tuna.py, the four raw proxies carrying every packet;
    routing   internet --veth-- host --veth-- enclave: the host forwards in the kernel.

"enclave -> internet" is iperf3 sending from the enclave (data through ip-to-vsock-raw-outgoing
and vsock-to-ip-raw-outgoing); "internet -> enclave" is iperf3 -R (data through the incoming
pair). Packets per second through ip-to-vsock-raw-outgoing come from its own counters over an
iperf3 run with a 1,400-byte MSS (small packets: the per-packet cost shows).
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.integration.tuna import MTU, SERVER, SHARED, deployment
from tests.netns import Netns, netns, veth

IPERF_PORT = 5201
ROUTED_ENCLAVE = "11.22.34.2"  # the routing reference's enclave address (namespaces only)


def iperf3_between(
    client: Netns, server: Netns, address: str, seconds: float, *extra: str
) -> dict[str, float]:
    """Run one iperf3 test from `client` to `address` in `server`; received Gbit/s and
    the sender's retransmits."""
    server_proc = server.popen(
        ["timeout", "120", "iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while f":{IPERF_PORT} " not in server.run("ss", "-ltn").stdout:
            if time.monotonic() > deadline:
                raise RuntimeError("iperf3 server did not start")
            time.sleep(0.05)
        done = client.run(
            "iperf3", "-c", address, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J", *extra,
            check=False, timeout=seconds + 60,
        )  # fmt: skip
        report = json.loads(done.stdout)
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        end = report["end"]
        return {
            "gbps": float(end["sum_received"]["bits_per_second"]) / 1e9,
            "retransmits": float(end["sum_sent"].get("retransmits", 0)),
        }
    finally:
        server_proc.wait(timeout=30)


@contextmanager
def routed() -> Iterator[tuple[Netns, Netns]]:
    """(enclave, internet) joined through a host namespace that routes in the kernel."""
    with ExitStack() as stack:
        enclave = stack.enter_context(netns("pfp-bench-enclave"))
        host = stack.enter_context(netns("pfp-bench-host"))
        internet = stack.enter_context(netns("pfp-bench-inet"))
        veth(host, "eth0", internet, "eth0", mtu=MTU)
        veth(host, "eth1", enclave, "eth0", mtu=MTU)
        host.run("ip", "addr", "add", f"{SHARED}/24", "dev", "eth0")
        host.run("ip", "addr", "add", "11.22.34.1/24", "dev", "eth1")
        internet.run("ip", "addr", "add", f"{SERVER}/24", "dev", "eth0")
        enclave.run("ip", "addr", "add", f"{ROUTED_ENCLAVE}/24", "dev", "eth0")
        enclave.run("ip", "route", "add", "default", "via", "11.22.34.1")
        internet.run("ip", "route", "add", "11.22.34.0/24", "via", SHARED)
        host.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield enclave, internet


def _forwarded_packets(stdout: str) -> int:
    counts = re.findall(r"forwarded (\d+) packets", stdout)
    return int(counts[-1]) if counts else 0


def measure(seconds: float) -> dict[str, dict[str, float]]:
    """One run of every raw-path figure: {setup: {figure: value}}."""
    results: dict[str, dict[str, float]] = {}
    with routed() as (enclave, internet):
        results["routing"] = {
            "out": iperf3_between(enclave, internet, SERVER, seconds)["gbps"],
            "in": iperf3_between(enclave, internet, SERVER, seconds, "-R")["gbps"],
        }
    with (
        tempfile.TemporaryDirectory(prefix="pfp-bench-raw-") as tmp,
        deployment(Path(tmp)) as deployed,
    ):
        out = iperf3_between(deployed.enclave, deployed.internet, SERVER, seconds)
        back = iperf3_between(deployed.enclave, deployed.internet, SERVER, seconds, "-R")
        queue_proxy = deployed.proxies["ip-to-vsock-raw-outgoing"]
        time.sleep(0.6)  # one more counters line (every 0.5 s)
        before = _forwarded_packets(queue_proxy.stdout)
        started = time.monotonic()
        small = iperf3_between(deployed.enclave, deployed.internet, SERVER, seconds, "-M", "1400")
        elapsed = time.monotonic() - started
        time.sleep(0.6)
        packets = _forwarded_packets(queue_proxy.stdout) - before
        results["raw"] = {
            "out": out["gbps"],
            "in": back["gbps"],
            "out_retransmits": out["retransmits"],
            "in_retransmits": back["retransmits"],
            "small_gbps": small["gbps"],
            "pps": packets / elapsed,
        }
    return results


if __name__ == "__main__":
    print(json.dumps(measure(3.0), indent=2))
