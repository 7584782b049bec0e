"""A small fake hybrid vsock backend on a Unix socket, for fast failure-path tests.

It speaks the host side of the protocol as vhost-device-vsock and Firecracker do
(/work/shared/hybrid/README.md), with the guest played by a few canned behaviours. The real
backend, in a QEMU guest, is the ground truth (tests/hybrid); this one makes each failure
on demand and in milliseconds:

    ok        answer OK <port> after OK_DELAY (bytes that came meanwhile are recorded in
              `early`: a real backend would drop them), then the guest echoes; the host's
              EOF (a SHUT_WR, which the
              real backend turns into a full shutdown for the guest) ends the guest's stream:
              it stops, with whatever it had not echoed lost
    reply     OK, then the guest reads REQUEST_SIZE bytes and answers REPLY, then closes; a
              reply is lost if the host's EOF came first, as a real guest's would fail
    reply+open  as reply, but the guest then keeps its stream open, as one that half-closed
              would look from the host (a guest's half-close does not cross)
    ok+data   OK and the guest's first bytes (GREETING) in one write, then echo
    sink      OK, then the guest keeps what it reads (`received`) and, after the first bytes,
              sends one byte back (`sent_back`: whether the host's socket took it)
    eof       close at once: no listener on that guest port
    reset     close with the CONNECT line unread: the reader gets ECONNRESET (not up yet)
    garbage   answer a line that is not OK
    silent    never answer

`plan(port, attempt)` picks the behaviour for each CONNECT (attempt counts from 0 per port).
Bytes that came in the same read as the CONNECT line are recorded in `early` too.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.integration.helpers import ThreadedServer

REQUEST_SIZE = 1000
REPLY = b"the reply, " * 1000
GREETING = b"hello from the guest\n"
OK_DELAY = 0.05


def bind_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(128)
    return sock


class FakeBackend(ThreadedServer):
    def __init__(self, uds_path: Path, plan: Callable[[int, int], str]) -> None:
        self.uds_path = uds_path
        self.plan = plan
        self.attempts: Counter[int] = Counter()
        self.lines: list[bytes] = []
        self.early: list[bytes] = []
        self.replies_lost = 0
        self.received = bytearray()
        self.sent_back: bool | None = None
        self.lock = threading.Lock()
        super().__init__(bind_unix(uds_path))

    def handle(self, conn: socket.socket) -> None:
        select.select([conn], [], [], 30)  # the CONNECT line, or the client's close
        first = conn.recv(256, socket.MSG_PEEK)
        line, newline, early = first.partition(b"\n")
        with self.lock:
            self.lines.append(line + newline)
            if early:
                self.early.append(early)
        words = line.split()
        if not newline or len(words) != 2 or words[0].lower() != b"connect":
            return  # as the real backend: a malformed request is dropped
        port = int(words[1])
        with self.lock:
            attempt = self.attempts[port]
            self.attempts[port] += 1
        mode = self.plan(port, attempt)
        if mode == "reset":
            return  # closed with the line unread: the client reads ECONNRESET
        conn.recv(len(first))  # the line, and what came with it (dropped, as for real)
        self._behave(conn, mode, port)

    def _behave(self, conn: socket.socket, mode: str, port: int) -> None:
        if mode == "eof":
            return
        if mode == "garbage":
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n")
            return
        if mode == "silent":
            while conn.recv(1 << 16):
                pass
            return
        if mode == "ok+data":
            conn.sendall(b"OK %d\n" % port + GREETING)
        else:
            if mode == "ok":
                time.sleep(OK_DELAY)
                waiting = select.select([conn], [], [], 0)[0]
                early = conn.recv(1 << 16, socket.MSG_PEEK) if waiting else b""
                if early:
                    with self.lock:
                        self.early.append(early)
            conn.sendall(b"OK %d\n" % port)
        if mode in ("reply", "reply+open"):
            self._reply(conn)
            if mode == "reply+open":
                while conn.recv(1 << 16):
                    pass
        elif mode == "sink":
            self._sink(conn)
        else:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def _sink(self, conn: socket.socket) -> None:
        while data := conn.recv(1 << 16):
            with self.lock:
                self.received += data
            if self.sent_back is None:
                try:
                    conn.sendall(b"?")
                    self.sent_back = True
                except OSError:  # the host shut its reading side: the backend's send fails
                    self.sent_back = False

    def _reply(self, conn: socket.socket) -> None:
        received = b""
        while len(received) < REQUEST_SIZE and (chunk := conn.recv(REQUEST_SIZE - len(received))):
            received += chunk
        time.sleep(0.2)  # the guest works on it; a host EOF meanwhile ends its stream
        conn.setblocking(False)
        try:
            ended = conn.recv(1) == b""
        except BlockingIOError:
            ended = False
        conn.setblocking(True)
        if ended:
            with self.lock:
                self.replies_lost += 1
            return
        conn.sendall(REPLY)


@contextmanager
def fake_backend(directory: Path, plan: Callable[[int, int], str]) -> Iterator[FakeBackend]:
    """A FakeBackend at `directory`/vm.vsock for the block."""
    backend = FakeBackend(directory / "vm.vsock", plan)
    try:
        yield backend
    finally:
        backend.close()
