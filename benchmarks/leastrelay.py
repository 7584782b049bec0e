"""The least a Python relay can do per connection: a floor for benchmarks/cpucost.py.

    python -m benchmarks.leastrelay --port PORT --unix PATH

Accepts TCP connections on 127.0.0.1:PORT and relays each to the Unix socket PATH, both ways,
with a half-close at each EOF, built the way pf-proxy's relay is (uvloop, one edge-triggered
epoll set watched as one reader, recv_into and send through one buffer) and with nothing
else: no routes, no logging, no limits, no timeouts, no metrics, no failure handling (a
failed connection leaks). Not a product: what its CPU time per connection shows is how far
below pf-proxy's figure any relay written in Python could go on the same machine and
interpreter, next to nginx's, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import select
import socket
from collections.abc import Callable

import uvloop

_EDGE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_CHUNK = 64 * 1024
_buffer = bytearray(_CHUNK)
_view = memoryview(_buffer)


class Connection:
    """Two sockets; each EOF half-closes the other side, the second closes both."""

    __slots__ = ("eofs", "inbound", "upstream")

    def __init__(self, inbound: socket.socket, upstream: socket.socket) -> None:
        self.inbound, self.upstream, self.eofs = inbound, upstream, 0

    def forward(self, _events: int) -> None:
        self._copy(self.inbound, self.upstream)

    def backward(self, _events: int) -> None:
        self._copy(self.upstream, self.inbound)

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                count = src.recv_into(_buffer)
                if count == 0:
                    self._eof(dst)
                    return
                dst.send(_view[:count])
                if count < _CHUNK:
                    return
        except BlockingIOError:
            return

    def _eof(self, dst: socket.socket) -> None:
        self.eofs += 1
        if self.eofs == 1:
            dst.shutdown(socket.SHUT_WR)
            return
        del handlers[self.inbound.fileno()], handlers[self.upstream.fileno()]
        self.inbound.close()
        self.upstream.close()


handlers: dict[int, Callable[[int], None]] = {}


async def serve(port: int, path: str) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)
    events = select.epoll()

    def accept() -> None:
        while True:
            try:
                inbound, _ = listener.accept()
            except BlockingIOError:
                return
            inbound.setblocking(False)
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            upstream.connect(path)
            connection = Connection(inbound, upstream)
            handlers[inbound.fileno()] = connection.forward
            handlers[upstream.fileno()] = connection.backward
            events.register(inbound.fileno(), _EDGE)
            events.register(upstream.fileno(), _EDGE)

    def dispatch() -> None:
        for fd, mask in events.poll(0, 256):
            handler = handlers.get(fd)
            if handler is not None:
                handler(mask)

    loop = asyncio.get_running_loop()
    loop.add_reader(listener.fileno(), accept)
    loop.add_reader(events.fileno(), dispatch)
    print(f"Listening on: 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--unix", required=True)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.port, args.unix))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
