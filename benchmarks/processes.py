"""The processes a benchmark runs: proxy pairs (ours or socat), servers, load clients.

A *pair* is what a client connects to on its way to a server on 127.0.0.1:

    direct   the server itself, no proxy
    socat    socat TCP-LISTEN ... UNIX-CONNECT  ->  socat UNIX-LISTEN ... TCP   (fork;
             backlog 1024 like ours, not socat's default 5)
    splice   ip-to-vsock -> emulated vsock -> vsock-to-ip
    copy     the same with PF_PROXY_NO_SPLICE=1 (the user-space copy path)
    vsock    ip-to-vsock -> real AF_VSOCK (CID 1) -> vsock-to-ip: inside the guest stage only
    vsock-copy   the same with PF_PROXY_NO_SPLICE=1
    socat-vsock  socat TCP-LISTEN ... VSOCK-CONNECT:1:P  ->  socat VSOCK-LISTEN:P ... TCP
             (backlog 1024): inside the guest stage only

Every long-running process is started under `timeout`, so it ends by itself even if the
benchmark is killed; normally the benchmark stops it first, by pid.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.vsocks import in_guest

LIFETIME = 1200  # seconds: hard upper bound for any server or proxy process
VSOCK_CID = 88
VMADDR_CID_ANY = 0xFFFFFFFF
_names = itertools.count()


@dataclass
class Pair:
    kind: str
    port: int  # where clients connect
    pids: dict[str, int] = field(default_factory=dict)  # proxy name -> pid of the proxy itself
    metrics_ports: dict[str, int] = field(default_factory=dict)  # proxy name -> its --metrics


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Started:
    proc: subprocess.Popen[bytes]
    stdout: Path

    def said(self, text: str) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.proc.args} exited with {self.proc.returncode}")
        return text in self.stdout.read_text()

    def command_pid(self, timeout: float = 10) -> int:
        """The pid of the command itself (`timeout` runs it as its child)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = children.read_text().split()
            if pids:
                return int(pids[0])
            time.sleep(0.01)
        raise RuntimeError(f"{self.proc.args} started no command")


@contextmanager
def process(
    args: Sequence[str], workdir: Path, env: dict[str, str] | None = None
) -> Iterator[Started]:
    """Run `args` under `timeout LIFETIME`, output to files in `workdir`; stop it on exit."""
    name = f"{Path(args[0]).name}-{next(_names)}"
    stdout = workdir / f"{name}.out"
    with open(stdout, "wb") as out, open(workdir / f"{name}.err", "wb") as err:
        proc = subprocess.Popen(
            ["timeout", str(LIFETIME), *args],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    try:
        yield Started(proc, stdout)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)  # timeout forwards it to the command
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def tcp_listening(port: int) -> bool:
    """True if something listens on TCP `port` (read from /proc, without connecting)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            return True
    return False


# --- servers ----------------------------------------------------------------------------------


@contextmanager
def echo_server(workdir: Path) -> Iterator[int]:
    port = free_port()
    args = [sys.executable, "-m", "benchmarks.loadgen", "echo", "--port", str(port)]
    with process(args, workdir):
        wait_until(lambda: tcp_listening(port), "the echo server")
        yield port


@contextmanager
def iperf3_server(workdir: Path) -> Iterator[int]:
    port = free_port()
    with process(["iperf3", "--server", "--bind", "127.0.0.1", "--port", str(port)], workdir):
        wait_until(lambda: tcp_listening(port), "the iperf3 server")
        yield port


# --- proxy pairs ------------------------------------------------------------------------------


@contextmanager
def pair(
    kind: str,
    target_port: int,
    workdir: Path,
    vsock_buffer_size: int | None = None,
    metrics: bool = False,
) -> Iterator[Pair]:
    """Start the pair `kind` in front of 127.0.0.1:`target_port` (`vsock_buffer_size`: our
    pair's --vsock-buffer-size; `metrics`: each of our proxies with --metrics on a port of
    its own)."""
    if kind == "direct":
        yield Pair(kind, target_port)
    elif kind == "socat":
        with _socat_pair(target_port, workdir) as started:
            yield started
    elif kind == "socat-vsock":
        with _socat_vsock_pair(target_port, workdir) as started:
            yield started
    elif kind in ("splice", "copy", "vsock", "vsock-copy"):
        extra = [] if vsock_buffer_size is None else ["--vsock-buffer-size", str(vsock_buffer_size)]
        with _our_pair(
            target_port,
            workdir,
            use_splice=not kind.endswith("copy"),
            real_vsock=kind.startswith("vsock"),
            extra=extra,
            metrics=metrics,
        ) as started:
            started.kind = kind
            yield started
    elif kind == "file":
        with _file_pair(target_port, workdir) as started:
            yield started
    else:
        raise ValueError(f"unknown pair {kind!r}")


@contextmanager
def _file_pair(target_port: int, workdir: Path) -> Iterator[Pair]:
    """Our pair as two proxies of one `pf-proxy run` process."""
    port, vsock_port = free_port(), free_port()
    file = workdir / f"pair-{port}.toml"
    file.write_text(
        f'[proxy.outer]\nkind = "ip-to-vsock"\nip-addr = "127.0.0.1:{port}"\n'
        f'vsock-addr = "{VSOCK_CID}:{vsock_port}"\n'
        f'[proxy.inner]\nkind = "vsock-to-ip"\nvsock-addr = "{VSOCK_CID}:{vsock_port}"\n'
        f'ip-addr = "127.0.0.1:{target_port}"\n'
    )
    env = {"PF_PROXY_VSOCK_DIR": str(workdir)}
    with process(["pf-proxy", "run", str(file)], workdir, env) as started:
        wait_until(lambda: started.said("[outer] Listening on:"), "pf-proxy run")
        yield Pair("file", port, {"pf-proxy run": started.command_pid()})


def _require_guest() -> None:
    # Real AF_VSOCK only inside the guest stage: this machine's vsock is the infrastructure's.
    if not in_guest():
        raise RuntimeError("real vsock pairs run only inside the guest stage (make bench-guest)")


@contextmanager
def _our_pair(
    target_port: int,
    workdir: Path,
    *,
    use_splice: bool,
    real_vsock: bool,
    extra: list[str],
    metrics: bool = False,
) -> Iterator[Pair]:
    port, vsock_port = free_port(), free_port()
    env = {"PF_PROXY_VSOCK_DIR": str(workdir)}
    listen_address = connect_address = f"{VSOCK_CID}:{vsock_port}"
    if real_vsock:
        _require_guest()
        env = {"PF_PROXY_VSOCK_DIR": ""}  # empty: real AF_VSOCK
        listen_address, connect_address = f"{VMADDR_CID_ANY}:{vsock_port}", f"1:{vsock_port}"
    if not use_splice:
        env["PF_PROXY_NO_SPLICE"] = "1"
    inner = ["vsock-to-ip", "-v", listen_address, "-i", f"127.0.0.1:{target_port}", *extra]
    outer = ["ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", connect_address, *extra]
    metrics_ports = {"ip-to-vsock": free_port(), "vsock-to-ip": free_port()} if metrics else {}
    if metrics:
        inner += ["--metrics", f"127.0.0.1:{metrics_ports['vsock-to-ip']}"]
        outer += ["--metrics", f"127.0.0.1:{metrics_ports['ip-to-vsock']}"]
    with process(inner, workdir, env) as inner_proc, process(outer, workdir, env) as outer_proc:
        for started in (inner_proc, outer_proc):
            wait_until(lambda s=started: s.said("Listening on:"), f"{started.proc.args}")
        pids = {"ip-to-vsock": outer_proc.command_pid(), "vsock-to-ip": inner_proc.command_pid()}
        yield Pair("", port, pids, metrics_ports)


@contextmanager
def _socat_pair(target_port: int, workdir: Path) -> Iterator[Pair]:
    port = free_port()
    path = workdir / f"socat-{port}.sock"
    inner = ["socat", f"UNIX-LISTEN:{path},fork,backlog=1024", f"TCP:127.0.0.1:{target_port}"]
    listen = f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"
    outer = ["socat", listen, f"UNIX-CONNECT:{path}"]
    with process(inner, workdir) as inner_proc:
        wait_until(path.exists, "socat UNIX-LISTEN")
        with process(outer, workdir) as outer_proc:
            wait_until(lambda: tcp_listening(port), "socat TCP-LISTEN")
            pids = {"socat tcp": outer_proc.command_pid(), "socat unix": inner_proc.command_pid()}
            yield Pair("socat", port, pids)


@contextmanager
def _socat_vsock_pair(target_port: int, workdir: Path) -> Iterator[Pair]:
    _require_guest()
    port, vsock_port = free_port(), free_port()
    listen_vsock = f"VSOCK-LISTEN:{vsock_port},fork,backlog=1024"
    inner = ["socat", listen_vsock, f"TCP:127.0.0.1:{target_port}"]
    listen = f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"
    outer = ["socat", listen, f"VSOCK-CONNECT:1:{vsock_port}"]
    with process(inner, workdir) as inner_proc:
        time.sleep(0.5)  # no file to wait for; socat listens at once
        with process(outer, workdir) as outer_proc:
            wait_until(lambda: tcp_listening(port), "socat TCP-LISTEN")
            pids = {"socat tcp": outer_proc.command_pid(), "socat vsock": inner_proc.command_pid()}
            yield Pair("socat-vsock", port, pids)


# --- memory -----------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident memory of one process, VmRSS from /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def tree_pss_kib(pid: int) -> int:
    """Proportional set size of a process and all its descendants, in KiB (for socat fork)."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            total += int(line.split()[1])
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            total += tree_pss_kib(int(child))
        except FileNotFoundError:
            pass  # exited meanwhile
    return total


# --- clients ----------------------------------------------------------------------------------


def run_client(mode: str, port: int, timeout: float, **options: object) -> dict[str, float]:
    """Run the load generator to completion and return its JSON result."""
    args = [sys.executable, "-m", "benchmarks.loadgen", mode, "--port", str(port)]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    done = subprocess.run(args, capture_output=True, timeout=timeout, check=True)
    result: dict[str, float] = json.loads(done.stdout.decode().splitlines()[-1])
    return result


def iperf3(port: int, streams: int, seconds: int) -> float:
    """Received throughput in Gbit/s of an iperf3 client run against 127.0.0.1:`port`."""
    args = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(streams)]
    done = subprocess.run([*args, "-J"], capture_output=True, timeout=seconds + 30)
    report = json.loads(done.stdout)
    if "error" in report:
        raise RuntimeError(f"iperf3: {report['error']}")
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
