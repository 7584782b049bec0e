"""A short live demonstration of pf-proxy with emulated vsock (run by `make demo`).

    client --TCP--> ip-to-vsock --"vsock 88:5000"--> vsock-to-ip --TCP--> HTTP server

The "vsock" hop is a Unix socket in a temporary directory (PF_PROXY_VSOCK_DIR), exactly as
users developing enclave software without AF_VSOCK would run it. Everything started here is
stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PAGE = "<h1>Hello from behind ip-to-vsock and vsock-to-ip</h1>\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def wait_for_log_line(
    name: str, process: subprocess.Popen[bytes], log: Path, text: str, timeout: float = 10
) -> None:
    """Wait until a proxy logs `text` (e.g. "Listening on:"); fail if it exits first."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} did not log {text!r} within {timeout} s")
        time.sleep(0.05)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="pf-proxy-demo-"))
    (work / "vsock").mkdir()
    (work / "site").mkdir()
    (work / "site" / "index.html").write_text(PAGE)
    env = {**os.environ, "PF_PROXY_VSOCK_DIR": str(work / "vsock")}
    http_port, proxy_port = free_port(), free_port()

    commands = {
        "http-server": [
            sys.executable,
            "-m",
            "http.server",
            str(http_port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(work / "site"),
        ],
        "vsock-to-ip": ["vsock-to-ip", "-v", "88:5000", "-i", f"127.0.0.1:{http_port}"],
        "ip-to-vsock": ["ip-to-vsock", "-i", f"127.0.0.1:{proxy_port}", "-v", "88:5000"],
    }
    processes: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: work / f"{name}.log" for name in commands}
    try:
        for name, command in commands.items():
            print(f"$ {' '.join(command)}")
            with open(logs[name], "wb") as log:
                processes[name] = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        wait_for_port(http_port)
        # Not a probe connection through the proxies: it would show up in their logs.
        for name in ("vsock-to-ip", "ip-to-vsock"):
            wait_for_log_line(name, processes[name], logs[name], "Listening on:")

        url = f"http://127.0.0.1:{proxy_port}/"
        print(f"\n$ fetch {url}")
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
        print(f"HTTP {response.status}: {body.strip()}")
        ok = body == PAGE
    finally:
        for process in reversed(list(processes.values())):
            process.terminate()  # SIGTERM, and a no-op for one that already exited
            process.wait(10)
    for name in ("ip-to-vsock", "vsock-to-ip"):
        print(f"\n--- {name} log (exit {processes[name].returncode}) ---")
        print(logs[name].read_text().rstrip())
    shutil.rmtree(work)
    print("\ndemo", "passed: the page came through both proxies" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
