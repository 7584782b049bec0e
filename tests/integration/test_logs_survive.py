"""The line that explains a failure survives a SIGKILL that comes right after the failure.

INFO lines are written in batches (runtime._LoopFlushedHandler); warnings and errors are
written the moment they are logged. An OOM kill or a supervisor's SIGKILL comes without
warning, and the lines it must not take with it are the last ones: the failure's.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tests.integration.helpers import Proxy, free_port
from tests.vsocks import Vsock

pytestmark = pytest.mark.timeout(300)

TRIES = 20


def test_an_error_line_is_in_the_log_when_sigkill_follows_the_failure(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    """ip-to-vsock towards a vsock port nobody listens on: the client's connection is closed
    with an ERROR line, and the proxy is killed the moment the client sees the close."""
    missing = vsock_link.address(free_port())
    for attempt in range(TRIES):
        port = free_port()
        proxy = Proxy(
            [
                "ip-to-vsock",
                "--ip-addr",
                f"127.0.0.1:{port}",
                "--vsock-addr",
                missing,
                "--connect-timeout",
                "0.2",
            ],
            tmp_path,
            env=vsock_link.env,
        ).wait_ready()
        try:
            assert _sees_the_close(port)
        finally:
            proxy.process.send_signal(signal.SIGKILL)
            assert proxy.process.wait(30) == -signal.SIGKILL
        assert "ERROR Closing connection from 127.0.0.1:" in proxy.stderr, (
            f"try {attempt + 1}: no ERROR line after SIGKILL:\n{proxy.stderr}"
        )
        assert f"failed to connect to vsock endpoint {missing}" in proxy.stderr


def _sees_the_close(port: int) -> bool:
    """Connect and read: True once the proxy has closed (a reset may come so soon that
    connect() itself reports it)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            return client.recv(1) == b""
    except ConnectionResetError:
        return True
