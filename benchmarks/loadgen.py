"""Load generator and echo server for the benchmarks, one process each.

    python -m benchmarks.loadgen echo --port P --lifetime S [--unix PATH]
    python -m benchmarks.loadgen rate --port P --concurrency C --duration S
    python -m benchmarks.loadgen pingpong --port P --connections C --duration S
    python -m benchmarks.loadgen hold --port P --connections N

Every mode takes --address (default 127.0.0.1); rate takes --request-file, the bytes each
connection sends (and waits to have echoed), e.g. an HTTP request head or a TLS ClientHello,
and --connect-to HOST:PORT, which makes each connection ask the proxy at --address and --port
for a tunnel there first (HTTP CONNECT, waiting for its 200).

Clients print one JSON object on stdout. Everything runs on uvloop with asyncio protocols
(no streams), so that the client costs less than the proxies it measures; the benchmark
checks that by running the same client against the echo server directly. Every mode is
bounded in time: the echo server stops after --lifetime, the clients after --duration (plus
a fixed grace period).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from functools import partial
from typing import cast

import uvloop

HOST = "127.0.0.1"
REQUEST = b"q" * 64
CONNECT_TO: str | None = None  # rate: HTTP CONNECT to this HOST:PORT first
GRACE = 30.0  # seconds a client may run past its duration before it gives up


# --- echo server ------------------------------------------------------------------------------


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close when the client does


async def echo(port: int, lifetime: float, unix: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    if unix:  # on a Unix socket: an emulated vsock address
        server = await loop.create_unix_server(_Echo, unix, backlog=4096)
    else:
        server = await loop.create_server(_Echo, HOST, port, backlog=4096, reuse_address=True)
    print(json.dumps({"listening": unix or port}), flush=True)
    await asyncio.sleep(lifetime)
    server.close()


# --- connection rate: connect, 64-byte request, 64-byte echo, close -------------------------


class _OneRequest(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[bool]) -> None:
        self.done = done
        self.received = 0
        self.in_tunnel = CONNECT_TO is None  # else: the proxy's answer to CONNECT comes first
        self.answer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.in_tunnel:
            self.transport.write(REQUEST)
        else:
            target = CONNECT_TO
            self.transport.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())

    def data_received(self, data: bytes) -> None:
        if not self.in_tunnel:
            self.answer += data
            end = self.answer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.answer.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                self.transport.close()  # connection_lost counts it as failed
                return
            self.in_tunnel = True
            data = self.answer[end + 4 :]
            self.transport.write(REQUEST)
        self.received += len(data)
        if self.received >= len(REQUEST):
            self.transport.close()
            if not self.done.done():
                self.done.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(False)


async def rate(port: int, concurrency: int, duration: float, warmup: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, deadline = start + warmup, start + warmup + duration
    completed = failed = 0

    async def worker() -> None:
        nonlocal completed, failed
        while (now := loop.time()) < deadline:
            done: asyncio.Future[bool] = loop.create_future()
            try:
                await loop.create_connection(partial(_OneRequest, done), HOST, port)
                ok = await asyncio.wait_for(done, GRACE)
            except (OSError, TimeoutError):
                ok = False
            if now >= measure_from:
                if ok:
                    completed += 1
                else:
                    failed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"connections_per_s": completed / duration, "completed": completed, "failed": failed}


# --- ping-pong: 1 byte each way over persistent connections ---------------------------------


class _PingPong(asyncio.Protocol):
    def __init__(
        self, samples: list[float], measure_from: float, deadline: float, done: asyncio.Future[None]
    ) -> None:
        self.samples, self.measure_from, self.deadline = samples, measure_from, deadline
        self.done = done
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._ping()

    def _ping(self) -> None:
        self.sent_at = time.perf_counter()
        self.transport.write(b"p")

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if now >= self.measure_from:
            self.samples.append(now - self.sent_at)
        if now < self.deadline:
            self._ping()
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def pingpong(port: int, connections: int, duration: float, warmup: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    samples: list[float] = []
    start = time.perf_counter()
    measure_from, deadline = start + warmup, start + warmup + duration
    finished = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        protocol = partial(_PingPong, samples, measure_from, deadline, done)
        await loop.create_connection(protocol, HOST, port)
        finished.append(done)
    await asyncio.wait_for(asyncio.gather(*finished), duration + warmup + GRACE)
    samples.sort()
    return {
        "requests_per_s": len(samples) / duration,
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
        "samples": len(samples),
    }


# --- hold: many idle connections, checked before and after --------------------------------


class _Held(asyncio.Protocol):
    def __init__(self) -> None:
        self.echo: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    async def roundtrip(self, byte: bytes) -> bool:
        self.echo = asyncio.get_running_loop().create_future()
        self.transport.write(byte)
        return await self.echo == byte

    def data_received(self, data: bytes) -> None:
        if self.echo is not None and not self.echo.done():
            self.echo.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.echo is not None and not self.echo.done():
            self.echo.set_result(b"")


async def hold(port: int, connections: int) -> dict[str, int]:
    """Open `connections`, each echoing once; report; on a line from stdin, echo again."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(100)  # connects in flight at once

    async def open_one() -> _Held | None:
        async with gate:
            try:
                _, protocol = await loop.create_connection(_Held, HOST, port)
                return protocol if await protocol.roundtrip(b"o") else None
            except OSError:
                return None

    async with asyncio.timeout(120):
        opened = await asyncio.gather(*(open_one() for _ in range(connections)))
    held = [protocol for protocol in opened if protocol is not None]
    print(json.dumps({"established": len(held)}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    async with asyncio.timeout(120):
        echoed = await asyncio.gather(*(protocol.roundtrip(b"k") for protocol in held))
    for protocol in held:
        protocol.transport.close()
    return {"established": len(held), "echoed_after": sum(echoed)}


def main() -> None:
    global HOST, REQUEST, CONNECT_TO  # set once from the command line, before anything runs
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    parser.add_argument("mode", choices=["echo", "rate", "pingpong", "hold"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--lifetime", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--address", default=HOST, help="where to listen or connect")
    parser.add_argument("--unix", help="echo: listen on this Unix socket path instead")
    parser.add_argument(
        "--request-file", help="rate: send this file's bytes as the request (default 64 x 'q')"
    )
    parser.add_argument("--connect-to", help="rate: HTTP CONNECT to this HOST:PORT first")
    args = parser.parse_args()
    HOST = args.address
    CONNECT_TO = args.connect_to
    if args.request_file:
        with open(args.request_file, "rb") as request:
            REQUEST = request.read()
    if args.mode == "echo":
        uvloop.run(echo(args.port, args.lifetime, args.unix))
        return
    if args.mode == "rate":
        result: object = uvloop.run(rate(args.port, args.concurrency, args.duration, args.warmup))
    elif args.mode == "pingpong":
        result = uvloop.run(pingpong(args.port, args.connections, args.duration, args.warmup))
    else:
        result = uvloop.run(hold(args.port, args.connections))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
