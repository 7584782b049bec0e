"""--workers N: the TCP commands served by N processes, as users start them.

The pair ip-to-vsock -> vsock -> vsock-to-ip, each with 2 workers, carries many connections
byte-exact with both workers of each proxy serving (SO_REUSEPORT on the TCP side, one shared
socket on the vsock side: over real vsock in the guest stage). SIGTERM drains every worker;
READY=1 comes once, when all listen; a port in use is exit 1 before any worker starts; a
worker that dies is restarted; workers die with a killed parent; /metrics is on port + K - 1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.helpers import (
    EchoServer,
    Proxy,
    exchange,
    free_port,
    recv_exactly,
    running,
    two_free_ports,
    wait_until,
)
from tests.vsocks import SLOWDOWN, Vsock

pytestmark = pytest.mark.timeout(300)

WAIT = 30.0 * SLOWDOWN
VSOCK_PORT = 5300
READY_LINE = "All 2 workers ready"


def worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    return status != "Z"


def served_by(proxy: Proxy) -> set[str]:
    """The workers that logged a relayed connection."""
    return set(re.findall(r"\[worker (\d+)\] \S+ to \S+ IO copy done", proxy.stdout))


@contextmanager
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


@contextmanager
def worker_pair(vsock: Vsock, echo_port: int, tmp_path: Path, *extra: str) -> Iterator[
    tuple[int, Proxy, Proxy]
]:  # fmt: skip
    """ip-to-vsock and vsock-to-ip with --workers 2 each, in front of an echo server."""
    port = free_port()
    with (
        running(
            "vsock-to-ip", "-v", vsock.listen_address(VSOCK_PORT), "-i", f"127.0.0.1:{echo_port}",
            "--workers", "2", *extra, log_dir=tmp_path, env=vsock.env, ready=False,
        ) as inner,
        running(
            "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", vsock.address(VSOCK_PORT),
            "--workers", "2", log_dir=tmp_path, env=vsock.env, ready=False,
        ) as outer,
    ):  # fmt: skip
        for proxy in (inner, outer):
            proxy.wait_for(READY_LINE)
        yield port, inner, outer


@pytest.mark.vsock
def test_two_workers_each_side_carry_every_connection_byte_exact(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    with (
        echo_server() as echo,
        worker_pair(vsock_link, echo.port, tmp_path) as (port, inner, outer),
    ):
        results: dict[int, bytes] = {}

        def client(number: int) -> None:
            payload = os.urandom(4096) + b"%d" % number
            echoed = exchange(("127.0.0.1", port), payload)
            results[number] = payload if echoed == payload else b""

        threads = [threading.Thread(target=client, args=(n,)) for n in range(200)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert sorted(results) == list(range(200))
        assert all(results.values()), "a connection's bytes came back changed"
        wait_until(lambda: len(re.findall("IO copy done", inner.stdout)) >= 400, "inner logs")
        wait_until(lambda: len(re.findall("IO copy done", outer.stdout)) >= 400, "outer logs")
        assert served_by(outer) == {"1", "2"}, outer.stdout[-2000:]  # SO_REUSEPORT spreads
        assert served_by(inner) == {"1", "2"}, inner.stdout[-2000:]  # the shared vsock socket
        for proxy in (inner, outer):
            assert proxy.stop() == 0
            assert "All 2 workers exited (exit codes [0, 0])" in proxy.stdout
            assert proxy.stderr == ""


def test_sigterm_drains_every_worker_and_refuses_new_connections(tmp_path: Path) -> None:
    vsock_dir = tmp_path / "vsock"
    vsock_dir.mkdir()
    env = {"PF_PROXY_VSOCK_DIR": str(vsock_dir)}
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as upstream,
        running(
            "ip-to-vsock", "-i", f"127.0.0.1:{(port := free_port())}", "-v", "88:5000",
            "--workers", "2", "--drain-timeout", "20", log_dir=tmp_path, env=env, ready=False,
        ) as proxy,
    ):  # fmt: skip
        upstream.bind(str(vsock_dir / "88_5000.sock"))
        upstream.listen(16)
        upstream.settimeout(WAIT)
        proxy.wait_for(READY_LINE)
        clients, accepted = [], []
        for _ in range(8):  # enough that both workers hold one (checked below)
            client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            client.sendall(b"before")
            conn, _ = upstream.accept()
            assert recv_exactly(conn, 6) == b"before"
            clients.append(client)
            accepted.append(conn)
        wait_until(lambda: proxy.stdout.count("Proxying to: vsock 88:5000") == 8, "8 routed")
        assert set(re.findall(r"\[worker (\d)\] Proxying", proxy.stdout)) == {"1", "2"}
        proxy.process.send_signal(signal.SIGTERM)
        wait_until(lambda: proxy.stdout.count("Shutting down: no longer accepting") == 2, "drain")
        with pytest.raises(ConnectionRefusedError):  # the listeners are closed, all of them
            socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
        for client, conn in zip(clients, accepted, strict=True):  # live ones carry on
            client.sendall(b"during")
            assert recv_exactly(conn, 6) == b"during"
            conn.sendall(b"reply")
            assert recv_exactly(client, 5) == b"reply"
            client.close()
            conn.close()
        assert proxy.process.wait(WAIT) == 0
    assert "All 2 workers exited (exit codes [0, 0])" in proxy.stdout
    assert "Closed" not in proxy.stderr  # none was cut at the drain


def test_ready_once_when_all_workers_listen_and_stopping_from_the_parent(
    tmp_path: Path,
) -> None:
    vsock_dir = tmp_path / "vsock"
    vsock_dir.mkdir()
    with echo_server() as echo, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(WAIT)
        proxy = Proxy(
            ["vsock-to-ip", "-v", "88:4000", "-i", f"127.0.0.1:{echo.port}", "--workers", "3"],
            tmp_path,
            {"PF_PROXY_VSOCK_DIR": str(vsock_dir), "NOTIFY_SOCKET": str(tmp_path / "notify.sock")},
        )
        try:
            assert notify.recv(4096) == b"READY=1"
            # ready means all three listen (their lines may still be on the way: 50 ms)
            wait_until(lambda: proxy.stdout.count("Listening on: vsock 88:4000") == 3, "lines")
            for _ in range(20):  # every worker accepts on the one socket: all are served
                path = str(vsock_dir / "88_4000.sock")
                assert exchange(path, b"ready?", family=socket.AF_UNIX) == b"ready?"
            proxy.process.send_signal(signal.SIGTERM)
            assert notify.recv(4096) == b"STOPPING=1"
            assert proxy.process.wait(WAIT) == 0
            notify.settimeout(0.5)
            with pytest.raises(TimeoutError):  # once each, from the parent only
                notify.recv(4096)
        finally:
            proxy.stop()


@pytest.mark.parametrize("holder", ["one process", "another --workers"])
def test_a_port_in_use_is_exit_1_before_any_worker_starts(holder: str, tmp_path: Path) -> None:
    env = {"PF_PROXY_VSOCK_DIR": str(tmp_path)}
    port = free_port()
    args = ["ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", "88:5000"]
    first_args = args if holder == "one process" else [*args, "--workers", "2"]
    with running(*first_args, log_dir=tmp_path, env=env, ready=False) as first:
        first.wait_for("Listening on:")
        second = Proxy([*args, "--workers", "2"], tmp_path, env)
        assert second.process.wait(WAIT) == 1
        assert f"Failed to bind listener to 127.0.0.1:{port}: Address already in use" in (
            second.stderr
        )
        assert "Worker" not in second.stdout
    metrics_port = two_free_ports()
    with socket.socket() as taken:  # worker 2's /metrics port
        taken.bind(("127.0.0.1", metrics_port + 1))
        taken.listen()
        third = Proxy(
            [*args, "--workers", "2", "--metrics", f"127.0.0.1:{metrics_port}"], tmp_path, env
        )
        assert third.process.wait(WAIT) == 1
        assert f"metrics listener: Failed to bind listener to 127.0.0.1:{metrics_port + 1}" in (
            third.stderr
        )


def test_a_worker_that_dies_is_restarted_and_the_other_keeps_its_connections(
    tmp_path: Path,
) -> None:
    env = {"PF_PROXY_VSOCK_DIR": str(tmp_path)}
    with (
        echo_server() as echo,
        running(
            "vsock-to-ip", "-v", "88:4000", "-i", f"127.0.0.1:{echo.port}", "--workers", "2",
            log_dir=tmp_path, env=env, ready=False,
        ) as proxy,
    ):  # fmt: skip
        proxy.wait_for(READY_LINE)
        path = str(tmp_path / "88_4000.sock")
        held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.settimeout(WAIT)
        held.connect(path)
        held.sendall(b"x")
        assert recv_exactly(held, 1) == b"x"
        wait_until(lambda: "Proxying to:" in proxy.stdout, "the held connection routed")
        holder = re.findall(r"\[worker (\d)\] Proxying", proxy.stdout)[0]
        pids = worker_pids(proxy.process.pid)
        victim = pids[1 - (int(holder) - 1)]  # the worker not holding the connection
        os.kill(victim, signal.SIGKILL)
        proxy.wait_for("exited while serving (exit code 137); restarting it", stream="stderr")
        wait_until(lambda: len(worker_pids(proxy.process.pid)) == 2, "a new worker")
        assert victim not in worker_pids(proxy.process.pid)
        held.sendall(b"y")  # the other worker's connection is untouched
        assert recv_exactly(held, 1) == b"y"
        held.close()
        for _ in range(10):
            assert exchange(path, b"after", family=socket.AF_UNIX) == b"after"
        assert proxy.stop() == 0


def test_workers_die_with_a_killed_parent_and_free_the_port(tmp_path: Path) -> None:
    env = {"PF_PROXY_VSOCK_DIR": str(tmp_path)}
    port = free_port()
    proxy = Proxy(
        ["ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", "88:5000", "--workers", "2"], tmp_path, env
    )
    try:
        proxy.wait_for(READY_LINE)
        pids = worker_pids(proxy.process.pid)
        assert len(pids) == 2
        proxy.process.kill()
        proxy.process.wait(WAIT)
        wait_until(lambda: not any(alive(pid) for pid in pids), "the workers to exit")
        with socket.socket() as probe:  # nothing holds the port any more
            probe.bind(("127.0.0.1", port))
    finally:
        proxy.stop()


def test_each_worker_serves_metrics_on_its_own_port(tmp_path: Path) -> None:
    env = {"PF_PROXY_VSOCK_DIR": str(tmp_path)}
    metrics_port = two_free_ports()
    with (
        echo_server() as echo,
        running(
            "vsock-to-ip", "-v", "88:4000", "-i", f"127.0.0.1:{echo.port}", "--workers", "2",
            "--metrics", f"127.0.0.1:{metrics_port}", log_dir=tmp_path, env=env, ready=False,
        ) as proxy,
    ):  # fmt: skip
        proxy.wait_for(READY_LINE)
        for _ in range(30):
            assert exchange(str(tmp_path / "88_4000.sock"), b"m", family=socket.AF_UNIX) == b"m"
        time.sleep(0.2)
        accepted = []
        for port in (metrics_port, metrics_port + 1):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as got:
                text = got.read().decode()
            found = re.search(r"^pf_proxy_tcp_connections_accepted_total (\S+)$", text, re.M)
            assert found, text
            accepted.append(float(found.group(1)))
        assert sum(accepted) == 30
        assert proxy.stop() == 0
