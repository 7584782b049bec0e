"""A burst of idle connections through ip-to-vsock -> vsock -> vsock-to-ip: none is lost.

Clients that arrive faster than vsock-to-ip accepts fill its listen backlog, and a vsock
connect to a full backlog fails at once with ECONNRESET, as if nobody listened (vsock.md).
Before the fix, 843 of 5,000 such connections were closed by ip-to-vsock. Now both listen with
the largest backlog the kernel allows, and ip-to-vsock tries a refused connect again within
its connect timeout. 10,000 connections over the emulation, 2,000 over real vsock in the guest
stage; each then echoes a few bytes of its own, so every one is known to be relayed.

Each proxy holds two descriptors per connection. Where the hard open-file limit is too low for
that in one process (raising it needs CAP_SYS_RESOURCE, which containers often lack), the
proxies run with --workers, each process holding its share.
"""

from __future__ import annotations

import asyncio
import math
import re
import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.helpers import echo_process, free_port, steady_proxy
from tests.vsocks import SLOWDOWN, Vsock, in_guest

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(600)]

BURST = 2_000 if in_guest() else 10_000
BURST_TIME = 60.0 * SLOWDOWN  # the whole burst, connected and echoed: far more than it takes


@contextmanager
def open_file_limit_raised() -> Iterator[int]:
    """RLIMIT_NOFILE of this process (and the proxies it starts) raised to its hard limit;
    yields that limit."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (before[1], before[1]))
    try:
        yield before[1]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


async def burst(port: int, count: int) -> list[socket.socket]:
    """Open `count` connections at once; then each sends its number and must read it back.
    Returns the sockets, still open (idle)."""
    loop = asyncio.get_running_loop()
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    for sock in sockets:
        sock.setblocking(False)

    async def echo(sock: socket.socket, number: int) -> bytes:
        message = b"%08d" % number
        await loop.sock_sendall(sock, message)
        received = b""
        while len(received) < len(message):
            chunk = await loop.sock_recv(sock, len(message) - len(received))
            if not chunk:
                break  # closed: the connection was lost
            received += chunk
        return received

    try:
        for sock in sockets:  # all at once: the kernel completes each handshake on its own
            sock.connect_ex(("127.0.0.1", port))
        async with asyncio.timeout(BURST_TIME):
            echoed = await asyncio.gather(
                *(echo(sock, number) for number, sock in enumerate(sockets)),
                return_exceptions=True,
            )
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    lost = [(n, answer) for n, answer in enumerate(echoed) if answer != b"%08d" % n]
    if lost:
        for sock in sockets:
            sock.close()
    assert not lost, f"{len(lost)} of {count} connections lost, e.g. {lost[:5]}"
    return sockets


def test_a_burst_of_idle_connections_loses_none(vsock_link: Vsock, tmp_path: Path) -> None:
    port, echo_port = free_port(), free_port()
    with open_file_limit_raised() as limit:
        # Two descriptors per connection in each proxy, and room to spare for an uneven share
        # among workers (those of vsock-to-ip accept on one shared socket).
        workers = str(max(1, math.ceil(4 * BURST / limit)))
        assert limit > BURST + 1024, f"the hard open-file limit {limit} is too low for the test"
        with (
            echo_process("tcp-loop", "127.0.0.1", str(echo_port), log_dir=tmp_path),
            steady_proxy(
                vsock_link, "vsock-to-ip", "-v", vsock_link.listen_address(4000), "-i",
                f"127.0.0.1:{echo_port}", "--workers", workers, log_dir=tmp_path,
            ) as inner,
            steady_proxy(
                vsock_link, "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v",
                vsock_link.address(4000), "--workers", workers, log_dir=tmp_path,
            ) as outer,
        ):  # fmt: skip
            for sock in asyncio.run(burst(port, BURST)):
                sock.close()
    for proxy in (outer, inner):
        assert "Closing connection" not in proxy.stderr, proxy.stderr[-2000:]
        assert "Traceback" not in proxy.stderr
    backlog = re.search(r"listen backlog (\d+)\)", inner.stdout)
    assert backlog, inner.stdout
    assert int(backlog.group(1)) == int(Path("/proc/sys/net/core/somaxconn").read_text())
