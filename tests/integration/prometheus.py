"""A real Prometheus server for tests: Debian's `prometheus`, scraping the proxies under test.

    with prometheus(tmp_path, ["127.0.0.1:9101", "127.0.0.1:9102"]) as server:
        ...traffic...
        server.wait_for('pf_proxy_tcp_connections_ended_total{outcome="completed"}', 5)

It scrapes every target each second (scrape timeout 1 s) and keeps its data in the test's
directory; queries go to its HTTP API (`/api/v1/query`). With `ns`, it runs in that network
namespace (to reach proxies listening on that namespace's loopback) and is queried with curl
from inside it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.integration.helpers import free_port
from tests.netns import Netns
from tests.vsocks import SLOWDOWN

WAIT = 30.0 * SLOWDOWN


@dataclass
class Prometheus:
    address: str
    process: subprocess.Popen[bytes]
    ns: Netns | None
    log_path: Path

    def _get(self, path: str) -> bytes:
        url = f"http://{self.address}{path}"
        if self.ns is None:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: bytes = response.read()
                return body
        return self.ns.run("curl", "--silent", "--fail", "--max-time", "10", url).stdout.encode()

    def query(self, expression: str) -> list[tuple[dict[str, str], float]]:
        """The instant vector `expression` evaluates to now: (labels, value) per series."""
        path = "/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        answer = json.loads(self._get(path))
        assert answer["status"] == "success", answer
        return [
            (series["metric"], float(series["value"][1])) for series in answer["data"]["result"]
        ]

    def value(self, expression: str) -> float | None:
        """The value of a single-series `expression`, None while it has no series."""
        result = self.query(expression)
        assert len(result) <= 1, result
        return result[0][1] if result else None

    def wait_for(self, expression: str, expected: float, timeout: float = WAIT) -> None:
        """Wait until `expression` (one series) has the value `expected`; fail saying what it
        had otherwise."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = self.value(expression)
            if seen == expected:
                return
            time.sleep(0.25)
        raise AssertionError(f"{expression} = {seen}, expected {expected}; log: {self.log_path}")


@contextmanager
def prometheus(
    workdir: Path, targets: list[str], ns: Netns | None = None
) -> Iterator[Prometheus]:
    """Prometheus scraping `targets` (host:port of --metrics listeners) every second."""
    port = free_port()
    config = workdir / f"prometheus-{port}.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: pf-proxy\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n"
    )
    log_path = workdir / f"prometheus-{port}.log"
    args = [
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / f'prometheus-{port}-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with open(log_path, "wb") as log:
        if ns is None:
            process = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        else:
            process = ns.popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    server = Prometheus(f"127.0.0.1:{port}", process, ns, log_path)
    try:
        _wait_until_ready(server)
        yield server
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(WAIT)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(WAIT)


def _wait_until_ready(server: Prometheus) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"prometheus exited {server.process.returncode}: {server.log_path}")
        try:
            server._get("/-/ready")
            return
        except (OSError, RuntimeError):
            time.sleep(0.2)
    raise RuntimeError(f"prometheus not ready after {WAIT} s: {server.log_path}")
