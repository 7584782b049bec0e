"""An echo server on an event loop of its own, in a thread: thousands of connections cost it
little (the threaded `helpers.EchoServer` takes a thread each)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from tests.vsocks import SLOWDOWN

WAIT = 30.0 * SLOWDOWN


class _Echo(asyncio.Protocol):
    def __init__(self, server: EchoServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections += 1
        self.server.transports.add(self.transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:  # the client is not reading: stop reading from it
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close once everything is written: EOF follows the echo

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.transports.discard(self.transport)


class EchoServer:
    """Echoes every byte on each connection accepted on `listener` (TCP or Unix); after the
    client's EOF, sends what is left and closes. Runs its own event loop in a thread."""

    def __init__(self, listener: socket.socket) -> None:
        self.address = listener.getsockname()
        self.connections = 0
        self.transports: set[asyncio.Transport] = set()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(listener, ready), daemon=True)
        self.thread.start()
        assert ready.wait(WAIT), "echo server did not start"

    def _run(self, listener: socket.socket, ready: threading.Event) -> None:
        loop = self.loop
        listener.setblocking(False)
        if listener.family == socket.AF_UNIX:
            start = loop.create_unix_server(lambda: _Echo(self), sock=listener, backlog=4096)
        else:
            start = loop.create_server(lambda: _Echo(self), sock=listener, backlog=4096)
        server = loop.run_until_complete(start)
        ready.set()
        loop.run_forever()
        server.close()
        for transport in list(self.transports):
            transport.abort()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()

    @property
    def port(self) -> int:
        port: int = self.address[1]
        return port

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)


@contextmanager
def echo_on(listener: socket.socket) -> Iterator[EchoServer]:
    server = EchoServer(listener)
    try:
        yield server
    finally:
        server.close()


def unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4096)
    return sock


def tcp_listener(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    return sock
