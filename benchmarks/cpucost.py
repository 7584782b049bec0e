"""CPU time per connection and per request of one proxy hop, against socat and nginx.

    python -m benchmarks.cpucost [--quick] [--runs N]

One hop, as the enclave's parent runs it: client -> proxy (TCP listener on 127.0.0.1) -> a Unix
socket (emulated vsock) -> an echo server on that socket.

    pf-proxy splice / copy   ip-to-vsock -i 127.0.0.1:P -v 88:Q, PF_PROXY_VSOCK_DIR set (copy:
                             PF_PROXY_NO_SPLICE=1)
    pf-proxy 2 workers       the same with --workers 2 (when the command has it)
    pf-proxy run             the same proxy in a `pf-proxy run` file, beside two idle ones
    pf-proxy asyncio loop    ip-to-vsock with PF_PROXY_LOOP=asyncio: the standard library's
                             loop instead of uvloop (the memory-lean choice)
    least Python relay       benchmarks/leastrelay.py: pf-proxy's relay design with nothing
                             else (no logging, limits or failure handling); the floor for
                             any relay in Python here
    socat                    socat TCP-LISTEN:P,fork,reuseaddr,backlog=1024 UNIX-CONNECT:S
    nginx                    nginx's stream module, one process (master_process off):
                             listen 127.0.0.1:P backlog=1024; proxy_pass unix:S; an event-driven
                             relay in C, the native reference

Loads (benchmarks/loadgen.py): short connections (connect, 64-byte request, 64-byte echo,
close; 32 clients at once) and 1-byte ping-pong over 16 connections, 3 s each, no warm-up so
every operation is counted. The figure is the proxy's CPU time (user + system from
/proc/PID/stat; socat's forked children included, nginx's one process, every worker of ours)
divided by the operations served: steadier than a rate on a shared 2-core machine, where the
load generator and the proxy compete for the same cores. Medians of 3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from benchmarks.processes import free_port, process, run_client, tcp_listening, wait_until

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
RATE_CLIENTS = 32
PINGPONG_CONNECTIONS = 16


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time of a process (with `children`: of its reaped children too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        found += [int(child), *_descendants(int(child))]
    return found


@dataclass
class Hop:
    """A running proxy in front of the echo socket: where clients connect, and how to read
    its CPU time."""

    port: int
    pids: list[int]
    children: bool = False  # socat: count reaped children

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            total += cpu_seconds(pid, self.children)
            if self.children:  # socat's live children, not yet reaped
                total += sum(cpu_seconds(child) for child in _descendants(pid))
        return total


@contextmanager
def echo_on(path: Path, workdir: Path) -> Iterator[None]:
    args = [sys.executable, "-m", "benchmarks.loadgen", "echo", "--port", "0", "--unix", str(path)]
    with process(args, workdir):
        wait_until(path.exists, "the Unix echo server")
        yield


@contextmanager
def hop(kind: str, socket_path: Path, workdir: Path) -> Iterator[Hop]:
    port = free_port()
    if kind.startswith("pf-proxy"):
        env = {"PF_PROXY_VSOCK_DIR": str(socket_path.parent)}
        if kind == "pf-proxy copy":
            env["PF_PROXY_NO_SPLICE"] = "1"
        if kind == "pf-proxy asyncio loop":
            env["PF_PROXY_LOOP"] = "asyncio"
        cid, vsock_port = socket_path.stem.split("_")
        args = ["ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", f"{cid}:{vsock_port}"]
        if kind == "pf-proxy 2 workers":
            args += ["--workers", "2"]
        if kind == "pf-proxy run":
            args = ["pf-proxy", "run", str(_run_file(workdir, port, f"{cid}:{vsock_port}"))]
        with process(args, workdir, env) as started:
            wait_until(lambda: started.said("Listening on:"), kind)
            top = started.command_pid()
            time.sleep(0.3)  # workers, if any, are up
            yield Hop(port, [top, *_descendants(top)])
    elif kind == "least Python relay":
        args = [sys.executable, "-m", "benchmarks.leastrelay", "--port", str(port)]
        with process([*args, "--unix", str(socket_path)], workdir) as started:
            wait_until(lambda: started.said("Listening on:"), kind)
            yield Hop(port, [started.command_pid()])
    elif kind == "socat":
        listen = f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"
        with process(["socat", listen, f"UNIX-CONNECT:{socket_path}"], workdir) as started:
            wait_until(lambda: tcp_listening(port), "socat")
            yield Hop(port, [started.command_pid()], children=True)
    elif kind == "nginx":
        config = workdir / f"nginx-{port}.conf"
        config.write_text(
            f"load_module {NGINX_STREAM_MODULE};\n"
            "daemon off;\nmaster_process off;\nworker_processes 1;\n"
            f"pid {workdir}/nginx-{port}.pid;\nerror_log {workdir}/nginx-{port}.log warn;\n"
            "events { worker_connections 8192; }\n"
            f"stream {{ server {{ listen 127.0.0.1:{port} backlog=1024; "
            f"proxy_pass unix:{socket_path}; }} }}\n"
        )
        with process(["nginx", "-p", str(workdir), "-c", str(config)], workdir) as started:
            wait_until(lambda: tcp_listening(port), "nginx")
            yield Hop(port, [started.command_pid()])
    else:
        raise ValueError(kind)


def _run_file(workdir: Path, port: int, vsock: str) -> Path:
    """The same ip-to-vsock as a proxy of a file, beside two more that stay idle (a UDP one
    and a TCP one): what the file's process adds per operation, if anything."""
    file = workdir / f"run-{port}.toml"
    file.write_text(
        f'[proxy.hop]\nkind = "ip-to-vsock"\nip-addr = "127.0.0.1:{port}"\nvsock-addr = "{vsock}"\n'
        f'[proxy.dns]\nkind = "udp-to-vsock"\nip-addr = "127.0.0.1:{free_port()}"\n'
        'vsock-addr = "3:53"\n'
        f'[proxy.idle]\nkind = "vsock-to-ip"\nvsock-addr = "88:{free_port()}"\n'
        'ip-addr = "127.0.0.1:9"\n'
    )
    return file


def available(kinds: list[str]) -> list[str]:
    """The references this machine has (nginx needs the stream module); ours always."""
    keep = []
    for kind in kinds:
        if kind == "nginx" and not (shutil.which("nginx") and Path(NGINX_STREAM_MODULE).exists()):
            _progress("nginx: skipped (apt-get install nginx-light libnginx-mod-stream)")
            continue
        if kind == "pf-proxy 2 workers":
            helptext = subprocess.run(["ip-to-vsock", "--help"], capture_output=True, text=True)
            if "--workers" not in helptext.stdout:
                continue
        keep.append(kind)
    return keep


def measure(kind: str, mode: str, seconds: float, workdir: Path) -> tuple[float, float]:
    """(CPU microseconds per operation, operations per second) of one run."""
    socket_path = workdir / f"88_{free_port()}.sock"
    options: dict[str, object] = {"warmup": 0}
    if mode == "rate":
        options["concurrency"] = RATE_CLIENTS
    else:
        options["connections"] = PINGPONG_CONNECTIONS
    with echo_on(socket_path, workdir), hop(kind, socket_path, workdir) as running:
        before = running.cpu()
        result = run_client(mode, running.port, timeout=seconds + 60, duration=seconds, **options)
        time.sleep(0.2)  # the last connections' cleanup is the proxy's work too
        spent = running.cpu() - before
    ops = result["completed"] if mode == "rate" else result["samples"]
    return spent / max(ops, 1) * 1e6, ops / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short run of each")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    runs, seconds = (1, 2.0) if args.quick else (args.runs, 3.0)
    kinds = available(
        [
            "pf-proxy splice",
            "pf-proxy copy",
            "pf-proxy 2 workers",
            "pf-proxy run",
            "pf-proxy asyncio loop",
            "least Python relay",
            "socat",
            "nginx",
        ]
    )
    cost: dict[tuple[str, str], list[float]] = defaultdict(list)
    rate: dict[tuple[str, str], list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="pfp-cpu-") as name:
        for run in range(runs):
            for mode in ("rate", "pingpong"):
                for kind in kinds:
                    us, per_s = measure(kind, mode, seconds, Path(name))
                    cost[kind, mode].append(us)
                    rate[kind, mode].append(per_s)
                    _progress(f"run {run + 1} {mode} {kind}: {us:.1f} us CPU/op, {per_s:.0f}/s")
    native = "nginx" if "nginx" in kinds else "socat"
    lines = [
        f"CPU per operation, one hop (medians of {runs}); ratio to {native}",
        "",
        "| proxy | us CPU per short connection | x | connections/s "
        "| us CPU per ping-pong request | x | requests/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in kinds:
        cells = []
        for mode in ("rate", "pingpong"):
            us, ref = median(cost[kind, mode]), median(cost[native, mode])
            cells += [f"{us:.1f}", f"{us / ref:.2f}x", f"{median(rate[kind, mode]):,.0f}"]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
