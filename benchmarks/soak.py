"""Soak: many connections through the TCP pair for a while, every byte checked end to end.

    python -m benchmarks.soak                   500 connections for 60 s (splice path)
    python -m benchmarks.soak --seconds 10 --pair copy --json

    client -> ip-to-vsock -> emulated vsock -> vsock-to-ip -> echo server (benchmarks.loadgen)

Each of `--connections` workers opens connections back to back until the time is up. Every
connection sends a random-length payload (empty to 8 MiB, mostly small) in random-size writes,
sometimes pausing, while it reads the echo; the bytes sent and received are hashed (SHA-256)
as they go. Then one of two endings, at random:

- half-close: shut down writing after the last byte and read until the echo server's EOF
  (which the proxies must carry back as a half-close), then compare;
- full close: read exactly as many bytes as were sent, compare, close both ways at once.

A connection is lost if it fails (reset, error, no answer within --connection-timeout) or if
what came back differs in length or digest; all its bytes then count as lost. The report gives
bytes moved, connections completed and lost, bytes lost (must be 0) and the resident memory
(VmRSS) of both proxies before the load, at its peak and after it (should be flat). The exit
status is 0 only with nothing lost.

Bounded: the load stops by itself after --seconds (connections in flight finish, each within
--connection-timeout), and every process is started under `timeout` (benchmarks.processes).
Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvloop

from benchmarks.processes import echo_server, pair, rss_kib

HOST = "127.0.0.1"
MiB = 1 << 20
BLOCK = os.urandom(9 * MiB)  # payloads are slices of this at random offsets
READ_SIZE = 256 * 1024
WRITE_SIZES = (1, 100, 1460, 4096, 16384, 65536, 262144)
MAX_SECONDS = 480.0  # the echo server lives 600 s, the proxies LIFETIME (1200 s)


def payload_size(rng: random.Random) -> int:
    """Mostly small, sometimes large: empty to 8 MiB."""
    pick = rng.random()
    if pick < 0.05:
        return 0
    if pick < 0.35:
        return rng.randint(1, 4096)
    if pick < 0.85:
        return rng.randint(4096, MiB)
    return rng.randint(MiB, 8 * MiB)


@dataclass
class Totals:
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_lost: int = 0
    connections_completed: int = 0
    connections_lost: int = 0
    half_closed: int = 0
    fully_closed: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def lose(self, size: int, why: str) -> None:
        self.connections_lost += 1
        self.bytes_lost += size
        self.failures[why] = self.failures.get(why, 0) + 1


async def one_connection(
    port: int, rng: random.Random, totals: Totals, connection_timeout: float
) -> None:
    """One connection: send a random payload while reading the echo; check it; count it."""
    loop = asyncio.get_running_loop()
    size = payload_size(rng)
    half_close = rng.random() < 0.7
    sent, received = hashlib.sha256(), hashlib.sha256()
    got = 0

    async def send(sock: socket.socket) -> None:
        offset = 0
        while offset < size:
            n = min(size - offset, rng.choice(WRITE_SIZES))
            start = rng.randrange(len(BLOCK) - n + 1)
            piece = memoryview(BLOCK)[start : start + n]
            sent.update(piece)
            await loop.sock_sendall(sock, piece)
            totals.bytes_sent += n
            offset += n
            if rng.random() < 0.02:
                await asyncio.sleep(rng.random() * 0.02)
        if half_close:
            sock.shutdown(socket.SHUT_WR)

    async def receive(sock: socket.socket) -> None:
        nonlocal got
        buffer = memoryview(bytearray(READ_SIZE))
        while half_close or got < size:
            want = READ_SIZE if half_close else min(READ_SIZE, size - got)
            n = await loop.sock_recv_into(sock, buffer[:want])
            if n == 0:
                return
            received.update(buffer[:n])
            got += n
            totals.bytes_received += n

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(connection_timeout):
            await loop.sock_connect(sock, (HOST, port))
            sender = asyncio.create_task(send(sock))
            try:
                await receive(sock)
            except BaseException:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
                raise
            await sender
    except TimeoutError:
        totals.lose(size, "timeout")
        return
    except OSError as exc:
        totals.lose(size, type(exc).__name__)
        return
    finally:
        sock.close()
    if got != size:
        totals.lose(size, "short" if got < size else "long")
    elif sent.digest() != received.digest():
        totals.lose(size, "corrupt")
    else:
        totals.connections_completed += 1
        if half_close:
            totals.half_closed += 1
        else:
            totals.fully_closed += 1


async def load(
    port: int, connections: int, seconds: float, connection_timeout: float, seed: int
) -> tuple[Totals, float]:
    """`connections` workers, each opening connections back to back until `seconds` pass."""
    loop = asyncio.get_running_loop()
    totals = Totals()
    start = loop.time()
    deadline = start + seconds

    async def worker(index: int) -> None:
        rng = random.Random(f"{seed}-{index}")
        while loop.time() < deadline:
            await one_connection(port, rng, totals, connection_timeout)

    await asyncio.gather(*(worker(i) for i in range(connections)))
    return totals, loop.time() - start


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Result:
    pair: str
    connections: int
    seconds: float
    totals: Totals
    rss_start_kib: dict[str, int]  # each proxy's VmRSS before the load,
    rss_peak_kib: dict[str, int]  # the highest seen during it (sampled twice a second),
    rss_end_kib: dict[str, int]  # and once every connection is closed


async def soak(args: argparse.Namespace, port: int, pids: dict[str, int]) -> Result:
    fds_before = {name: open_fds(pid) for name, pid in pids.items()}
    start = {name: rss_kib(pid) for name, pid in pids.items()}
    peak = dict(start)
    done = asyncio.Event()

    async def watch_memory() -> None:
        while not done.is_set():
            for name, pid in pids.items():
                peak[name] = max(peak[name], rss_kib(pid))
            try:
                await asyncio.wait_for(done.wait(), 0.5)
            except TimeoutError:
                pass

    watcher = asyncio.create_task(watch_memory())
    totals, elapsed = await load(
        port, args.connections, args.seconds, args.connection_timeout, args.seed
    )
    done.set()
    await watcher
    # Let the proxies finish closing (descriptors back where they were), then measure.
    settle = time.monotonic() + 30
    while time.monotonic() < settle and any(
        open_fds(pid) > fds_before[name] + 16 for name, pid in pids.items()
    ):
        await asyncio.sleep(0.2)
    end = {name: rss_kib(pid) for name, pid in pids.items()}
    return Result(args.pair, args.connections, elapsed, totals, start, peak, end)


def report(result: Result) -> str:
    totals = result.totals
    moved = totals.bytes_sent + totals.bytes_received
    lines = [
        f"soak: {result.connections} concurrent connections for {result.seconds:.1f} s through "
        f"ip-to-vsock -> emulated vsock -> vsock-to-ip ({result.pair} path)",
        f"  bytes moved:           {moved:,} ({totals.bytes_sent:,} sent, "
        f"{totals.bytes_received:,} echoed back; {moved / result.seconds / 1e6:.0f} MB/s)",
        f"  connections completed: {totals.connections_completed:,} "
        f"({totals.half_closed:,} half-closed, {totals.fully_closed:,} closed both ways)",
        f"  connections lost:      {totals.connections_lost:,} {totals.failures or ''}".rstrip(),
        f"  bytes lost:            {totals.bytes_lost:,}",
    ]
    for name in result.rss_start_kib:
        start, peak, end = (
            values[name] / 1024
            for values in (result.rss_start_kib, result.rss_peak_kib, result.rss_end_kib)
        )
        lines.append(
            f"  resident memory, {name + ':':12s} start {start:.1f} MiB, peak {peak:.1f} MiB, "
            f"end {end:.1f} MiB"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration (60)")
    parser.add_argument("--connections", type=int, default=500, help="concurrent (500)")
    parser.add_argument("--pair", choices=["splice", "copy"], default="splice")
    parser.add_argument("--connection-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = parser.parse_args()
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS}]")
    if not 0 < args.connections <= 5000:
        parser.error("--connections must be in [1, 5000]")

    with (
        tempfile.TemporaryDirectory(prefix="pf-soak-") as workdir,
        echo_server(Path(workdir)) as server,
        pair(args.pair, server, Path(workdir)) as through,
    ):
        result = uvloop.run(soak(args, through.port, through.pids))
    print(report(result), flush=True)
    if args.json:
        print(json.dumps(asdict(result)), flush=True)
    lost = result.totals.connections_lost or result.totals.bytes_lost
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
