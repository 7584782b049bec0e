"""The hybrid vsock hop: ip-to-vsock --vsock-uds against a client that speaks the protocol
itself, in one hybrid-stage guest run.

    make bench-hybrid     boots the hybrid stage's guest (vsock behind vhost-device-vsock)
                          and runs this here, on the host
    python -m benchmarks.hybridpath [--quick] [--output FILE]      (in the hybrid stage only)

Both paths end at the same guest side, vsock-to-ip (real AF_VSOCK) in front of an echo server:

    pf-proxy   client -> ip-to-vsock --vsock-uds (CONNECT/OK) -> uds_path -> guest
    direct     a client that connects to uds_path, writes CONNECT, reads OK -> guest

so their ratio is what the proxy costs on the host. socat cannot be the reference: it has no
way to wait for a line (OK) before relaying, and what it would send with the CONNECT line the
backend drops. Figures (medians of `runs`): one stream's throughput (MiB/s, echoed), and the
connection rate of one client (connect, 64 bytes each way, close). The guest runs under
software emulation where there is no hardware virtualization: compare the columns of one run.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

from benchmarks.vsockpath import table
from tests.hybrid import AGENT_ENV, CID_ENV, UDS_ENV, in_hybrid_stage
from tests.hybrid.agent import GuestAgent
from tests.integration.helpers import free_port, recv_exactly

GUEST_PORT = 6500
WAIT = 120.0
Connect = Callable[[], socket.socket]


def direct(uds_path: str) -> Connect:
    """A client that speaks hybrid vsock itself: CONNECT, then the OK line, byte by byte."""

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT)
        sock.connect(uds_path)
        sock.sendall(b"CONNECT %d\n" % GUEST_PORT)
        answer = b""
        while not answer.endswith(b"\n"):
            byte = sock.recv(1)
            if not byte:
                raise ConnectionError(f"no OK from {uds_path}: {answer!r}")
            answer += byte
        return sock

    return connect


def through_proxy(port: int) -> Connect:
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=WAIT)


CHUNK = 1 << 20


def bulk(connect: Connect, size: int) -> float:
    """MiB/s of one stream sending `size` bytes, a MiB at a time, each read back before the
    next is sent. (Sending all at once while reading the echo stalled the direct client for
    good, both directions full over the backend: the full-duplex stall vsock.md tells of.)"""
    chunk = os.urandom(CHUNK)
    started = time.monotonic()
    with connect() as sock:
        for _ in range(size // CHUNK):
            sock.sendall(chunk)
            recv_exactly(sock, CHUNK)
    return size / (1 << 20) / (time.monotonic() - started)


def rate(connect: Connect, count: int) -> float:
    """Connections per second, one after the other: connect, 64 bytes each way, close."""
    message = os.urandom(64)
    started = time.monotonic()
    for _ in range(count):
        with connect() as sock:
            sock.sendall(message)
            recv_exactly(sock, 64)
    return count / (time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short run of each")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    if not in_hybrid_stage():
        print("benchmarks.hybridpath runs in the hybrid stage only: make bench-hybrid")
        return 2
    runs, size, count = (1, 4 << 20, 20) if args.quick else (3, 64 << 20, 200)
    uds, cid = os.environ[UDS_ENV], os.environ[CID_ENV]
    guest = GuestAgent(Path(os.environ[AGENT_ENV]), timeout=WAIT)
    echo = guest.start("python", "-m", "tests.integration.echo_process", "tcp-loop",
                       "127.0.0.1", "7500")  # fmt: skip
    inner = guest.start("vsock-to-ip", "-v", f"4294967295:{GUEST_PORT}", "-i", "127.0.0.1:7500")
    port = free_port()
    outer = subprocess.Popen(
        ["ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", f"{cid}:{GUEST_PORT}",
         "--vsock-uds", uds],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        echo.wait_for("ready", timeout=WAIT)
        inner.wait_for("Listening on:", timeout=WAIT)
        paths = {"pf-proxy": through_proxy(port), "direct": direct(uds)}
        deadline = time.monotonic() + WAIT
        while True:  # ip-to-vsock is up once a connection goes through
            try:
                rate(paths["pf-proxy"], 1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        figures: dict[str, dict[str, list[float]]] = {name: {"MiB/s": [], "conn/s": []}
                                                       for name in paths}  # fmt: skip
        for run in range(runs):
            for name, connect in paths.items():  # interleaved: load changes touch both alike
                figures[name]["MiB/s"].append(bulk(connect, size))
                figures[name]["conn/s"].append(rate(connect, count))
                print(f"run {run + 1} {name}: {figures[name]}", file=sys.stderr, flush=True)
    finally:
        outer.terminate()
        outer.wait(WAIT)
        inner.stop()
        echo.stop()
    results = {
        name: {figure: median(samples) for figure, samples in by_figure.items()}
        for name, by_figure in figures.items()
    }
    lines = [
        f"Hybrid vsock (vhost-device-vsock, QEMU guest), medians of {runs}; compare columns.",
        "",
        *table(f"One stream of {size >> 20} MiB, echoed",
               {name: {"MiB/s": values["MiB/s"]} for name, values in results.items()}, "direct"),
        *table(f"{count} connections one after the other",
               {name: {"conn/s": values["conn/s"]} for name, values in results.items()}, "direct"),
    ]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
