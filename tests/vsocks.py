"""The vsock a test runs over: the emulation (Unix sockets in a directory), or real AF_VSOCK.

Tests that take the `vsock` fixture (tests/conftest.py) are the same code for both. On this
machine they run over the emulation; inside the guest stage (tests/vsock/guest.py boots a QEMU
guest whose kernel has the `vsock_loopback` transport) over real AF_VSOCK. Real vsock is used
only where `in_guest()` holds: this machine's own vsock belongs to the infrastructure, so no
test may ever bind or connect an AF_VSOCK socket outside the guest.

Addresses: emulated, proxies and test servers listen on CID 88 and are reached at CID 88 (a
Unix socket per CID and port). Real, they listen on VMADDR_CID_ANY and are reached at CID 1
(VMADDR_CID_LOCAL, the loopback transport), the accepted side seeing its peer as
`(1, <ephemeral port>)`.
"""

from __future__ import annotations

import re
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.vsock import in_guest as _probe_guest

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_LOCAL = 1
EMULATED_CID = 88


def in_guest() -> bool:
    """True only inside the guest stage's QEMU guest (tests/vsock)."""
    return IN_GUEST


IN_GUEST = _probe_guest()
# How much longer a step may take in the guest: it runs under software emulation on machines
# without hardware virtualization (these: 5-20x slower than native, a Python start 2-3 s).
SLOWDOWN = 5.0 if IN_GUEST else 1.0


@dataclass
class Vsock:
    """Where a test's vsock lives, and how a test client or server reaches it."""

    real: bool
    directory: Path | None  # the emulation's directory; None over real vsock
    splice: bool = True  # the relay path the proxies take (PF_PROXY_NO_SPLICE when False)
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.env = {}
        if self.directory is not None:
            self.env["PF_PROXY_VSOCK_DIR"] = str(self.directory)
        if not self.splice:
            self.env["PF_PROXY_NO_SPLICE"] = "1"

    @property
    def kind(self) -> str:
        return "vsock" if self.real else "emulated vsock"

    @property
    def cid(self) -> int:
        """The CID a client connects to."""
        return VMADDR_CID_LOCAL if self.real else EMULATED_CID

    @property
    def listen_cid(self) -> int:
        """The CID a proxy or test server listens on."""
        return VMADDR_CID_ANY if self.real else EMULATED_CID

    def address(self, port: int, cid: int = EMULATED_CID) -> str:
        """`CID:PORT` for a proxy's upstream vsock target. `cid` places it in the emulation
        (a deployment with several CIDs); over real vsock every listener is at CID 1."""
        return f"{VMADDR_CID_LOCAL if self.real else cid}:{port}"

    def listen_address(self, port: int, cid: int = EMULATED_CID) -> str:
        """`CID:PORT` for a proxy's vsock listener (`cid` as for `address`)."""
        return f"{VMADDR_CID_ANY if self.real else cid}:{port}"

    def listener_name(self, port: int) -> str:
        """How a proxy names its vsock listener in its log lines."""
        return f"vsock {self.listen_address(port)}"

    def path(self, address: str) -> str:
        """The emulation's Unix socket for `CID:PORT`."""
        assert self.directory is not None, "only the emulation has paths"
        return str(self.directory / f"{address.replace(':', '_')}.sock")

    def inbound_name(self, port: int) -> str:
        """How a proxy names a connection accepted on its vsock listener (a prefix: over real
        vsock the peer's ephemeral port follows)."""
        return "vsock 1:" if self.real else self.listener_name(port)

    def _sockaddr(self, cid: int, port: int) -> object:
        if self.real:
            return (cid, port)
        assert self.directory is not None
        return str(self.directory / f"{cid}_{port}.sock")

    def _socket(self) -> socket.socket:
        if self.real:
            assert in_guest(), "real AF_VSOCK is only for the guest stage"
            return socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def client(self, port: int, timeout: float = 30.0, cid: int | None = None) -> socket.socket:
        """A blocking socket connected to `cid` (default: the usual one) and `port`."""
        sock = self._socket()
        sock.settimeout(timeout)
        try:
            sock.connect(self._sockaddr(self.cid if cid is None else cid, port))  # type: ignore[arg-type]
        except BaseException:
            sock.close()
            raise
        return sock

    def listener(self, port: int, backlog: int = 16, timeout: float = 30.0) -> socket.socket:
        """A blocking listening socket a proxy reaches at `address(port)`."""
        sock = self._socket()
        sock.settimeout(timeout)
        try:
            sock.bind(self._sockaddr(self.listen_cid, port))  # type: ignore[arg-type]
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    def echo_args(self, port: int) -> list[str]:
        """Arguments of tests.integration.echo_process for an echo server at `address(port)`."""
        if self.real:
            return ["vsock", str(self.listen_cid), str(port)]
        return ["unix", str(self._sockaddr(self.listen_cid, port))]

    def established(self) -> int:
        """Connected stream sockets of this vsock at this moment (both ends count)."""
        if self.real:
            out = _ss("--vsock", "state", "established")
            return len(out.splitlines())
        assert self.directory is not None
        # A connected Unix socket shows the path only on its listening side's accepted end.
        pattern = re.compile(re.escape(str(self.directory)) + r"/\S+\.sock")
        return sum(1 for line in _ss("-x", "state", "established").splitlines()
                   if pattern.search(line))


@contextmanager
def vsock_under_test(splice: bool = True) -> Iterator[Vsock]:
    """Real AF_VSOCK inside the guest stage, the emulation everywhere else (a fresh, short
    directory: a Unix socket's path holds at most 107 bytes)."""
    if in_guest():
        yield Vsock(real=True, directory=None, splice=splice)
        return
    with tempfile.TemporaryDirectory(prefix="pfp-vsock-") as name:
        yield Vsock(real=False, directory=Path(name), splice=splice)



def _ss(*args: str) -> str:
    return subprocess.run(
        ["ss", "-H", *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout
