"""--metrics: /metrics scraped by a real Prometheus server after known traffic, /healthz through
a drain, and a listener that misbehaving scrapers cannot take down. Emulated vsock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pf_proxy import metrics
from tests.integration.helpers import (
    EchoServer,
    Proxy,
    closed,
    exchange,
    free_port,
    run_briefly,
    running,
    socket_fds,
    wait_until,
)
from tests.integration.prometheus import prometheus
from tests.vsocks import Vsock, vsock_under_test

pytestmark = pytest.mark.timeout(300)

WAIT = 30.0


def get(port: int, path: str) -> tuple[int, bytes]:
    """(status, body) of GET http://127.0.0.1:port/path."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def emulated() -> Iterator[Vsock]:
    """Emulated vsock (what is counted does not depend on the kind of vsock or relay path)."""
    with vsock_under_test() as place:
        assert not place.real
        yield place


def header_for(address: str, port: int) -> bytes:
    """The destination header ip-to-vsock-transparent writes for an IPv4 address."""
    return b"\x04" + socket.inet_aton(address)[::-1] + port.to_bytes(2, "little")


def test_prometheus_scrapes_what_the_tcp_proxies_did(
    emulated: Vsock, echo: EchoServer, tmp_path: Path
) -> None:
    env = emulated.env
    ports = {name: free_port() for name in ("inner", "outer", "refusing", "transparent")}
    client_port, refusing_port = free_port(), free_port()
    with (
        running(
            "vsock-to-ip", "-v", "88:4000", "-i", f"127.0.0.1:{echo.port}",
            "--metrics", f"127.0.0.1:{ports['inner']}", log_dir=tmp_path, env=env,
        ),
        running(
            "ip-to-vsock", "-i", f"127.0.0.1:{client_port}", "-v", "88:4000",
            "--metrics", f"127.0.0.1:{ports['outer']}", log_dir=tmp_path, env=env,
        ) as outer,
        running(
            "ip-to-vsock", "-i", f"127.0.0.1:{refusing_port}", "-v", "88:4999",
            "--connect-timeout", "1", "--metrics", f"127.0.0.1:{ports['refusing']}",
            log_dir=tmp_path, env=env,
        ),
        running(
            "vsock-to-ip-transparent", "-v", "88:1200", "--deny", "127.0.0.0/8",
            "--metrics", f"127.0.0.1:{ports['transparent']}", log_dir=tmp_path, env=env,
        ) as transparent,
        prometheus(tmp_path, [f"127.0.0.1:{port}" for port in ports.values()]) as server,
    ):  # fmt: skip
        assert f"Metrics on: http://127.0.0.1:{ports['outer']}/metrics" in outer.stdout
        for index in range(5):
            payload = bytes([index]) * 10_000
            assert exchange(("127.0.0.1", client_port), payload) == payload
        try:
            with socket.create_connection(("127.0.0.1", refusing_port), timeout=WAIT) as refused:
                assert closed(refused)  # reset, as a TCP client is
        except ConnectionResetError:
            pass  # reset before connect() returned: closed all the same
        with socket.socket(socket.AF_UNIX) as denied:
            denied.settimeout(WAIT)
            denied.connect(emulated.path("88:1200"))
            denied.sendall(header_for("127.0.0.1", echo.port) + b"GET / HTTP/1.0\r\n\r\n")
            assert denied.recv(1) == b""
        transparent.wait_for(f"destination 127.0.0.1:{echo.port} denied by", stream="stderr")

        def at(name: str, metric: str, **labels: str) -> str:
            selector = ",".join(
                [f'instance="127.0.0.1:{ports[name]}"', *(f'{k}="{v}"' for k, v in labels.items())]
            )
            return f"{metric}{{{selector}}}"

        def ended(name: str, outcome: str) -> str:
            return at(name, "pf_proxy_tcp_connections_ended_total", outcome=outcome)

        for name in ("outer", "inner"):
            server.wait_for(at(name, "pf_proxy_tcp_connections_accepted_total"), 5)
            server.wait_for(ended(name, "completed"), 5)
            server.wait_for(at(name, "pf_proxy_tcp_connections_open"), 0)
            server.wait_for(at(name, "pf_proxy_tcp_upstream_connect_seconds_count"), 5)
            for direction in ("to_upstream", "to_client"):
                metric = at(name, "pf_proxy_tcp_relayed_bytes_total", direction=direction)
                server.wait_for(metric, 50_000)
        server.wait_for(ended("refusing", "upstream_connect_failed"), 1)
        # Refused at once, as a full backlog is: tried again within the connect timeout.
        retried = at("refusing", "pf_proxy_tcp_upstream_connect_retries_total")
        server.wait_for(f"{retried} > bool 5", 1)
        server.wait_for(at("outer", "pf_proxy_tcp_upstream_connect_retries_total"), 0)
        server.wait_for(ended("transparent", "denied"), 1)
        server.wait_for(at("outer", "pf_proxy_info", command="ip-to-vsock"), 1)
        assert (server.value(at("outer", "process_open_fds")) or 0) > 0
        assert (server.value(at("outer", "process_max_fds")) or 0) >= 1024
        assert (server.value(at("inner", "process_resident_memory_bytes")) or 0) > 1 << 20


def test_healthz_turns_503_during_the_drain(
    emulated: Vsock, echo: EchoServer, tmp_path: Path
) -> None:
    metrics_port = free_port()
    proxy = Proxy(
        ["vsock-to-ip", "-v", "88:4000", "-i", f"127.0.0.1:{echo.port}",
         "--drain-timeout", "60", "--metrics", f"127.0.0.1:{metrics_port}"],
        tmp_path,
        emulated.env,
    )  # fmt: skip
    try:
        proxy.wait_ready()
        assert get(metrics_port, "/healthz") == (200, b"serving\n")
        with emulated.client(4000) as live:
            live.sendall(b"x")
            assert live.recv(1) == b"x"
            os.kill(proxy.process.pid, signal.SIGTERM)
            proxy.wait_for("Draining 1 connections")
            assert get(metrics_port, "/healthz") == (
                503,
                b"SIGTERM or SIGINT received: draining 1 connections\n",
            )
            status, _ = get(metrics_port, "/metrics")
            assert status == 200  # still scrapeable while draining
        assert proxy.process.wait(WAIT) == 0
    finally:
        proxy.stop()


def test_a_metrics_port_in_use_is_exit_1_naming_it(emulated: Vsock) -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        result = run_briefly(
            "vsock-to-ip", "-v", "88:4000", "-i", "127.0.0.1:9", "--metrics", f"127.0.0.1:{port}",
            env=emulated.env,
        )  # fmt: skip
    assert result.returncode == 1, result
    assert (
        f"metrics listener: Failed to bind listener to 127.0.0.1:{port}: Address already in use"
        in result.stderr
    )


@contextmanager
def metered(emulated: Vsock, echo: EchoServer, tmp_path: Path) -> Iterator[tuple[Proxy, int]]:
    """vsock-to-ip (vsock 88:4000 to `echo`) with --metrics: the proxy, and its metrics port."""
    metrics_port = free_port()
    with running(
        "vsock-to-ip", "-v", "88:4000", "-i", f"127.0.0.1:{echo.port}",
        "--metrics", f"127.0.0.1:{metrics_port}", log_dir=tmp_path, env=emulated.env,
    ) as proxy:  # fmt: skip
        yield proxy, metrics_port


def test_misbehaving_scrapers_are_bounded_and_the_proxy_carries_on(
    emulated: Vsock, echo: EchoServer, tmp_path: Path
) -> None:
    with metered(emulated, echo, tmp_path) as (proxy, metrics_port):
        pid = proxy.process.pid
        baseline = socket_fds(pid)
        silent = [socket.create_connection(("127.0.0.1", metrics_port)) for _ in range(50)]
        try:
            for garbage in (b"\x16\x03\x01" + os.urandom(300) + b"\r\n\r\n", b"A" * 10_000):
                with socket.create_connection(("127.0.0.1", metrics_port), timeout=WAIT) as bad:
                    try:
                        bad.sendall(garbage)
                        bad.recv(100)
                    except ConnectionResetError:
                        pass  # closed at once: over the scrapers' limit, or oversized
            time.sleep(0.5)
            # The silent ones hold at most MAX_SCRAPERS places; the rest were closed.
            assert socket_fds(pid) <= baseline + metrics.MAX_SCRAPERS
            payload = os.urandom(100_000)
            assert exchange(emulated.path("88:4000"), payload, family=socket.AF_UNIX) == payload
        finally:
            for sock in silent:
                sock.close()
        wait_until(lambda: get(metrics_port, "/metrics")[0] == 200, "a scrape served again")
        wait_until(lambda: socket_fds(pid) == baseline, "the scrapers' sockets released")
        assert proxy.process.poll() is None


FLOOD = 1000  # connections held against the metrics port


def test_healthz_and_prometheus_are_answered_within_1_s_under_a_slowloris_flood(
    emulated: Vsock, echo: EchoServer, tmp_path: Path
) -> None:
    """1,000 connections, idle or dripping a request head a byte at a time, reopened as soon
    as the proxy closes them: a curl probe of /healthz and the real Prometheus's scrapes (1 s
    timeout) are still answered, within 1 s each; the data path carries on; the connections
    closed unanswered are logged (at a limited rate); the descriptors come back."""
    with metered(emulated, echo, tmp_path) as (proxy, metrics_port):
        pid = proxy.process.pid
        baseline = socket_fds(pid)
        flood = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.flood", "127.0.0.1", str(metrics_port),
             str(FLOOD), "40"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert flood.stdout is not None
            assert flood.stdout.readline() == f"holding {FLOOD}\n"
            time.sleep(2)  # the flood in full swing: every slot held, more waiting
            assert flood.poll() is None
            with prometheus(tmp_path, [f"127.0.0.1:{metrics_port}"]) as server:
                for _ in range(10):
                    probe = run_briefly(
                        "curl", "--silent", "--show-error", "--max-time", "1",
                        "--write-out", "%{http_code}", "--output", "/dev/null",
                        f"http://127.0.0.1:{metrics_port}/healthz",
                    )  # fmt: skip
                    assert (probe.returncode, probe.stdout) == (0, "200"), probe
                    time.sleep(0.5)
                payload = os.urandom(100_000)
                assert exchange(emulated.path("88:4000"), payload, family=socket.AF_UNIX) == payload
                # Every scrape of the last 5 s answered within its 1 s timeout (up 0 otherwise).
                server.wait_for("count_over_time(up[5s])", 5)
                assert server.value("min_over_time(up[5s])") == 1
                assert server.value("max_over_time(scrape_duration_seconds[5s])") < 1
        finally:
            flood.terminate()
            flood.wait(WAIT)
        assert "metrics listener: closed" in proxy.stderr
        assert "pushed out by newer ones" in proxy.stderr
        wait_until(lambda: socket_fds(pid) == baseline, "the flood's sockets released")
        assert proxy.process.poll() is None
