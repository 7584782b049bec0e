"""Test helpers: the real console scripts as processes, and small servers and clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Proxy:
    """A console script running as a process, its stdout and stderr in files."""

    def __init__(
        self,
        args: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.args = list(args)
        name = f"{args[0]}-{time.monotonic_ns()}"
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [*prefix, *args], stdout=out, stderr=err, env={**os.environ, **(env or {})}
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for(self, text: str, *, stream: str = "stdout", timeout: float = 10) -> None:
        """Wait until `text` appears in the process's output; fail with both outputs if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in (self.stdout if stream == "stdout" else self.stderr):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(
            f"{text!r} not seen from {self.args} (exit {self.process.poll()}):\n"
            f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        )

    def wait_ready(self) -> Proxy:
        self.wait_for("Listening on:")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            return self.process.wait(timeout)


@contextmanager
def running(
    *args: str, log_dir: Path, env: dict[str, str] | None = None, ready: bool = True
) -> Iterator[Proxy]:
    proxy = Proxy(args, log_dir, env)
    try:
        if ready:
            proxy.wait_ready()
        yield proxy
    finally:
        proxy.stop()


class EchoServer:
    """A TCP echo server in a thread: echoes every byte, half-closes after the client does."""

    def __init__(self, host: str = "127.0.0.1", family: int = socket.AF_INET) -> None:
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(1024)
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def exchange(
    address: Any, payload: bytes, *, family: int = socket.AF_INET, timeout: float = 30
) -> bytes:
    """Send all of `payload`, shut down writing, and return everything received until EOF.

    Sending and receiving run at once (a thread sends), so large payloads cannot deadlock.
    """
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
        sender.join(timeout)
        return b"".join(chunks)
