"""Both sides of a described enclave, `pf-proxy run FILE --side enclave` and `--side parent`,
over the vsock under test: the emulation here, real AF_VSOCK in the guest stage (one kernel:
both sides use CID 1, and their vsock ports differ).

    client -> parent 127.0.0.1:INGRESS -> vsock :SERVICE -> enclave -> 127.0.0.1 echo server
    client -> enclave udp 127.0.0.1:DNS -> vsock -> parent -> UDP echo server
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.helpers import BOTH_LOOPS, EchoServer, Proxy, exchange, free_port, served_on
from tests.vsocks import SLOWDOWN, Vsock

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(300)]

WAIT = 30.0 * SLOWDOWN


@contextmanager
def udp_echo() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    stopping = False

    def serve() -> None:
        while not stopping:
            try:
                data, peer = sock.recvfrom(65535)
            except OSError:
                return
            sock.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stopping = True
        sock.close()


@BOTH_LOOPS  # over real vsock too
def test_both_sides_of_one_file_over_vsock(
    vsock_link: Vsock, echo: EchoServer, tmp_path: Path, loop: dict[str, str]
) -> None:
    cid = vsock_link.cid  # 1 over real vsock (one kernel), 88 in the emulation
    ingress, service, dns = free_port(), free_port(), free_port()
    tcp_upstream = echo
    with udp_echo() as udp_upstream:
        file = tmp_path / "enclave.toml"
        file.write_text(
            f"[enclave]\ncid = {cid}\n[parent]\ncid = {cid}\n"
            f'[[ingress]]\nlisten = "127.0.0.1:{ingress}"\n'
            f'target = "127.0.0.1:{tcp_upstream.port}"\nvsock-port = {service}\n'
            f'[dns]\nlisten = "127.0.0.1:{dns}"\nupstream = "127.0.0.1:{udp_upstream}"\n'
            f"vsock-port = {free_port()}\ntcp-vsock-port = {free_port()}\n"
        )
        sides = {
            side: Proxy(
                ["pf-proxy", "run", str(file), "--side", side],
                tmp_path,
                {**vsock_link.env, **loop},
                timeout=WAIT,
            )
            for side in ("enclave", "parent")
        }
        try:
            sides["enclave"].wait_for(f"[ingress-{service}] Listening on:")
            sides["enclave"].wait_for("[dns-udp] Listening on:")
            sides["parent"].wait_for(f"[ingress-{service}] Listening on:")
            sides["parent"].wait_for("[dns-tcp] Listening on:")
            payload = b"through both sides of one file " * 1000
            assert exchange(("127.0.0.1", ingress), payload, timeout=WAIT) == payload
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(WAIT)
                for attempt in range(5):  # UDP: a datagram lost on the way is sent again
                    client.sendto(b"a datagram", ("127.0.0.1", dns))
                    try:
                        assert client.recv(100) == b"a datagram"
                        break
                    except TimeoutError:
                        assert attempt < 4
            codes = {side: running.stop() for side, running in sides.items()}
            assert codes == {"enclave": 0, "parent": 0}
        finally:
            for running in sides.values():
                running.stop()
        parent, enclave = sides["parent"].stdout, sides["enclave"].stdout
        assert served_on(loop, parent) and served_on(loop, enclave)
        assert f"[ingress-{service}] Proxying to: vsock {cid}:{service}" in parent
        assert f"[ingress-{service}] Proxying to: 127.0.0.1:{tcp_upstream.port}" in enclave
        assert "[dns-udp] udp-to-vsock: 1 flows" in enclave
