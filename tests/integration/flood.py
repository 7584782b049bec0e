"""Hold connections against a port for a while, the way a slowloris attacker does: each is
idle, or sends a request head one byte at a time that never ends; whichever the server closes
is opened again at once. Bounded: COUNT connections, SECONDS seconds, then it exits.

    python -m tests.integration.flood HOST PORT COUNT SECONDS

Prints "holding N" once the first N connections are open, and at the end "reopened R" (how
often the server closed one).
"""

from __future__ import annotations

import resource
import selectors
import socket
import sys
import time

DRIP = b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100_000  # never ends: no blank line
DRIP_EVERY = 0.2  # seconds between a dripping connection's bytes


def main(host: str, port: int, count: int, seconds: float) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (count + 64, count + 64))
    selector = selectors.DefaultSelector()
    dripping: dict[socket.socket, int] = {}  # a dripping connection: the bytes it sent
    reopened = 0

    def open_one(index: int) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((host, port))
        selector.register(sock, selectors.EVENT_READ, index)
        if index % 2:
            dripping[sock] = 0

    for index in range(count):
        open_one(index)
    print(f"holding {count}", flush=True)
    end = time.monotonic() + seconds
    next_drip = time.monotonic()
    while time.monotonic() < end:
        for key, _ in selector.select(timeout=0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:  # closed by the server: open another
                selector.unregister(sock)
                dripping.pop(sock, None)
                sock.close()
                reopened += 1
                open_one(key.data)
        if time.monotonic() >= next_drip:
            next_drip += DRIP_EVERY
            for sock, sent in list(dripping.items()):
                try:
                    sock.send(DRIP[sent % len(DRIP) : sent % len(DRIP) + 1])
                    dripping[sock] = sent + 1
                except OSError:
                    pass  # not connected yet, or closed: the select loop sees to it
    print(f"reopened {reopened}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
