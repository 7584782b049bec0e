"""What --metrics costs: the same pair with and without it, in one run.

    python -m benchmarks.metricscost [--quick] [--runs N]

The pair `ip-to-vsock -> emulated vsock -> vsock-to-ip` (benchmarks/processes.py), each proxy
with `--metrics` on a port of its own, scraped every second as a busy Prometheus would (the
scrapes' CPU is in the figures), or without it, run by run interleaved: one stream's
throughput (iperf3), connection rate (32 clients) and 1-byte ping-pong over 16 connections,
medians of N, each with the CPU time both proxies spent per operation (user + system from
/proc/PID/stat): the steadier figure on a shared 2-core machine, where one stream's throughput
swings with where the scheduler puts the processes. The proxies count per connection and per
batch, never per chunk, and build the metric families only when scraped, so the difference
should stay within the noise; the table gives it in percent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from statistics import median

from benchmarks.cpucost import cpu_seconds
from benchmarks.processes import Pair, echo_server, iperf3, iperf3_server, pair, run_client

VARIANTS = {"without --metrics": False, "with --metrics": True}


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


SCRAPE_EVERY = 1.0  # seconds; Prometheus's default is 15 s


def _cpu(running: Pair) -> float:
    return sum(cpu_seconds(pid) for pid in running.pids.values())


@contextmanager
def scraping(running: Pair) -> Iterator[None]:
    """Fetch every proxy's /metrics each SCRAPE_EVERY seconds while the body runs."""
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(SCRAPE_EVERY):
            for port in running.metrics_ports.values():
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as got:
                    if b"pf_proxy_" not in got.read():
                        raise RuntimeError(f"no pf_proxy series on port {port}")

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        yield
    finally:
        stop.set()
        scraper.join()


@contextmanager
def _pair_before(
    server: AbstractContextManager[int], workdir: Path, metrics: bool
) -> Iterator[Pair]:
    """Our pair in front of `server`, scraped while in use when `metrics` is on."""
    with (
        server as port,
        pair("splice", port, workdir, metrics=metrics) as running,
        scraping(running),
    ):
        yield running


def one_run(workdir: Path, metrics: bool, seconds: int) -> dict[str, float]:
    figures = {}
    with _pair_before(iperf3_server(workdir), workdir, metrics) as p:
        before = _cpu(p)
        gbps = iperf3(p.port, 1, seconds)
        figures["one stream, Gbit/s"] = gbps
        figures["CPU ms per GB"] = (_cpu(p) - before) * 1e3 / max(gbps * seconds / 8, 1e-9)
    with _pair_before(echo_server(workdir), workdir, metrics) as p:
        before = _cpu(p)
        rate = run_client(
            "rate", p.port, timeout=seconds + 60, duration=seconds, concurrency=32, warmup=0
        )
        figures["connections/s"] = rate["connections_per_s"]
        figures["CPU us per connection"] = (_cpu(p) - before) * 1e6 / max(rate["completed"], 1)
    with _pair_before(echo_server(workdir), workdir, metrics) as p:
        before = _cpu(p)
        pings = run_client(
            "pingpong", p.port, timeout=seconds + 60, duration=seconds, connections=16, warmup=0
        )
        figures["ping-pong x16, requests/s"] = pings["requests_per_s"]
        figures["CPU us per request"] = (_cpu(p) - before) * 1e6 / max(pings["samples"], 1)
    return figures


def scrape_cost(workdir: Path, scrapes: int = 500) -> float:
    """CPU microseconds one /metrics scrape costs each proxy of the pair (after known
    traffic, so every family has values), the median over the two proxies."""
    with echo_server(workdir) as server, pair("splice", server, workdir, metrics=True) as p:
        run_client("rate", p.port, timeout=60, duration=1, concurrency=8, warmup=0)
        costs = []
        for name, port in p.metrics_ports.items():
            pid = p.pids[name]
            before = cpu_seconds(pid)
            for _ in range(scrapes):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as got:
                    got.read()
            costs.append((cpu_seconds(pid) - before) * 1e6 / scrapes)
    return median(costs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    runs, seconds = (1, 2) if args.quick else (args.runs, 3)
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with tempfile.TemporaryDirectory(prefix="pfp-metrics-") as name:
        for run in range(runs):
            for label, metrics in VARIANTS.items():
                for figure, value in one_run(Path(name), metrics, seconds).items():
                    samples[figure][label].append(value)
                    _progress(f"run {run + 1} {label}: {figure} {value:,.2f}")
        scrape = scrape_cost(Path(name))
    lines = [
        f"--metrics on and off, medians of {runs} interleaved runs",
        "",
        "| figure | without --metrics | with --metrics | difference |",
        "|---|---:|---:|---:|",
    ]
    for figure, by_label in samples.items():
        off, on = (median(by_label[label]) for label in VARIANTS)
        lines.append(f"| {figure} | {off:,.2f} | {on:,.2f} | {100 * (on - off) / off:+.1f}% |")
    lines += [
        "",
        f"One /metrics scrape: {scrape:,.0f} us of the proxy's CPU; scraped every 15 s that is "
        f"{scrape / 15e6:.4%} of a core.",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
