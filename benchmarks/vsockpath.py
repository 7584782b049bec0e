"""The pair over real AF_VSOCK, against socat over vsock and the emulated pair, in one guest run.

    make bench-guest      boots the guest stage's QEMU guest and runs this inside it
    python -m benchmarks.vsockpath [--quick] [--output FILE]     (inside the guest only)

Pairs, each in front of the same server on 127.0.0.1 (benchmarks/processes.py):

    vsock        ip-to-vsock -> vsock 1:P (vsock_loopback) -> vsock-to-ip
    vsock-copy   the same on the relay's copy path (PF_PROXY_NO_SPLICE=1)
    socat-vsock  socat TCP-LISTEN ... VSOCK-CONNECT:1:P -> socat VSOCK-LISTEN:P,backlog=1024 ...
    splice       the same pair over the emulation (a Unix socket), for the cost of the hop

Figures (medians of 3): one stream's throughput (iperf3), connection rate (connect, 64 bytes
each way, close; 32 clients), 1-byte ping-pong over 1 and 16 connections; and one stream over
real vsock with --vsock-buffer-size 256 KiB (the kernel's default), 1 MiB and 4 MiB.

The guest runs under software emulation on machines without hardware virtualization: every
figure is then many times slower than native. Compare columns of one run, never absolutes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from statistics import median

from benchmarks.processes import Pair, echo_server, iperf3, iperf3_server, pair, run_client
from tests.vsocks import in_guest

KINDS = ("vsock", "vsock-copy", "socat-vsock", "splice")
LABELS = {  # pair kind -> how the tables name it
    "vsock": "pf-proxy, vsock, splice",
    "vsock-copy": "pf-proxy, vsock, copy",
    "socat-vsock": "socat, vsock",
    "splice": "pf-proxy, emulated vsock",
}
BUFFER_SIZES = (256 << 10, 1 << 20, 4 << 20)
RATE_CLIENTS = 32


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _bulk(seconds: int) -> Callable[[Path, str, int | None], dict[str, float]]:
    def measure(workdir: Path, kind: str, buffer_size: int | None) -> dict[str, float]:
        with iperf3_server(workdir) as server, pair(kind, server, workdir, buffer_size) as through:
            return {"Gbit/s": iperf3(through.port, 1, seconds)}

    return measure


def _load(
    seconds: float, mode: str, **options: object
) -> Callable[[Path, str, int | None], dict[str, float]]:
    def measure(workdir: Path, kind: str, buffer_size: int | None) -> dict[str, float]:
        with echo_server(workdir) as server, pair(kind, server, workdir, buffer_size) as through:
            return _client(mode, through, seconds, options)

    return measure


def _client(
    mode: str, through: Pair, seconds: float, options: dict[str, object]
) -> dict[str, float]:
    result = run_client(mode, through.port, timeout=seconds + 120, duration=seconds, **options)
    if mode == "rate":
        return {"connections/s": result["connections_per_s"], "failed": result["failed"]}
    return {"requests/s": result["requests_per_s"], "p50 us": result["p50_us"]}


def sample(
    runs: int,
    workdir: Path,
    name: str,
    measure: Callable[[Path, str, int | None], dict[str, float]],
    variants: list[tuple[str, str, int | None]],
) -> dict[str, dict[str, float]]:
    """Medians over `runs` of `measure` for each (label, pair kind, buffer size), run by run
    interleaved so that a change in the machine's load touches every variant alike."""
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in range(runs):
        for label, kind, buffer_size in variants:
            figures = measure(workdir, kind, buffer_size)
            for figure, value in figures.items():
                samples[label][figure].append(value)
            shown = ", ".join(f"{figure} {value:.3g}" for figure, value in figures.items())
            _progress(f"{name} run {run + 1} {label}: {shown}")
    return {
        label: {figure: median(values) for figure, values in by_figure.items()}
        for label, by_figure in samples.items()
    }


def table(title: str, results: dict[str, dict[str, float]], reference: str) -> list[str]:
    figures = list(next(iter(results.values())))
    lines = [f"**{title}**", "", "| pair | " + " | ".join(figures) + f" | vs {reference} |"]
    lines.append("|---" * (len(figures) + 2) + "|")
    key = figures[0]
    for label, values in results.items():
        ratio = values[key] / results[reference][key] if results[reference][key] else 0.0
        cells = " | ".join(f"{values[figure]:.3g}" for figure in figures)
        lines.append(f"| {label} | {cells} | {ratio:.2f}x |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short run of each")
    parser.add_argument("--output", type=Path, help="also write the tables (markdown) here")
    args = parser.parse_args(argv)
    if not in_guest():
        print("benchmarks.vsockpath runs inside the guest stage only: make bench-guest")
        return 2
    runs, seconds = (1, 2) if args.quick else (3, 3)
    started = time.monotonic()
    pairs = [(LABELS[kind], kind, None) for kind in KINDS]
    out = [
        f"Real AF_VSOCK in the guest stage's QEMU guest (vsock_loopback), medians of {runs}; "
        "compare columns, not absolute figures (software emulation).",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="pfp-bench-") as name:
        workdir = Path(name)
        out += table(
            "One stream (iperf3)",
            sample(runs, workdir, "bulk", _bulk(seconds), pairs),
            LABELS["socat-vsock"],
        )
        rate = _load(seconds, "rate", concurrency=RATE_CLIENTS)
        out += table(
            f"Connection rate, {RATE_CLIENTS} clients",
            sample(runs, workdir, "rate", rate, pairs),
            LABELS["socat-vsock"],
        )
        for connections in (1, 16):
            pingpong = _load(seconds, "pingpong", connections=connections)
            out += table(
                f"Ping-pong 1 byte, {connections} connection{'s' if connections > 1 else ''}",
                sample(runs, workdir, f"ping-pong x{connections}", pingpong, pairs),
                LABELS["socat-vsock"],
            )
        sizes = [
            (f"pf-proxy, vsock, buffer {size >> 10} KiB", "vsock", size) for size in BUFFER_SIZES
        ]
        out += table(
            "One stream over real vsock by --vsock-buffer-size",
            sample(runs, workdir, "buffer", _bulk(seconds), sizes),
            sizes[0][0],
        )
    out.append(f"({time.monotonic() - started:.0f} s in the guest)")
    text = "\n".join(out)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
