"""A prototype for measurement only: many UDP flows multiplexed over one long-lived stream.

    python -m benchmarks.muxpair outer --listen PORT --stream PATH
    python -m benchmarks.muxpair inner --stream PATH --upstream PORT

The alternative to udp-to-vsock/vsock-to-udp's stream per flow that issue 12 asks to measure:
`outer` receives datagrams on 127.0.0.1:PORT and sends each down one Unix stream (standing in
for vsock) as a frame with a flow id: id (4 bytes), length (2 bytes), datagram; `inner`
accepts that one stream and gives each flow id a UDP socket connected to 127.0.0.1:PORT.
Replies come back the same way. Built like the real proxies (uvloop readiness callbacks, the
same shared buffers) but with nothing else: no idle expiry (the inner side closes its oldest
UDP socket beyond MAX_SOCKETS), no failure handling, no backpressure. So its figures are an
upper bound for the design, not a product.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct

import uvloop

HEADER = struct.Struct("!IH")
MAX_SOCKETS = 8000
_buffer = bytearray(HEADER.size + 0xFFFF)
_view = memoryview(_buffer)
_space = _view[HEADER.size :]


class Stream:
    """The one stream: frames out (kept in order when the socket is full), frames in."""

    def __init__(self, sock: socket.socket, deliver: object) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.deliver = deliver
        self.held = bytearray()
        self.incoming = bytearray()
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self.readable)

    def send(self, frame: memoryview) -> None:
        if self.held:
            self.held += frame
            return
        try:
            sent = self.sock.send(frame)
        except BlockingIOError:
            sent = 0
        if sent < len(frame):
            self.held += frame[sent:]
            self.loop.add_writer(self.sock.fileno(), self.writable)

    def writable(self) -> None:
        sent = self.sock.send(self.held)
        del self.held[:sent]
        if not self.held:
            self.loop.remove_writer(self.sock.fileno())

    def readable(self) -> None:
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return
        if not data:
            os._exit(0)
        incoming = self.incoming
        incoming += data
        position = 0
        while len(incoming) - position >= HEADER.size:
            flow, length = HEADER.unpack_from(incoming, position)
            end = position + HEADER.size + length
            if end > len(incoming):
                break
            self.deliver(flow, incoming[position + HEADER.size : end])  # type: ignore[operator]
            position = end
        del incoming[:position]


def frame(flow: int, size: int) -> memoryview:
    HEADER.pack_into(_buffer, 0, flow, size)
    return _view[: HEADER.size + size]


async def outer(listen: int, path: str) -> None:
    loop = asyncio.get_running_loop()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    udp.bind(("127.0.0.1", listen))
    udp.setblocking(False)
    link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    link.connect(path)
    ids: dict[object, int] = {}
    clients: dict[int, object] = {}

    def reply(flow: int, datagram: bytes) -> None:
        try:
            udp.sendto(datagram, clients[flow])  # type: ignore[call-overload]
        except OSError:
            pass

    stream = Stream(link, reply)

    def readable() -> None:
        for _ in range(32):
            try:
                size, client = udp.recvfrom_into(_space)
            except BlockingIOError:
                return
            flow = ids.get(client)
            if flow is None:
                flow = ids[client] = len(ids) + 1
                clients[flow] = client
            stream.send(frame(flow, size))

    loop.add_reader(udp.fileno(), readable)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def inner(path: str, upstream: int) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    listener.bind(path)
    listener.listen(1)
    print("ready", flush=True)
    link, _ = await loop.sock_accept(listener)
    sockets: dict[int, socket.socket] = {}
    stream: Stream

    def answer(flow: int, sock: socket.socket) -> None:
        for _ in range(32):
            try:
                size = sock.recv_into(_space)
            except OSError:
                return
            stream.send(frame(flow, size))

    def forward(flow: int, datagram: bytes) -> None:
        sock = sockets.get(flow)
        if sock is None:
            if len(sockets) >= MAX_SOCKETS:
                oldest = sockets.pop(next(iter(sockets)))
                loop.remove_reader(oldest.fileno())
                oldest.close()
            sock = sockets[flow] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(("127.0.0.1", upstream))
            loop.add_reader(sock.fileno(), answer, flow, sock)
        try:
            sock.send(datagram)
        except OSError:
            pass

    stream = Stream(link, forward)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("side", choices=["outer", "inner"])
    parser.add_argument("--listen", type=int)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--upstream", type=int)
    args = parser.parse_args()
    if args.side == "outer":
        uvloop.run(outer(args.listen, args.stream))
    else:
        uvloop.run(inner(args.stream, args.upstream))


if __name__ == "__main__":
    main()
