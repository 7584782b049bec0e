"""Test helpers: the real console scripts as processes, and small servers and clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click
import pytest

from tests.vsocks import SLOWDOWN, Vsock

RAW_COMMANDS = [  # the four raw-proxy console scripts
    "ip-to-vsock-raw-incoming",
    "ip-to-vsock-raw-outgoing",
    "vsock-to-ip-raw-incoming",
    "vsock-to-ip-raw-outgoing",
]


def proxy_commands() -> dict[str, click.Command]:
    """The commands of the proxies' kinds (the eleven, and any added later), loaded."""
    from pf_proxy.kinds import KINDS

    return {name: kind.command() for name, kind in KINDS.items()}


def console_scripts() -> dict[str, click.Command]:
    """The project's console scripts (the proxies' commands and pf-proxy), loaded."""
    found = {}
    for entry in entry_points(group="console_scripts"):
        if entry.value.startswith("pf_proxy."):
            command = entry.load()
            assert isinstance(command, click.Command), entry
            found[entry.name] = command
    return found


class Proxy:
    """A console script running as a process, its stdout and stderr in files.

    `prefix` goes before the command (e.g. `ip netns exec NAME`); `timeout` is how long
    `wait_for` and `stop` wait by default.
    """

    def __init__(
        self,
        args: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
        timeout: float = 10 * SLOWDOWN,
    ) -> None:
        self.args = list(args)
        self.timeout = timeout
        stem = log_dir / f"{'-'.join(prefix[-1:])}-{Path(args[0]).name}-{time.monotonic_ns()}"
        self.stdout_path = stem.with_suffix(".out")
        self.stderr_path = stem.with_suffix(".err")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [*prefix, *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for(self, text: str, *, stream: str = "stdout", timeout: float | None = None) -> None:
        """Wait until `text` appears in the process's output; fail with both outputs if not."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            if text in (self.stdout if stream == "stdout" else self.stderr):
                return
            if time.monotonic() > deadline or self.process.poll() is not None:
                break
            time.sleep(0.02)
        if text in (self.stdout if stream == "stdout" else self.stderr):
            return  # written just before the process ended
        raise AssertionError(
            f"{text!r} not seen on {stream} of {self.args} (exit {self.process.poll()}):\n"
            f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        )

    def wait_ready(self) -> Proxy:
        self.wait_for("Listening on:")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        try:
            return self.process.wait(timeout or self.timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            return self.process.wait(timeout or self.timeout)


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


class ThreadedServer:
    """Accepts on `listener` in a thread and runs `handle` on a thread per connection;
    counts the connections it accepted."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.port: int = listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            try:
                self.handle(conn)
            except OSError:
                pass

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.listener.close()


def echo(conn: socket.socket) -> None:
    """Echo every byte; half-close after the client does."""
    while data := conn.recv(1 << 16):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


class EchoServer(ThreadedServer):
    """A TCP echo server on loopback: echoes every byte, half-closes after the client does."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(listening_socket(host))

    def handle(self, conn: socket.socket) -> None:
        echo(conn)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# Both event loops (PF_PROXY_LOOP): a test marked with this gets `loop`, the environment that
# selects one, and checks with `served_on` that the process ran on it.
BOTH_LOOPS = pytest.mark.parametrize(
    "loop", [{}, {"PF_PROXY_LOOP": "asyncio"}], ids=["uvloop", "asyncio"]
)


def served_on(loop: dict[str, str], stdout: str) -> bool:
    """Whether a process's log says it ran on the loop `loop` selects (the default, uvloop,
    is not named; asyncio's is)."""
    return ("Event loop: asyncio (PF_PROXY_LOOP)" in stdout) == bool(loop)


def two_free_ports() -> int:
    """A port P with P and P + 1 both free to listen on (as worker 1's and worker 2's
    /metrics): a free port's neighbour may be another socket's, or in TIME_WAIT."""
    for _ in range(100):
        port = free_port()
        if port >= 0xFFFF:
            continue
        with socket.socket() as first, socket.socket() as second:
            try:
                for sock, number in ((first, port), (second, port + 1)):
                    sock.bind(("127.0.0.1", number))
                    sock.listen()
            except OSError:
                continue
        return port
    raise AssertionError("no two free ports in a row")


def exchange_on(sock: socket.socket, address: Any, payload: bytes) -> bytes:
    """Connect `sock`, send all of `payload`, shut down writing; return everything received
    until EOF. A thread sends while this one reads, so large payloads cannot deadlock; a
    failed send fails the exchange."""
    with sock:
        if address is not None:  # None: already connected
            sock.connect(address)
        errors: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except BaseException as exc:
                errors.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
        sender.join(sock.gettimeout())
        assert not errors, errors
        return b"".join(chunks)


def round_trip(port: int, payload: bytes, timeout: float = 30) -> bytes:
    """Send `payload` at once to an echo behind 127.0.0.1:`port` and read as much back,
    without a half-close (which does not cross hybrid vsock)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        sender = threading.Thread(target=client.sendall, args=(payload,))
        sender.start()
        received = recv_exactly(client, len(payload))
        sender.join(timeout)
        return received


def exchange(
    address: Any, payload: bytes, *, family: int = socket.AF_INET, timeout: float = 30
) -> bytes:
    """`exchange_on` with a new socket of `family`."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    return exchange_on(sock, address, payload)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def run_briefly(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=20, env={**os.environ, **(env or {})}
    )


def run_all_briefly(
    commands: Sequence[Sequence[str]], env: dict[str, str] | None = None, timeout: float = 20
) -> list[subprocess.CompletedProcess[str]]:
    """`run_briefly` for several command lines at once (they run concurrently); a command
    still running after `timeout` seconds is killed (return code -9, SIGKILL)."""
    processes = [
        subprocess.Popen(
            list(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        for args in commands
    ]
    deadline = time.monotonic() + timeout
    results = []
    for args, process in zip(commands, processes, strict=True):
        try:
            stdout, stderr = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results.append(subprocess.CompletedProcess(list(args), process.returncode, stdout, stderr))
    return results


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return data


def read_until_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything received, and how the stream ended: "eof" or "reset"."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), "reset"
    return b"".join(chunks), "eof"


def closed(sock: socket.socket) -> bool:
    """True once the peer has closed (EOF or reset); waits up to the socket's timeout."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def socket_fds(pid: int) -> int:
    """The sockets a process holds (its pipes, which the relay pools, are not counted)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass  # closed while we looked
    return count


@contextmanager
def echo_process(*args: str, log_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """tests.integration.echo_process as a process of its own, killed (by pid) at the end."""
    errors = open(log_dir / f"echo-{time.monotonic_ns()}.err", "w")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.echo_process", *args],
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready", (log_dir, args)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        errors.close()


# How long the sockets of failed connections may take to be released.
STEADY_WAIT = 30.0 * SLOWDOWN


@contextmanager
def holding_steady(vsock: Vsock, *proxies: Proxy) -> Iterator[None]:
    """Count each proxy's sockets now; after the block, wait until each holds that many
    again and no vsock connection is established, or fail saying what was left."""
    before = {proxy.process.pid: socket_fds(proxy.process.pid) for proxy in proxies}
    yield

    def released() -> bool:
        return vsock.established() == 0 and all(
            socket_fds(pid) == count for pid, count in before.items()
        )

    try:
        wait_until(released, "the failed connections' sockets to be released", timeout=STEADY_WAIT)
    except AssertionError:
        now = {pid: socket_fds(pid) for pid in before}
        raise AssertionError(
            f"sockets before {before}, after {now}; "
            f"{vsock.established()} {vsock.kind} connections established"
        ) from None


@contextmanager
def steady_proxy(vsock: Vsock, *args: str, log_dir: Path) -> Iterator[Proxy]:
    """The console script `args` over `vsock`, ready; held to `holding_steady` at the end."""
    with running(*args, log_dir=log_dir, env=vsock.env) as proxy, holding_steady(vsock, proxy):
        yield proxy
