"""PF_PROXY_LOOP: uvloop (the default) or the standard library's asyncio loop; neither loads
the ssl module until something uses it (4.4 MiB, see docs/operations/memory.md).

The whole enclave network of `test_run_file` (every kind, real traffic, a reload under load)
runs on both loops there; here, the pair as two commands on each loop, and a loop name the
proxies do not know.
"""

from __future__ import annotations

import os
import signal
from contextlib import ExitStack
from pathlib import Path
from urllib.request import urlopen

import pytest

from tests.integration.helpers import (
    BOTH_LOOPS,
    EchoServer,
    exchange,
    free_port,
    run_briefly,
    running,
    served_on,
)
from tests.vsocks import vsock_under_test


def _has_ssl_loaded(pid: int) -> bool:
    """Whether the process has OpenSSL's libssl or Python's _ssl module mapped."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libssl" in maps or "_ssl." in maps


def _has_uvloop_loaded(pid: int) -> bool:
    return "/uvloop/loop." in Path(f"/proc/{pid}/maps").read_text()


@BOTH_LOOPS
def test_either_loop_carries_the_pair_and_leaves_ssl_unloaded(
    tmp_path: Path, loop: dict[str, str]
) -> None:
    payload = os.urandom(4 << 20)
    port, metrics = free_port(), free_port()
    with vsock_under_test() as vsock, ExitStack() as stack:
        echo = EchoServer()
        stack.callback(echo.close)
        env = {**vsock.env, **loop}
        with (
            running("vsock-to-ip", "-v", "88:6100", "-i", f"127.0.0.1:{echo.port}",
                    log_dir=tmp_path, env=env) as back,
            running("ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", "88:6100",
                    "--metrics", f"127.0.0.1:{metrics}", log_dir=tmp_path, env=env) as front,
        ):  # fmt: skip
            for proxy in (back, front):
                assert served_on(loop, proxy.stdout)
                assert _has_uvloop_loaded(proxy.process.pid) == (not loop), proxy.args[0]
                assert not _has_ssl_loaded(proxy.process.pid), proxy.args[0]
            # a whole stream each way, half-close included (the echo answers the client's EOF)
            assert exchange(("127.0.0.1", port), payload) == payload
            front.wait_for("ip to vsock IO copy done")
            # /metrics still works: prometheus_client brings ssl along when first scraped
            with urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
                text = response.read().decode()
            assert 'pf_proxy_tcp_connections_ended_total{outcome="completed"} 1.0' in text
            assert _has_ssl_loaded(front.process.pid)
            for proxy in (front, back):
                assert proxy.stop(signal.SIGTERM) == 0, proxy.stderr
                assert proxy.stderr == "", proxy.stderr


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one process", "workers"])
def test_a_loop_it_does_not_know_is_exit_2_naming_the_variable(workers: list[str]) -> None:
    """Checked once, before anything is bound or any worker started."""
    with vsock_under_test() as vsock:
        done = run_briefly("ip-to-vsock", "-i", f"127.0.0.1:{free_port()}", "-v", "88:6101",
                           *workers, env={**vsock.env, "PF_PROXY_LOOP": "tokio"})  # fmt: skip
    assert done.returncode == 2, done
    assert "ERROR PF_PROXY_LOOP=tokio: the event loop is one of uvloop, asyncio" in done.stderr
    assert done.stderr.count("PF_PROXY_LOOP") == 1, done.stderr
    assert "Listening on" not in done.stdout and "Worker" not in done.stdout, done.stdout
    assert "Traceback" not in done.stderr
