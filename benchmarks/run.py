"""Run every benchmark; print one table (ours, the reference from the same run, the ratio).

    python -m benchmarks            the full run (medians of 3 runs), a few minutes
    python -m benchmarks --quick    one short run of each, for trying things out

The table also goes, with a description of the machine, to benchmarks/results.md. These are
measurements, never pass/fail tests: the "met" column only compares with the targets of
issue 4. All traffic is on loopback; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import uvloop

from benchmarks import egress, rawpath, udppath
from benchmarks.processes import (
    echo_server,
    iperf3,
    iperf3_server,
    pair,
    rss_kib,
    run_client,
    tree_pss_kib,
)

OURS = {"splice": "pf-proxy splice", "copy": "pf-proxy copy"}
# The data-path figures also for the pair as two proxies of one `pf-proxy run` process.
DATA_PATH = {**OURS, "file": "pf-proxy run"}
RESULTS = Path(__file__).with_name("results.md")
LEGEND = """\
- pf-proxy splice: `ip-to-vsock` -> emulated vsock (a Unix socket) -> `vsock-to-ip`;
  pf-proxy copy: the same with `PF_PROXY_NO_SPLICE=1` (the user-space copy fallback);
  pf-proxy run: the same two proxies in one `pf-proxy run` process (splice).
- socat pair: `socat TCP-LISTEN:P,reuseaddr,fork,backlog=1024 UNIX-CONNECT:S` and
  `socat UNIX-LISTEN:S,fork,backlog=1024 TCP:127.0.0.1:Q`; direct loopback: no proxy.
- Bulk: iperf3, received throughput. Connection rate: connect, 64-byte request, 64-byte echo,
  close, 64 clients at once. Ping-pong: 1 byte each way, time from send to echo.
- Memory: VmRSS of each proxy process while the idle connections are held, minus before,
  per connection; socat forks two processes per connection, so its figure is the PSS of all
  its processes per side and connection.
- Raw path: iperf3 through the four raw proxies in the tuna deployment built in network
  namespaces (enclave, host, "internet"; MTU 9001; emulated vsock), against the same three
  namespaces with the host routing in the kernel instead (benchmarks/rawpath.py).
- Egress by name: the transparent pair in network namespaces (emulated vsock), each
  connection sending an HTTP request head or a real TLS ClientHello and having it echoed,
  with `vsock-to-ip-transparent --allow-host NAME` against without it, alternating run by
  run (benchmarks/egress.py); the name's DNS answer comes from dnsmasq, TTL 300 s.
- DNS (UDP pair): dnsperf and lookups from new source ports against dnsmasq on loopback,
  directly, through `udp-to-vsock` -> emulated vsock -> `vsock-to-udp`, through the socat pair
  and through a multiplexing prototype (benchmarks/udppath.py, benchmarks/muxpair.py).
- "Met" compares with the targets of issue 4 (issue 12 for the DNS rows); these are
  measurements, not tests."""


@dataclass(frozen=True)
class Settings:
    runs: int = 3
    bulk_seconds: int = 3
    load_seconds: float = 3.0
    rate_concurrency: int = 64
    pingpong_connections: tuple[int, ...] = (1, 16)
    idle_connections: int = 5000
    socat_idle_connections: int = 500


@dataclass(frozen=True)
class Row:
    figure: str
    ours: float | None
    reference: float | None
    reference_name: str
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.reference:
            return None
        return self.ours / self.reference


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {kind: median(values) for kind, values in samples.items()}


# --- a. bulk throughput ----------------------------------------------------------------------


def bulk(settings: Settings, workdir: Path, streams: int) -> list[Row]:
    gbps: dict[str, list[float]] = defaultdict(list)
    for run in range(settings.runs):
        for kind in ("direct", "socat", *DATA_PATH):
            with iperf3_server(workdir) as server, pair(kind, server, workdir) as target:
                gbps[kind].append(iperf3(target.port, streams, settings.bulk_seconds))
            _progress(f"bulk -P {streams} run {run + 1} {kind}: {gbps[kind][-1]:.2f} Gbit/s")
    m = _medians(gbps)
    rows = []
    for kind, label in DATA_PATH.items():
        name = f"Bulk, {streams} stream{'s' if streams > 1 else ''}, Gbit/s ({label})"
        targets = streams == 1  # the targets are for one stream
        rows += [
            _compare(name, m[kind], m["socat"], "socat pair", at_least=2.0 if targets else None),
            _compare(
                name, m[kind], m["direct"], "direct loopback", at_least=0.4 if targets else None
            ),
        ]
    return rows


def _compare(
    figure: str,
    ours: float,
    reference: float,
    reference_name: str,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
) -> Row:
    """A row whose target, if any, is a bound on the ratio ours / reference."""
    ratio = ours / reference
    if at_least is not None:
        return Row(figure, ours, reference, reference_name, f">= {at_least:g}x", ratio >= at_least)
    if at_most is not None:
        return Row(figure, ours, reference, reference_name, f"<= {at_most:g}x", ratio <= at_most)
    return Row(figure, ours, reference, reference_name)


# --- b. connection rate ----------------------------------------------------------------------


def connection_rate(settings: Settings, workdir: Path) -> list[Row]:
    rates: dict[str, list[float]] = defaultdict(list)
    for run in range(settings.runs):
        for kind in ("direct", "socat", *DATA_PATH):
            with echo_server(workdir) as server, pair(kind, server, workdir) as target:
                result = run_client(
                    "rate",
                    target.port,
                    timeout=settings.load_seconds + 60,
                    concurrency=settings.rate_concurrency,
                    duration=settings.load_seconds,
                )
            rates[kind].append(result["connections_per_s"])
            _progress(
                f"rate run {run + 1} {kind}: {result['connections_per_s']:.0f}/s"
                f" ({result['failed']:.0f} failed)"
            )
    m = _medians(rates)
    name = f"Connection rate, {settings.rate_concurrency} clients, connections/s"
    rows = [
        _compare(f"{name} ({label})", m[kind], m["socat"], "socat pair", at_least=2.0)
        for kind, label in DATA_PATH.items()
    ]
    fastest = max(m[kind] for kind in ("socat", *DATA_PATH))
    rows.append(
        Row(
            f"{name} (load generator alone, direct to the echo server)",
            m["direct"],
            fastest,
            "fastest pair",
            "> 1x",
            m["direct"] > fastest,
        )
    )
    return rows


# --- c. latency ------------------------------------------------------------------------------


def pingpong(settings: Settings, workdir: Path, connections: int) -> list[Row]:
    figures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in range(settings.runs):
        for kind in ("socat", *DATA_PATH):
            with echo_server(workdir) as server, pair(kind, server, workdir) as target:
                result = run_client(
                    "pingpong",
                    target.port,
                    timeout=settings.load_seconds + 60,
                    connections=connections,
                    duration=settings.load_seconds,
                )
            for key in ("requests_per_s", "p50_us", "p99_us"):
                figures[key][kind].append(result[key])
            _progress(
                f"ping-pong x{connections} run {run + 1} {kind}: "
                f"{result['requests_per_s']:.0f}/s p50 {result['p50_us']:.0f} us"
                f" p99 {result['p99_us']:.0f} us"
            )
    rps, p50, p99 = (_medians(figures[key]) for key in ("requests_per_s", "p50_us", "p99_us"))
    name = f"Ping-pong 1 byte, {connections} connection{'s' if connections > 1 else ''}"
    rows = []
    for kind, label in DATA_PATH.items():
        rows += [
            _compare(
                f"{name}, requests/s ({label})", rps[kind], rps["socat"], "socat pair", at_least=1.0
            ),
            _compare(f"{name}, p50 us ({label})", p50[kind], p50["socat"], "socat pair"),
            _compare(
                f"{name}, p99 us ({label})", p99[kind], p99["socat"], "socat pair", at_most=1.5
            ),
        ]
    return rows


# --- d. memory -------------------------------------------------------------------------------


def hold_idle(
    port: int, connections: int, measure: Callable[[], dict[str, int]]
) -> tuple[dict[str, int], dict[str, int]]:
    """Hold `connections` idle through `port`; return `measure()` while held and the echo check."""
    args = [sys.executable, "-m", "benchmarks.loadgen", "hold", "--port", str(port)]
    client = subprocess.Popen(
        [*args, "--connections", str(connections)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    try:
        established = _json_line(client.stdout.readline())
        time.sleep(1.0)  # let the proxies settle
        measured = measure()
        client.stdin.write("check\n")
        client.stdin.flush()
        checked = _json_line(client.stdout.readline())
        client.wait(60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert established["established"] == checked["established"]
    return measured, checked


def _json_line(line: str) -> dict[str, int]:
    if not line:
        raise RuntimeError("the hold client ended early")
    result: dict[str, int] = json.loads(line)
    return result


def memory(settings: Settings, workdir: Path) -> list[Row]:
    per_connection: dict[str, list[float]] = defaultdict(list)
    echoed: dict[str, list[float]] = defaultdict(list)
    for run in range(settings.runs):
        for kind in OURS:
            with echo_server(workdir) as server, pair(kind, server, workdir) as target:
                before = {name: rss_kib(pid) for name, pid in target.pids.items()}
                after, checked = hold_idle(
                    target.port,
                    settings.idle_connections,
                    lambda target=target: {n: rss_kib(pid) for n, pid in target.pids.items()},
                )
            n = checked["established"]
            for name in target.pids:
                per_connection[f"{kind} {name}"].append((after[name] - before[name]) / max(n, 1))
            echoed[kind].append(checked["echoed_after"] / settings.idle_connections)
            _progress(
                f"memory run {run + 1} {kind}: {n} held, {checked['echoed_after']} echoed, "
                + ", ".join(f"{name} {before[name]}->{after[name]} KiB" for name in target.pids)
            )
        with echo_server(workdir) as server, pair("socat", server, workdir) as target:
            before = {name: tree_pss_kib(pid) for name, pid in target.pids.items()}
            after, checked = hold_idle(
                target.port,
                settings.socat_idle_connections,
                lambda target=target: {n: tree_pss_kib(pid) for n, pid in target.pids.items()},
            )
        n = checked["established"]
        per_side = sum(after[k] - before[k] for k in target.pids) / len(target.pids) / max(n, 1)
        per_connection["socat"].append(per_side)
        _progress(f"memory run {run + 1} socat: {n} held, {per_side:.0f} KiB PSS per side")
    m = _medians(per_connection)
    rows = []
    socat_name = f"socat pair PSS ({settings.socat_idle_connections} conns)"
    for kind, label in OURS.items():
        for name in ("ip-to-vsock", "vsock-to-ip"):
            value = m[f"{kind} {name}"]
            rows.append(
                Row(
                    f"Idle connection, KiB RSS per connection, {name} ({label})",
                    value,
                    m["socat"],
                    socat_name,
                    "<= 16 KiB",
                    value <= 16,
                )
            )
        share = median(echoed[kind])
        rows.append(
            Row(
                f"{settings.idle_connections} idle connections echo afterwards, share ({label})",
                share,
                1.0,
                "all",
                "= 1",
                share == 1.0,
            )
        )
    return rows


# --- e. raw path -----------------------------------------------------------------------------


def raw_path(settings: Settings, workdir: Path) -> list[Row]:
    """iperf3 through the four raw proxies in the tuna topology (benchmarks/rawpath.py),
    each direction, against the same namespaces with kernel routing; packets per second
    through ip-to-vsock-raw-outgoing. Needs root (network namespaces, iptables)."""
    if os.geteuid() != 0:
        _progress("raw path: skipped, needs root")
        return [Row("Raw path (not measured: needs root)", None, None, "")]
    samples: dict[str, list[float]] = defaultdict(list)
    for run in range(settings.runs):
        result = rawpath.measure(settings.bulk_seconds)
        for setup, figures in result.items():
            for figure, value in figures.items():
                samples[f"{setup}.{figure}"].append(value)
        _progress(f"raw path run {run + 1}: {json.dumps(result)}")
    m = _medians(samples)
    rows = []
    for direction, label in (("out", "enclave -> internet"), ("in", "internet -> enclave")):
        ours, routing = m[f"raw.{direction}"], m[f"routing.{direction}"]
        rows.append(
            Row(
                f"Raw path, {label}, MTU 9001, Gbit/s",
                ours,
                routing,
                "kernel routing",
                ">= 2 Gbit/s",
                ours >= 2.0,
            )
        )
    rows.append(
        Row(
            "Raw path, packets/s through ip-to-vsock-raw-outgoing (iperf3 MSS 1400)",
            m["raw.pps"],
            None,
            "",
        )
    )
    return rows


# --- f. egress by name ------------------------------------------------------------------------


def egress_names(settings: Settings, workdir: Path) -> list[Row]:
    """Connection rate through the transparent pair in namespaces, with --allow-host (an HTTP
    Host, a TLS ClientHello) against without it, alternating in one run
    (benchmarks/egress.py). Needs root (network namespaces, iptables, dnsmasq)."""
    if os.geteuid() != 0:
        _progress("egress by name: skipped, needs root")
        return [Row("Egress by name (not measured: needs root)", None, None, "")]
    result = egress.measure(settings.load_seconds, settings.runs)
    m = result.median
    name = f"Transparent pair, connection rate, {egress.CONCURRENCY} clients, connections/s"
    reference = "no --allow-host"
    starts = result.starts_with_names
    return [
        Row(f"{name} (no --allow-host)", m["plain"], None, ""),
        _compare(f"{name} (--allow-host, HTTP Host)", m["http"], m["plain"], reference),
        _compare(f"{name} (--allow-host, TLS ClientHello)", m["tls"], m["plain"], reference),
        Row(
            f"DNS A queries for the name, {starts} proxy runs with --allow-host",
            result.a_queries,
            starts,
            "one per proxy run",
            "= 1x",
            result.a_queries == starts,
        ),
    ]


# --- g. DNS over the UDP pair ------------------------------------------------------------------


def udp_path(settings: Settings, workdir: Path) -> list[Row]:
    """dnsperf and lookups from new source ports through udp-to-vsock and vsock-to-udp,
    against dnsmasq directly and the socat pair (benchmarks/udppath.py); the targets of
    issue 12."""
    quick = settings.runs == 1
    udp = udppath.Settings(
        runs=settings.runs,
        seconds=3 if quick else 5,
        sustained_seconds=20 if quick else 60,
        memory_flows=2000 if quick else 5000,
        socat_memory_flows=200 if quick else 500,
    )
    results = udppath.measure_all(udp, workdir)
    full = results["full speed"]
    ours, socat, direct = full["pf-proxy"], full["socat"], full["direct"]
    name = "DNS (dnsperf, 8 clients, 100 outstanding), queries/s (pf-proxy UDP pair)"
    rows = [
        _compare(name, ours["queries/s"], socat["queries/s"], "socat pair", at_least=3.0),
        _compare(name, ours["queries/s"], direct["queries/s"], "dnsmasq directly"),
    ]
    for rate in udppath.LATENCY_RATES:
        fixed = results[f"{rate} queries/s"]
        rows += [
            Row(
                f"DNS at {rate} queries/s, lost answers (pf-proxy UDP pair)",
                fixed["pf-proxy"]["lost"], fixed["socat"]["lost"], "socat pair", "= 0",
                fixed["pf-proxy"]["lost"] == 0,
            ),
            _compare(
                f"DNS at {rate} queries/s, p50 us (pf-proxy UDP pair)",
                fixed["pf-proxy"]["p50 us"], fixed["socat"]["p50 us"], "socat pair",
            ),
            _compare(
                f"DNS at {rate} queries/s, p99 us (pf-proxy UDP pair)",
                fixed["pf-proxy"]["p99 us"], fixed["socat"]["p99 us"], "socat pair",
                at_most=1.0,
            ),
            _compare(  # the floor for this design in Python (benchmarks/muxpair.py)
                f"DNS at {rate} queries/s, p99 us (pf-proxy UDP pair)",
                fixed["pf-proxy"]["p99 us"], fixed[udppath.PROTOTYPE]["p99 us"],
                "lean Python prototype",
            ),
        ]  # fmt: skip
    ports = next(by for title, by in results.items() if title.startswith("32 in flight"))
    new = "new ports, lookups/s"
    rows += [
        _compare(
            "Lookups from a new source port each (32 in flight), lookups/s (pf-proxy UDP pair)",
            ports["pf-proxy"][new], ports["socat"][new], "socat pair",
        ),
        _compare(
            "Lookups from a new source port each (32 in flight), lookups/s (pf-proxy UDP pair)",
            ports["pf-proxy"][new], ports[udppath.PROTOTYPE][new], "one multiplexed stream",
        ),
        _compare(
            "Lookups from a new source port each, lookups/s, against 32 ports reused "
            "(pf-proxy UDP pair)",
            ports["pf-proxy"][new], ports["pf-proxy"]["same ports, lookups/s"], "ports reused",
        ),
    ]  # fmt: skip
    sustained = results["1,000/s from new ports"]["pf-proxy"]
    share = sustained["answered"] / sustained["sent"]
    figure = f"1,000 lookups/s from new ports for {udp.sustained_seconds:g} s, answered share"
    rows.append(Row(figure, share, 1.0, "all", "= 1", share == 1.0))
    memory = results["memory per open flow"]
    socat_flow = sum(v for k, v in memory["socat"].items() if "per flow" in k) / 2
    for proxy in ("udp-to-vsock", "vsock-to-udp"):
        value = memory["pf-proxy"][f"{proxy} KiB per flow"]
        figure = f"Open flow ({udp.memory_flows} flows), KiB RSS per flow, {proxy}"
        reference = f"socat pair PSS ({udp.socat_memory_flows} flows)"
        rows.append(Row(figure, value, socat_flow, reference, "<= 16 KiB", value <= 16))
    return rows


# --- the table -------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    if value is None:
        return "not measured yet"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def table(rows: Iterable[Row]) -> str:
    lines = [
        "| Figure | pf-proxy | Reference | Ratio | Target | Met |",
        "|---|---:|---|---:|---|---|",
    ]
    for row in rows:
        reference = f"{_number(row.reference)} ({row.reference_name})" if row.reference else "-"
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        met = {True: "yes", False: "NO", None: ""}[row.met]
        lines.append(
            f"| {row.figure} | {_number(row.ours)} | {reference} | {ratio} | {row.target} | {met} |"
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    socat = re.search(r"socat version (\S+)", _output(["socat", "-V"]))
    iperf = _output(["iperf3", "--version"]).split(" (")[0]
    return (
        f"{os.cpu_count()} CPUs ({cpu.group(1) if cpu else 'unknown CPU'}), "
        f"Linux {platform.release()}, Python {platform.python_version()}, "
        f"uvloop {uvloop.__version__}, socat {socat.group(1) if socat else '?'}, {iperf}"
    )


def _output(args: list[str]) -> str:
    return subprocess.run(args, capture_output=True, text=True).stdout


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short run of each")
    parser.add_argument(
        "--only",
        help="comma-separated subset: bulk,bulk8,rate,pingpong,memory,raw,egress,udp",
    )
    args = parser.parse_args()
    settings = Settings(runs=1, bulk_seconds=2, load_seconds=1.5) if args.quick else Settings()
    sections: dict[str, Callable[[Settings, Path], list[Row]]] = {
        "bulk": lambda s, w: bulk(s, w, 1),
        "bulk8": lambda s, w: bulk(s, w, 8),
        "rate": connection_rate,
        "pingpong": lambda s, w: [r for c in s.pingpong_connections for r in pingpong(s, w, c)],
        "memory": memory,
        "raw": raw_path,
        "egress": egress_names,
        "udp": udp_path,
    }
    chosen = args.only.split(",") if args.only else list(sections)
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="pf-proxy-bench-") as workdir:
        for name in chosen:
            rows += sections[name](settings, Path(workdir))
    text = table(rows)
    print(text)
    header = (
        f"Machine: {machine()}.\n\n"
        f"Medians of {settings.runs} run(s); bulk {settings.bulk_seconds} s per iperf3 run, "
        f"connection rate and ping-pong {settings.load_seconds:g} s per run; "
        f"whole benchmark {time.monotonic() - started:.0f} s "
        f"({time.strftime('%Y-%m-%d %H:%M')}).\n\n"
        f"{LEGEND}\n\n"
    )
    if not args.only:
        RESULTS.write_text(f"# Benchmark results\n\n{header}{text}\n")
        print(f"\nwritten to {RESULTS}", file=sys.stderr)
    return 0
