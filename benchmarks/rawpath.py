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

    python -m benchmarks.rawpath [--seconds S] [--runs N]      figures, medians of N runs
    python -m benchmarks.rawpath --profile DIR [--seconds S]   where the proxies spend time

``--profile`` runs iperf3 each way through the tuna deployment while py-spy samples the four
proxies (raw collapsed stacks in DIR, one file per proxy and direction) and prints each
proxy's CPU use and the lines where it spends most of its samples.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.integration.tuna import MTU, SERVER, SHARED, Deployment, deployment
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


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of process `pid` so far, in seconds (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _cpu_times() -> list[int]:
    """The machine's CPU time so far by kind (/proc/stat: user nice system idle iowait irq
    softirq steal), in clock ticks."""
    with open("/proc/stat") as stat:
        return [int(field) for field in stat.readline().split()[1:9]]


def _top_lines(collapsed: Path, count: int) -> tuple[int, list[tuple[str, int]]]:
    """Samples in a py-spy raw (collapsed) file, and the `count` innermost frames that
    hold most of them."""
    innermost: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        total += int(samples)
        innermost[stack.rpartition(";")[2]] += int(samples)
    return total, innermost.most_common(count)


def _profile_direction(
    deployed: Deployment, label: str, seconds: float, out_dir: Path, *extra: str
) -> None:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise RuntimeError("py-spy not found on PATH (it is in the venv: put .venv/bin first)")
    pids = {name: proxy.process.pid for name, proxy in deployed.proxies.items()}

    def spy(name: str, pid: int) -> subprocess.Popen[bytes]:
        output = out_dir / f"{label}-{name}.txt"
        return subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--duration", f"{seconds:g}", "--rate", "200",
             "--nonblocking", "--format", "raw", "--output", str(output)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    spies = [spy(name, pid) for name, pid in pids.items()]
    cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    machine_before = _cpu_times()
    started = time.monotonic()
    result = iperf3_between(deployed.enclave, deployed.internet, SERVER, seconds, *extra)
    elapsed = time.monotonic() - started
    machine = [after - before for after, before in zip(_cpu_times(), machine_before, strict=True)]
    cpu = {}
    for name, pid in pids.items():
        (user, system), (user_before, system_before) = _cpu_seconds(pid), cpu_before[name]
        cpu[name] = ((user - user_before) / elapsed, (system - system_before) / elapsed)
    for spying in spies:
        spying.wait(timeout=seconds + 60)
    print(f"== {label}: {result['gbps']:.2f} Gbit/s, {result['retransmits']:g} retransmits")
    kinds = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    shares = ", ".join(
        f"{kind} {ticks / max(sum(machine), 1):.0%}"
        for kind, ticks in zip(kinds, machine, strict=True)
    )
    print(f"   machine: {shares}")
    for name in pids:
        collapsed = out_dir / f"{label}-{name}.txt"
        user, system = cpu[name]
        print(f"-- {name}: {user + system:.0%} of a CPU ({user:.0%} user, {system:.0%} system)")
        if not collapsed.exists():
            continue
        total, top = _top_lines(collapsed, 8)
        for frame, samples in top:
            print(f"   {samples / max(total, 1):6.1%}  {frame}")


def profile(seconds: float, out_dir: Path) -> None:
    """iperf3 each way through the tuna deployment, the four proxies under py-spy."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="pfp-bench-raw-") as tmp,
        deployment(Path(tmp)) as deployed,
    ):
        _profile_direction(deployed, "out", seconds, out_dir)
        _profile_direction(deployed, "in", seconds, out_dir, "-R")
        _profile_direction(deployed, "out-mss1400", seconds, out_dir, "-M", "1400")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per iperf3 run")
    parser.add_argument("--runs", type=int, default=1, help="medians of this many runs")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the proxies instead")
    args = parser.parse_args()
    if args.profile is not None:
        profile(args.seconds, args.profile)
        return
    runs = [measure(args.seconds) for _ in range(args.runs)]
    medians = {
        setup: {figure: statistics.median(run[setup][figure] for run in runs) for figure in figures}
        for setup, figures in runs[0].items()
    }
    print(json.dumps({"medians": medians, "runs": runs} if args.runs > 1 else runs[0], indent=2))


if __name__ == "__main__":
    main()
