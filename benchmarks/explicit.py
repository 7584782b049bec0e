"""The explicit proxy's cost: CPU per connection and connection rate through vsock-to-ip-proxy,
against the transparent path and against tinyproxy, in the same run.

The namespaces of benchmarks/egress.py (needs root, iproute2, iptables, dnsmasq; tinyproxy
for its setup): the enclave runs the load generator, the host the echo server at SERVER:PORT
and dnsmasq answering NAME -> SERVER; emulated vsock between them. Each connection: connect,
send a 64-byte request, have it echoed, close (benchmarks/loadgen.py rate, 64 at once), by
name in all three setups:

    explicit     enclave: ip-to-vsock 127.0.0.1:3128 -> 88:3128; host: vsock-to-ip-proxy
                 --allow-host NAME:PORT. Each connection sends CONNECT NAME:PORT first and
                 waits for 200.
    transparent  enclave: REDIRECT -> ip-to-vsock-transparent -> 88:1200; host:
                 vsock-to-ip-transparent --allow-host NAME. The request is an HTTP head whose
                 Host is NAME (the name the policy checks).
    tinyproxy    enclave: ip-to-vsock 127.0.0.1:3128 -> 88:3129; host: vsock-to-ip 88:3129 ->
                 tinyproxy on 127.0.0.1:8888 (ConnectPort PORT, no logging). CONNECT as for
                 explicit. tinyproxy resolves NAME with getaddrinfo for every connection (no
                 cache); vsock-to-ip in front of it is the hop it needs to be reached over vsock.

The figures, medians over the runs (setups alternate run by run, to share the machine's
moods): connections per second end to end, and the CPU time (user + system, /proc) per
connection of the host's proxy: vsock-to-ip-proxy, vsock-to-ip-transparent, tinyproxy (all
its threads); for tinyproxy also with its vsock-to-ip hop added, the like-for-like figure.
Numbers, never pass/fail: `--seconds 1 --runs 1` is a smoke run.

    python -m benchmarks.explicit [--seconds S] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from statistics import median

from benchmarks.cpucost import cpu_seconds
from benchmarks.egress import CONCURRENCY, NAME, PORT, SERVER, namespaces
from tests.integration.namespaced import proxy
from tests.netns import Netns

SETUPS = ("explicit", "transparent", "tinyproxy")
TINYPROXY_PORT = 8888
TINYPROXY_CONF = f"""\
User nobody
Group nogroup
Port {TINYPROXY_PORT}
Listen 127.0.0.1
Timeout 60
MaxClients 1024
Allow 127.0.0.1
ConnectPort {PORT}
LogLevel Critical
DisableViaHeader Yes
"""


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextmanager
def _tinyproxy(host: Netns, workdir: Path) -> Iterator[int]:
    """tinyproxy in the foreground in `host`; its pid."""
    conf = workdir / "tinyproxy.conf"
    conf.write_text(TINYPROXY_CONF)
    with open(workdir / "tinyproxy.err", "wb") as output:
        started = host.popen(
            ["tinyproxy", "-d", "-c", str(conf)], stdout=output, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 15
    while f"127.0.0.1:{TINYPROXY_PORT} " not in host.run("ss", "-Hltn").stdout:
        if started.poll() is not None or time.monotonic() > deadline:
            errors = (workdir / "tinyproxy.err").read_text()
            raise RuntimeError(f"tinyproxy did not start: {errors}")
        time.sleep(0.05)
    try:
        yield started.pid
    finally:
        started.terminate()
        started.wait(10)


@contextmanager
def _setup(
    name: str, enclave: Netns, host: Netns, workdir: Path, env: dict[str, str]
) -> Iterator[tuple[list[str], dict[str, int]]]:
    """Start one setup; yield the load generator's target arguments and the pids to time
    (label -> pid)."""
    with ExitStack() as stack:
        if name == "explicit":
            inner = stack.enter_context(proxy(
                host, "vsock-to-ip-proxy", "-v", "88:3128", "--allow-host", f"{NAME}:{PORT}",
                log_dir=workdir, env=env,
            ))  # fmt: skip
            stack.enter_context(proxy(
                enclave, "ip-to-vsock", "-i", "127.0.0.1:3128", "-v", "88:3128",
                log_dir=workdir, env=env,
            ))  # fmt: skip
            yield (
                ["--address", "127.0.0.1", "--port", "3128", "--connect-to", f"{NAME}:{PORT}"],
                {"vsock-to-ip-proxy": inner.process.pid},
            )
        elif name == "transparent":
            inner = stack.enter_context(proxy(
                host, "vsock-to-ip-transparent", "-v", "88:1200", "--allow-host", NAME,
                log_dir=workdir, env=env,
            ))  # fmt: skip
            stack.enter_context(proxy(
                enclave, "ip-to-vsock-transparent", "-i", "127.0.0.1:1200", "-v", "88:1200",
                log_dir=workdir, env=env,
            ))  # fmt: skip
            head = workdir / "head.req"
            head.write_bytes(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
            yield (
                ["--address", SERVER, "--port", str(PORT), "--request-file", str(head)],
                {"vsock-to-ip-transparent": inner.process.pid},
            )
        else:
            tiny = stack.enter_context(_tinyproxy(host, workdir))
            hop = stack.enter_context(proxy(
                host, "vsock-to-ip", "-v", "88:3129", "-i", f"127.0.0.1:{TINYPROXY_PORT}",
                log_dir=workdir, env=env,
            ))  # fmt: skip
            stack.enter_context(proxy(
                enclave, "ip-to-vsock", "-i", "127.0.0.1:3128", "-v", "88:3129",
                log_dir=workdir, env=env,
            ))  # fmt: skip
            yield (
                ["--address", "127.0.0.1", "--port", "3128", "--connect-to", f"{NAME}:{PORT}"],
                {"tinyproxy": tiny, "vsock-to-ip": hop.process.pid},
            )


def _rate(enclave: Netns, target: list[str], seconds: float) -> dict[str, float]:
    args = [sys.executable, "-m", "benchmarks.loadgen", "rate", *target]
    args += ["--concurrency", str(CONCURRENCY), "--duration", f"{seconds:g}", "--warmup", "0"]
    done = subprocess.run(
        enclave.command(args), capture_output=True, text=True, timeout=seconds + 90, check=True
    )
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def measure(seconds: float, runs: int) -> dict[str, dict[str, list[float]]]:
    """setup -> figure -> one value per run."""
    figures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with tempfile.TemporaryDirectory(prefix="pfp-bench-explicit-") as tmp:
        workdir = Path(tmp)
        vsock_dir = workdir / "vsock"
        vsock_dir.mkdir()
        env = {"PF_PROXY_VSOCK_DIR": str(vsock_dir)}
        setups = [s for s in SETUPS if s != "tinyproxy" or shutil.which("tinyproxy")]
        if len(setups) < len(SETUPS):
            _progress("tinyproxy is not installed: its setup is left out")
        with namespaces(workdir) as (enclave, host):
            for run in range(runs):
                for setup in setups:
                    with _setup(setup, enclave, host, workdir, env) as (target, pids):
                        before = {label: cpu_seconds(pid) for label, pid in pids.items()}
                        result = _rate(enclave, target, seconds)
                        spent = {
                            label: cpu_seconds(pid) - before[label] for label, pid in pids.items()
                        }
                    served = max(result["completed"], 1)
                    figures[setup]["connections_per_s"].append(result["connections_per_s"])
                    figures[setup]["failed"].append(result["failed"])
                    for label, cpu in spent.items():
                        figures[setup][f"{label} CPU us/connection"].append(1e6 * cpu / served)
                    if len(spent) > 1:
                        total = 1e6 * sum(spent.values()) / served
                        figures[setup]["host side CPU us/connection"].append(total)
                    _progress(
                        f"explicit run {run + 1} {setup}: {result['connections_per_s']:.0f}/s, "
                        f"{result['failed']:.0f} failed, CPU "
                        + ", ".join(f"{k} {1e6 * v / served:.0f} us" for k, v in spent.items())
                    )
                time.sleep(0.5)
    return figures


def table(figures: dict[str, dict[str, list[float]]]) -> str:
    rows = ["| setup | figure | median | runs |", "|---|---|---|---|"]
    for setup, by_figure in figures.items():
        for figure, values in by_figure.items():
            shown = " ".join(f"{v:,.0f}" for v in values)
            rows.append(f"| {setup} | {figure} | {median(values):,.0f} | {shown} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.explicit", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    figures = measure(args.seconds, args.runs)
    print(table(figures))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
