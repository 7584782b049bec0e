"""An echo server as a process of its own, for tests that kill and restart an upstream.

    python -m tests.integration.echo_process tcp 127.0.0.1 PORT
    python -m tests.integration.echo_process tcp-loop 127.0.0.1 PORT  (an event loop, not a
                                              thread per connection: for thousands of them)
    python -m tests.integration.echo_process unix /path/to/88_5000.sock
    python -m tests.integration.echo_process vsock CID PORT   (inside the guest stage only)
    python -m tests.integration.echo_process udp HOST PORT
    python -m tests.integration.echo_process tcp-reply 127.0.0.1 PORT SIZE   (reads SIZE bytes,
                                              answers reply_for(them), closes: no EOF needed)

Prints "ready" once listening, then echoes every byte of every connection and half-closes
after the peer does; over UDP, sends every datagram back to where it came from. A stale
socket file at the Unix path is replaced.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import sys
import threading
from collections.abc import Callable

from tests.vsocks import in_guest


def echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(1 << 16):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def reply_for(request: bytes) -> bytes:
    """What `tcp-reply` answers to `request`: 128 KiB that depend on every byte of it."""
    return hashlib.sha256(request).hexdigest().encode() * 2048


def reply(conn: socket.socket, size: int) -> None:
    with conn:
        try:
            request = b""
            while len(request) < size and (chunk := conn.recv(size - len(request))):
                request += chunk
            conn.sendall(reply_for(request))
        except OSError:
            pass


def echo_datagrams(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(1 << 16)
        try:
            sock.sendto(data, peer)
        except OSError:
            pass


def main() -> None:
    kind = sys.argv[1]
    if kind == "udp":
        echo_datagrams(sys.argv[2], int(sys.argv[3]))
        return
    if kind == "tcp-loop":
        from tests.integration.loopecho import EchoServer, tcp_listener

        EchoServer(tcp_listener(sys.argv[2], int(sys.argv[3])))
        print("ready", flush=True)
        threading.Event().wait()
        return
    serve: Callable[[socket.socket], None] = echo
    if kind == "tcp-reply":
        serve = functools.partial(reply, size=int(sys.argv[4]))
    if kind in ("tcp", "tcp-reply"):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((sys.argv[2], int(sys.argv[3])))
    elif kind == "vsock":
        if not in_guest():
            sys.exit("real AF_VSOCK only inside the guest stage")
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        listener.bind((int(sys.argv[2]), int(sys.argv[3])))
    else:
        path = sys.argv[2]
        if os.path.exists(path):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
    listener.listen(128)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
