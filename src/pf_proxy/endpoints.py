"""Places to listen on or connect to: vsock addresses and IP addresses.

Parsing turns the command-line text into values (`VsockAddress`, `IpAddress`); endpoints turn
those values into non-blocking sockets. This module is the only place that knows how a vsock
address becomes a socket. There are three transports (`VsockTransport`), and the planes never
ask which one they have:

    AF_VSOCK     real vsock (an enclave and its parent; a microVM's guest)
    Emulation    when PF_PROXY_VSOCK_DIR names a directory, CID:PORT is the Unix stream socket
                 $PF_PROXY_VSOCK_DIR/<CID>_<PORT>.sock, both for listening and connecting
                 (tests and demos; it behaves as AF_VSOCK does, see below)
    HybridVsock  a microVM's vsock device seen from the host (--vsock-uds PATH): listening on
                 port P is the Unix socket PATH_P, connecting to port P the CONNECT/OK
                 handshake on PATH (:mod:`pf_proxy.hybrid`)

The emulation and hybrid vsock are both Unix sockets; they share the listening side and differ
in what a path is, how a connect is made and what it can carry: hybrid vsock cannot pass a
half-close, which its endpoints say (`half_close`) and the relay reads.

Unix sockets with a filesystem path are reachable across network namespaces, so emulated
vsock links an "enclave" namespace to a "host" namespace just as vsock would.

What real AF_VSOCK does, and how the emulation is made to match (see docs/development/vsock.md):

- vsock has no reset. However a peer closes, its reader gets the bytes sent and then EOF;
  the next send fails with EPIPE. A Unix socket reports ECONNRESET to its reader when the
  closing side left bytes unread: `peer_close_is_eof()` tells readers to take that as the end
  of the stream, and `close_abortively()` drains an emulated socket before closing it, so its
  peer reads EOF too.
- Connecting to a port nobody listens on, or to a listener whose backlog is full, fails at
  once with ECONNRESET; a CID that does not exist fails at once with ENODEV. The emulation
  raises the same errors (a Unix socket would say ENOENT, ECONNREFUSED or EAGAIN), and every
  message names the vsock address and what the error means there.
- ECONNRESET cannot tell a full backlog (a burst of clients faster than the far side
  accepts) from a listener that is not there (yet), so such a connect is tried again after a
  short backoff while the caller's connect timeout leaves room (`ConnectRetries`, the one
  schedule every vsock connect of the TCP and UDP planes follows). The final failure says
  how often it was retried.
- CPython reads and writes every AF_VSOCK socket option as a 64-bit integer: a `bytes` value
  (a struct linger, a struct timeval) raises TypeError. No code sets such an option on a
  socket that may be vsock; `close_abortively()` leaves SO_LINGER to TCP sockets.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import re
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pf_proxy import hybrid

VSOCK_DIR_ENV = "PF_PROXY_VSOCK_DIR"
VMADDR_CID_ANY = 0xFFFFFFFF  # linux/vm_sockets.h: listen on every local CID
# Sockets made non-blocking at birth: no ioctl(FIONBIO) per connection.
_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
SO_VM_SOCKETS_BUFFER_SIZE = 0  # linux/vm_sockets.h (level AF_VSOCK)
SO_VM_SOCKETS_BUFFER_MAX_SIZE = 2  # linux/vm_sockets.h
U32_MAX = 0xFFFFFFFF
SOMAXCONN_PATH = Path("/proc/sys/net/core/somaxconn")
# A retried connect (see ConnectRetries) waits about RETRY_FIRST seconds before its first
# retry, twice as long before each next one, at most RETRY_CAP: a listener that is merely slow
# to accept is reached within milliseconds, one that is not there costs a try every 0.1 s.
RETRY_FIRST = 0.002
RETRY_CAP = 0.1

_DIGITS = re.compile(r"[0-9]+")
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
# A top-level domain is never all-numeric (RFC 3696 section 2), so a "host name" whose last
# label is all digits is a malformed IPv4 address: 300.1.1.1, 1.2.3.4.5, and legacy inet_aton
# forms such as 127.1 or 2130706433, which a resolver would read as 127.0.0.1.
_NUMERIC_LAST_LABEL = re.compile(r"(?:.*\.)?[0-9]+\.?")


def _is_ipv4_lookalike(host: str) -> bool:
    """Whether a host-name-shaped `host` is really an IPv4 address in a form we do not take:
    a last label of digits, or anything else inet_aton reads as one (0x7f.1, 1.0x7f)."""
    if _NUMERIC_LAST_LABEL.fullmatch(host):
        return True
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


class AddressError(ValueError):
    """Text that is not a valid address; the message says which part is wrong."""


class BindError(OSError):
    """A listener could not be opened; the message names the address."""


class ConnectError(OSError):
    """An upstream connection failed; the message names the address. `retryable`: the
    failure may pass if tried again (see `ConnectRetries`)."""

    retryable = False


def _retryable(exc: ConnectError) -> ConnectError:
    exc.retryable = True
    return exc


def _fraction() -> float:
    """A random number in [0, 1) for the retries' jitter (the random module would cost every
    process 0.2 MiB for it)."""
    return int.from_bytes(os.urandom(2)) / 65536


class ConnectRetries:
    """How one connect is tried again while it fails with a retryable error, until `deadline`
    (the event loop's clock; None: never retried, the caller has a schedule of its own).

    After each failed try the caller asks `delay()`: the seconds to wait before the next try
    (RETRY_FIRST, doubling up to RETRY_CAP, each drawn from its upper half so that a burst
    of clients refused together does not come back together), or None once the error is not
    retryable or the next try would start past the deadline. `final()` is then the error to
    report: it says how often the connect was retried, and for how long.
    """

    __slots__ = ("_next_delay", "count", "deadline", "first_failure", "last")

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.count = 0  # tries after the first
        self.first_failure: float | None = None
        self.last: ConnectError | None = None  # the latest failure
        self._next_delay = RETRY_FIRST

    def delay(self, exc: ConnectError, now: float) -> float | None:
        self.last = exc
        if self.first_failure is None:
            self.first_failure = now
        if not exc.retryable or self.deadline is None:
            return None
        delay = self._next_delay * (0.5 + _fraction() / 2)
        if now + delay >= self.deadline:
            return None
        self._next_delay = min(self._next_delay * 2, RETRY_CAP)
        self.count += 1
        return delay

    def interrupted(self, now: float) -> ConnectError | None:
        """What the retries had met when the deadline cut them short (a try in progress), or
        None if there were none: `final` of the latest failure."""
        if not self.count or self.last is None:
            return None
        return self.final(self.last, now)

    def final(self, exc: ConnectError, now: float) -> ConnectError:
        """The error that ends the connect: `exc`, saying how often it was retried."""
        if not self.count:
            return exc
        started = now if self.first_failure is None else self.first_failure
        times = "once" if self.count == 1 else f"{self.count} times"
        final = ConnectError(exc.errno, f"{exc.strerror}; retried {times} in {now - started:.2f} s")
        final.retryable = exc.retryable
        return final


def max_backlog() -> int:
    """The largest listen backlog the kernel allows: net.core.somaxconn, as this network
    namespace has it (listen() silently takes the lesser of it and what it is given)."""
    try:
        return int(SOMAXCONN_PATH.read_text())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def _parse_u32(text: str, what: str) -> int:
    if not _DIGITS.fullmatch(text) or int(text) > U32_MAX:
        raise AddressError(f"failed to parse {what} as a u32")
    return int(text)


@dataclass(frozen=True)
class VsockAddress:
    cid: int
    port: int

    def __str__(self) -> str:
        return f"{self.cid}:{self.port}"


def parse_vsock_address(text: str) -> VsockAddress:
    """Parse `CID:PORT` (both unsigned 32-bit decimals), split at the first colon."""
    cid_text, colon, port_text = text.partition(":")
    if not colon:
        raise AddressError("invalid vsock address, should contain one colon")
    return VsockAddress(_parse_u32(cid_text, "cid"), _parse_u32(port_text, "port"))


def parse_cid(text: str) -> int:
    """Parse a bare CID (unsigned 32-bit decimal)."""
    return _parse_u32(text, "cid")


@dataclass(frozen=True)
class IpAddress:
    """An IP literal (IPv6 possibly with a scope id) or, for upstream targets, a host name."""

    host: str
    port: int

    @property
    def is_literal(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def numeric_infos(self, kind: int, passive: bool = False) -> list[tuple[Any, ...]]:
        """getaddrinfo() of this IP literal, without any lookup (OSError if it is not one, or
        names an unknown scope id). The host goes as bytes: as a str, getaddrinfo() would put
        it through the idna codec, whose import costs every process 0.4 MiB."""
        flags = socket.AI_NUMERICHOST | (socket.AI_PASSIVE if passive else 0)
        return socket.getaddrinfo(self.host.encode(), self.port, type=kind, flags=flags)


def parse_ip_address(text: str, *, allow_host_name: bool = False) -> IpAddress:
    """Parse `IPv4:PORT`, `[IPv6]:PORT` or `[IPv6%scope]:PORT`; with `allow_host_name`, also
    `name:PORT` (resolved when connecting)."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise AddressError("malformed address, expected [IPv6]:PORT")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"invalid IPv6 address {host!r}") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise AddressError("malformed address, expected IP:PORT")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if ":" in host:
                raise AddressError("IPv6 addresses must be written as [IPv6]:PORT") from None
            if not allow_host_name:
                raise AddressError(f"invalid IPv4 address {host!r}") from None
            if not _HOST_NAME.fullmatch(host):
                raise AddressError(f"invalid host name {host!r}") from None
            if _is_ipv4_lookalike(host):
                raise AddressError(f"invalid IPv4 address {host!r}") from None
    if not _DIGITS.fullmatch(port_text) or int(port_text) > 0xFFFF:
        raise AddressError(f"invalid port {port_text!r}, expected 0-65535")
    return IpAddress(host, int(port_text))


# --- sockets --------------------------------------------------------------------------------


class Connecting(NamedTuple):
    """A connect begun without waiting: `sock` is connected if `done`; if not, wait until it
    is writable, then call its endpoint's `finish_connect`."""

    sock: socket.socket
    done: bool


def begin_connect(sock: socket.socket, address: object) -> bool:
    """Start connecting a non-blocking socket: True if connected at once, False if in
    progress (EINPROGRESS). Any other error, EAGAIN included (a Unix listener's full
    backlog), raises OSError, so a socket that did not connect is never taken for one."""
    err = sock.connect_ex(address)  # type: ignore[arg-type]
    if err == 0:
        return True
    if err == errno.EINPROGRESS:
        return False
    raise OSError(err, os.strerror(err))


def end_connect(sock: socket.socket) -> None:
    """After a connect in progress made `sock` writable: raise OSError if it failed."""
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def connect_socket(sock: socket.socket, address: object) -> None:
    """Connect a non-blocking socket of any family, waiting on the running loop."""
    if sock.gettimeout() != 0.0:
        sock.setblocking(False)
    if not begin_connect(sock, address):
        await _writable(sock)
        end_connect(sock)


async def _writable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    await _ready(sock, loop.add_writer, loop.remove_writer)


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    await _ready(sock, loop.add_reader, loop.remove_reader)


async def _ready(
    sock: socket.socket,
    watch: Callable[[int, Callable[[], None]], object],
    forget: Callable[[int], object],
) -> None:
    ready = asyncio.get_running_loop().create_future()

    def on_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    watch(sock.fileno(), on_ready)
    try:
        await ready
    finally:
        forget(sock.fileno())


def _listen(sock: socket.socket, address: object, backlog: int | None) -> socket.socket:
    """Bind and listen (`backlog` None: the largest the kernel allows); close it if that
    fails."""
    try:
        sock.bind(address)  # type: ignore[arg-type]
        sock.listen(max_backlog() if backlog is None else backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _begin(sock: socket.socket, address: object, tcp_nodelay: bool = False) -> Connecting:
    """`begin_connect` on a socket just opened for it, which is closed if that fails."""
    try:
        if tcp_nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Connecting(sock, begin_connect(sock, address))
    except BaseException:
        sock.close()
        raise


class _Connectable:
    """What connecting means for every kind of endpoint; each says how to connect once and
    what an error means."""

    def _connect_error(self, exc: OSError) -> ConnectError:
        raise NotImplementedError

    async def _connect_once(self, deadline: float | None) -> socket.socket:
        """One try, bounded by `deadline` (the loop's clock) where it has steps of its own."""
        raise NotImplementedError

    @property
    def half_close(self) -> bool:
        """Whether a half-close (SHUT_WR) crosses to the peer, which can still send back."""
        return True

    def finish_connect(self, sock: socket.socket) -> None:
        """A connect in progress ended (the socket became writable): `ConnectError` if it
        failed."""
        try:
            end_connect(sock)
        except OSError as exc:
            raise self._connect_error(exc) from exc

    async def connect(self, retries: ConnectRetries | None = None) -> socket.socket:
        """A connected non-blocking socket; `ConnectError` names the address. With
        `retries`, a failure that may pass is tried again on its schedule."""
        if retries is None:
            return await self._connect_once(None)
        loop = asyncio.get_running_loop()
        while True:
            try:
                return await self._connect_once(retries.deadline)
            except ConnectError as exc:
                cut = retries.interrupted(loop.time()) if exc.errno == errno.ETIMEDOUT else None
                if cut is not None:  # the deadline cut a retry short: say why it was retried
                    raise cut from exc
                delay = retries.delay(exc, loop.time())
                if delay is None:
                    final = retries.final(exc, loop.time())
                    if final is exc:
                        raise
                    raise final from exc
            await asyncio.sleep(delay)


class VsockTransport:
    """How a vsock address becomes sockets. Three variants: real AF_VSOCK (`AF_VSOCK`), its
    emulation by a Unix socket per CID and port (`Emulation`), and hybrid vsock, a microVM's
    vsock device seen from the host (`HybridVsock`). The planes only see a `VsockEndpoint`;
    what a transport cannot carry, they read from its properties (`half_close`)."""

    # A SHUT_WR reaches the peer as an end of stream, and the peer can still send back.
    half_close = True

    def describe(self, address: VsockAddress) -> str:
        """How log lines and errors name `address` over this transport."""
        return f"vsock {address}"

    def check(self, address: VsockAddress, listening: bool) -> None:
        """Raise AddressError if `address` cannot be listened on (or connected to) here."""

    def target(self, address: VsockAddress) -> Any:
        """What `start_connect` needs for `address`, made once per endpoint."""
        return (address.cid, address.port)

    def listen(
        self, address: VsockAddress, backlog: int | None, buffer_size: int | None
    ) -> socket.socket:
        raise NotImplementedError

    def listen_where(self, address: VsockAddress) -> str:
        """Where a listener on `address` really is, for its bind error ("" if obvious)."""
        return ""

    def start_connect(self, target: Any, buffer_size: int | None) -> Connecting | None:
        """Begin connecting (OSError if that fails at once); None if connecting takes a
        task (`connect_once`)."""
        raise NotImplementedError

    async def connect_once(self, endpoint: VsockEndpoint, deadline: float | None) -> socket.socket:
        return await _connect(endpoint, endpoint.start_connect())

    def connect_error(self, address: VsockAddress, exc: OSError) -> ConnectError:
        """`exc` as a `ConnectError` naming the address and what the error means for vsock;
        ECONNRESET (no listener, or a full backlog) may pass."""
        meaning = _VSOCK_CONNECT_ERRORS.get(exc.errno or 0, "").format(
            self.describe(address), address=address
        )
        why = f"{meaning} ({exc.strerror})" if meaning else (exc.strerror or str(exc))
        error = ConnectError(exc.errno, f"failed to connect to vsock endpoint {address}: {why}")
        return _retryable(error) if exc.errno == errno.ECONNRESET else error


class _AfVsock(VsockTransport):
    """Real AF_VSOCK. `buffer_size`, when given, is each socket's SO_VM_SOCKETS_BUFFER_SIZE:
    the receive buffer that caps one connection's bytes in flight (vsock's flow control is
    credit based), set on a listener before accept (accepted sockets inherit it) and on a
    connecting socket before connect."""

    def _socket(self, buffer_size: int | None) -> socket.socket:
        sock = socket.socket(socket.AF_VSOCK, _NONBLOCKING_STREAM)
        if buffer_size is not None:
            try:
                # The maximum first: a size above it is silently clamped. Integers only, as
                # CPython passes every AF_VSOCK option as a 64-bit value.
                sock.setsockopt(socket.AF_VSOCK, SO_VM_SOCKETS_BUFFER_MAX_SIZE, buffer_size)
                sock.setsockopt(socket.AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, buffer_size)
            except BaseException:
                sock.close()
                raise
        return sock

    def listen(
        self, address: VsockAddress, backlog: int | None, buffer_size: int | None
    ) -> socket.socket:
        return _listen(self._socket(buffer_size), (address.cid, address.port), backlog)

    def start_connect(self, target: Any, buffer_size: int | None) -> Connecting:
        return _begin(self._socket(buffer_size), target)


AF_VSOCK = _AfVsock()


class _UnixSockets(VsockTransport):
    """What the two stand-ins on Unix stream sockets share: a listener is a socket file (a
    stale one, nobody accepting on it, is replaced), and a reset read from a peer that
    closed is only its end (`peer_close_is_eof`). vsock's buffer sizes do not apply."""

    def listen_path(self, address: VsockAddress) -> Path:
        raise NotImplementedError

    def listen(
        self, address: VsockAddress, backlog: int | None, buffer_size: int | None
    ) -> socket.socket:
        path = self.listen_path(address)
        _remove_stale_socket(path)
        return _listen(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), str(path), backlog)


class Emulation(_UnixSockets):
    """vsock emulated for tests and demos (PF_PROXY_VSOCK_DIR): CID:PORT is the Unix socket
    `directory`/CID_PORT.sock, for listening and connecting alike. It connects as AF_VSOCK
    would: a listener on VMADDR_CID_ANY takes every CID; no listener, or a full backlog, is
    ECONNRESET at once (never EAGAIN, never a wait)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def socket_path(self, address: VsockAddress, cid: int | None = None) -> Path:
        return self.directory / f"{address.cid if cid is None else cid}_{address.port}.sock"

    listen_path = socket_path

    def listen_where(self, address: VsockAddress) -> str:
        return f" (emulated at {self.socket_path(address)})"

    def target(self, address: VsockAddress) -> tuple[str, str]:
        # The CID's own socket, then CID-any's: strings made once per endpoint (a Path per
        # connection showed in profiles).
        return str(self.socket_path(address)), str(self.socket_path(address, VMADDR_CID_ANY))

    def start_connect(self, target: Any, buffer_size: int | None) -> Connecting:
        for path in target:
            try:
                return _begin(socket.socket(socket.AF_UNIX, _NONBLOCKING_STREAM), path)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:  # the listener's backlog is full
                    raise _reset() from exc
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    raise
        raise _reset()  # nobody listens on either path


# A hybrid handshake with no deadline of its own (a caller without a connect timeout) is
# given this long.
HANDSHAKE_TIMEOUT = 10.0
VMADDR_CID_HOST = 2  # linux/vm_sockets.h: the host, as a guest addresses it
_HYBRID_HINTS = {
    hybrid.NO_LISTENER: " (nothing listens on guest port {port}, or not yet)",
    hybrid.NOT_UP: " (the guest's vsock is not up yet)",
}


class HybridVsock(_UnixSockets):
    """Hybrid vsock: the host side of a Firecracker or Cloud Hypervisor microVM (or of
    vhost-device-vsock), whose vsock device is the Unix socket `uds_path`. One uds_path is
    one VM, so the CID of an address only says which side it is:

    - listening on CID:P is the guest's connect to the host (CID 2) port P, which the
      backend passes to the Unix socket `uds_path`_P: CID 2 or -1 (any);
    - connecting to CID:P is the CONNECT/OK handshake for guest port P on `uds_path`
      (:mod:`pf_proxy.hybrid`); the protocol carries no CID, so CID is the guest's (3 or
      more), whichever VM is behind uds_path.

    Nothing is sent before OK (a backend drops bytes that come with the CONNECT line); the
    handshake is bounded by the connect deadline, and a refusal that may pass (no listener
    yet, the guest not up) is retried on the caller's `ConnectRetries`. Half-close does not
    cross: a host SHUT_WR is a full shutdown for the guest (its reply would fail), and a
    guest's SHUT_WR never reaches the host, so `half_close` is False.
    """

    half_close = False

    def __init__(self, uds_path: Path) -> None:
        self.uds_path = uds_path
        self.path = str(uds_path)
        self.handshakes = hybrid.Handshakes(self.path, Counter())

    def describe(self, address: VsockAddress) -> str:
        return f"hybrid vsock {address} ({self.uds_path})"

    def check(self, address: VsockAddress, listening: bool) -> None:
        if listening:
            if address.cid not in (VMADDR_CID_HOST, VMADDR_CID_ANY):
                raise AddressError(
                    f"with --vsock-uds a listener is the host side of one VM, reached by the "
                    f"guest at CID 2: use 2:{address.port} (or {VMADDR_CID_ANY}:{address.port})"
                )
        elif address.cid < 3 or address.cid == VMADDR_CID_ANY:
            raise AddressError(
                f"with --vsock-uds the upstream is the guest behind {self.uds_path}: its CID "
                f"is 3 or more, not {address.cid}"
            )

    def listen_path(self, address: VsockAddress) -> Path:
        return Path(f"{self.uds_path}_{address.port}")

    def listen_where(self, address: VsockAddress) -> str:
        return f" (hybrid, at {self.listen_path(address)})"

    def start_connect(self, target: Any, buffer_size: int | None) -> None:
        return None  # the handshake takes a task

    async def connect_once(self, endpoint: VsockEndpoint, deadline: float | None) -> socket.socket:
        loop = asyncio.get_running_loop()
        started = loop.time()
        if deadline is None:
            deadline = started + HANDSHAKE_TIMEOUT
        port = endpoint.address.port
        sock = socket.socket(socket.AF_UNIX, _NONBLOCKING_STREAM)
        try:
            async with asyncio.timeout_at(deadline):
                refused = await self._handshake(sock, port)
        except TimeoutError:
            sock.close()
            self.handshakes.count(hybrid.TIMED_OUT)
            raise self._failed(
                endpoint.address,
                errno.ETIMEDOUT,
                hybrid.TIMED_OUT,
                f"CONNECT {port}: no answer within {loop.time() - started:.2f} s",
            ) from None
        except BaseException:
            sock.close()
            raise
        if refused is None:
            self.handshakes.count(hybrid.CONNECTED)
            return sock
        sock.close()
        self.handshakes.count(refused.outcome)
        failure = self._failed(endpoint.address, refused.errno, refused.outcome, refused.detail)
        if refused.outcome in (hybrid.NO_LISTENER, hybrid.NOT_UP):
            _retryable(failure)
        raise failure

    async def _handshake(self, sock: socket.socket, port: int) -> _HybridRefusal | None:
        """CONNECT, then read exactly the answer line (a peek finds its end: not a byte of
        the guest's stream is taken). None once OK; else why not."""
        try:
            await connect_socket(sock, self.path)
        except OSError as exc:
            return _HybridRefusal(
                exc.errno or errno.ECONNREFUSED,
                hybrid.NOT_UP,
                f"cannot connect to {self.path}: {exc.strerror or exc} (is the VM running?)",
            )
        request = hybrid.connect_request(port)
        try:
            sent = sock.send(request)
        except OSError as exc:  # accepted, and closed at once
            return self._cut(exc, f"CONNECT {port}: the backend closed before it was asked")
        if sent != len(request):  # a fresh socket takes 20 bytes whole
            return _HybridRefusal(errno.EPROTO, hybrid.BAD_ANSWER, "the CONNECT line was cut")
        answer = b""
        while True:
            await _readable(sock)
            try:
                peeked = sock.recv(hybrid.MAX_ANSWER, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            except OSError as exc:
                return self._cut(exc, f"CONNECT {port}: the backend reset the connection before OK")
            judged = hybrid.read_answer(answer + peeked, ended=not peeked)
            if isinstance(judged, hybrid.Accepted):
                sock.recv(judged.size - len(answer))  # the rest of the line, peeked already
                return None
            if isinstance(judged, hybrid.Refused):
                code = errno.ECONNREFUSED if judged.outcome == hybrid.NO_LISTENER else errno.EPROTO
                return _HybridRefusal(code, judged.outcome, f"CONNECT {port}: {judged.answer}")
            answer += sock.recv(len(peeked))  # all of it is the answer line: no newline yet

    @staticmethod
    def _cut(exc: OSError, detail: str) -> _HybridRefusal:
        """The stream broke before OK: the guest's side is not up (yet)."""
        why = "" if exc.errno == errno.ECONNRESET else f" ({exc.strerror or exc})"
        return _HybridRefusal(exc.errno or errno.ECONNRESET, hybrid.NOT_UP, f"{detail}{why}")

    def _failed(self, address: VsockAddress, code: int, outcome: str, detail: str) -> ConnectError:
        hint = _HYBRID_HINTS.get(outcome, "").format(port=address.port)
        words = outcome.replace("_", " ")
        return ConnectError(
            code, f"failed to connect to {self.describe(address)}: {words}: {detail}{hint}"
        )


class _HybridRefusal(NamedTuple):
    errno: int
    outcome: str
    detail: str


class VsockEndpoint(_Connectable):
    """A vsock address over one of the three transports (`AF_VSOCK` by default).

    `buffer_size` (bytes), when given, is each real vsock socket's receive buffer (see
    `_AfVsock`); the stand-ins on Unix sockets ignore it.
    """

    def __init__(
        self,
        address: VsockAddress,
        transport: VsockTransport = AF_VSOCK,
        buffer_size: int | None = None,
    ) -> None:
        self.address = address
        self.transport = transport
        self.buffer_size = buffer_size
        self._target = transport.target(address)

    def at_port(self, port: int) -> VsockEndpoint:
        """The same CID, transport and buffer size, another port."""
        return VsockEndpoint(VsockAddress(self.address.cid, port), self.transport, self.buffer_size)

    def __str__(self) -> str:
        return self.transport.describe(self.address)

    @property
    def half_close(self) -> bool:
        return self.transport.half_close

    def listen(self, backlog: int | None = None) -> socket.socket:
        """A bound, listening, non-blocking socket; `BindError` names the address."""
        try:
            return self.transport.listen(self.address, backlog, self.buffer_size)
        except OSError as exc:
            where = self.transport.listen_where(self.address)
            raise BindError(
                exc.errno,
                f"Failed to bind listener to vsock {self.address}{where}: {exc.strerror or exc}",
            ) from exc

    def listen_shared(self, backlog: int | None, count: int) -> list[socket.socket]:
        """Listening sockets for `count` worker processes: AF_VSOCK (and the Unix sockets
        that stand in for it) has no SO_REUSEPORT, so it is one socket, which every worker
        inherits and accepts on (the list holds it `count` times)."""
        return [self.listen(backlog)] * count

    def start_connect(self) -> Connecting | None:
        """Begin connecting without waiting; None if connecting takes a task (`connect`).
        `ConnectError` names the address and says what the error means for vsock
        (ECONNRESET: nobody listens, or the backlog is full)."""
        try:
            return self.transport.start_connect(self._target, self.buffer_size)
        except OSError as exc:
            raise self._connect_error(exc) from exc

    async def _connect_once(self, deadline: float | None) -> socket.socket:
        return await self.transport.connect_once(self, deadline)

    def _connect_error(self, exc: OSError) -> ConnectError:
        return self.transport.connect_error(self.address, exc)


async def _connect(endpoint: Endpoint, connecting: Connecting | None) -> socket.socket:
    """Wait for a connect `endpoint.start_connect()` began; the connected socket."""
    assert connecting is not None, "an endpoint that connects in a task has a connect_once"
    sock = connecting.sock
    if not connecting.done:
        try:
            await _writable(sock)
            endpoint.finish_connect(sock)
        except BaseException:
            sock.close()
            raise
    return sock


def _reset() -> OSError:
    return OSError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))


# What a failed vsock connect means, by errno (observed over real AF_VSOCK; see vsock.md).
_VSOCK_CONNECT_ERRORS = {
    errno.ECONNRESET: "nobody listens on {0}, or its listen backlog is full",
    errno.ENODEV: "no such CID: nothing at {address.cid} is reachable over vsock",
    errno.ETIMEDOUT: "{0} did not answer within the kernel's vsock connect timeout",
}


_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff=1, l_linger=0}: close sends RST
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_NO_RESET_FAMILIES = (socket.AF_UNIX, socket.AF_VSOCK)
_DRAIN_LIMIT = 16 << 20  # read from an emulated socket before close; its queue holds far less


def peer_close_is_eof(sock: socket.socket) -> bool:
    """Whether ECONNRESET from reading `sock` means only "the peer closed": true for vsock
    (which never reports it) and its emulation (a Unix socket reports it when the closing
    peer left bytes unread, after every byte the peer sent was read)."""
    return sock.family in _NO_RESET_FAMILIES


def close_abortively(sock: socket.socket) -> None:
    """Close a socket whose stream did not end cleanly; never raises.

    A TCP peer is reset (SO_LINGER 0), so it cannot take a truncated stream for a complete
    one. vsock has no reset: its peer reads EOF however we close (and CPython would raise
    TypeError for a struct linger on it). An emulated vsock socket is shut down (the peer's
    next send fails with EPIPE, as over vsock) and drained, so the peer reads EOF as over
    vsock, not the ECONNRESET a Unix socket closed with unread bytes gives.
    """
    try:
        if sock.family in _TCP_FAMILIES:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        elif sock.family == socket.AF_UNIX:
            sock.shutdown(socket.SHUT_RDWR)
            _drain(sock)
    except OSError:
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


def _drain(sock: socket.socket) -> None:
    scratch = bytearray(1 << 16)
    drained = 0
    while drained < _DRAIN_LIMIT and (count := sock.recv_into(scratch, 0, socket.MSG_DONTWAIT)):
        drained += count


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file nobody accepts on; raise EADDRINUSE if somebody does."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()
    except FileNotFoundError:
        pass
    else:
        raise OSError(errno.EADDRINUSE, "address in use by a live listener")
    finally:
        probe.close()


class IpEndpoint(_Connectable):
    """An IP address with port; host names are resolved at connect time."""

    def __init__(self, address: IpAddress) -> None:
        self.address = address
        # An IP literal resolves without any lookup: do it once, not on every connect (the
        # loop's getaddrinfo goes through a thread pool, a round trip per connection).
        self._literal_infos: list[Any] | None = None
        if address.is_literal:
            try:
                self._literal_infos = address.numeric_infos(socket.SOCK_STREAM)
            except OSError:
                pass  # e.g. an unknown scope id: connect() looks it up and reports it

    def __str__(self) -> str:
        return str(self.address)

    def listen(self, backlog: int | None = None, reuse_port: bool = False) -> socket.socket:
        """A bound, listening, non-blocking socket; `BindError` names the address."""
        try:
            family, _, _, _, sockaddr = self.address.numeric_infos(socket.SOCK_STREAM, True)[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            return _listen(sock, sockaddr, backlog)
        except OSError as exc:
            raise BindError(
                exc.errno, f"Failed to bind listener to {self.address}: {exc.strerror or exc}"
            ) from exc

    def listen_shared(self, backlog: int | None, count: int) -> list[socket.socket]:
        """Listening sockets for `count` worker processes, one each, bound to the same
        address with SO_REUSEPORT: the kernel spreads new connections over them.

        SO_REUSEPORT would also let a second copy of the command (same user) bind the port
        and take a share of its connections. So the address is first bound the ordinary way:
        a port in use, by anything, is `BindError` as for one process.
        """
        self.listen(backlog).close()
        sockets: list[socket.socket] = []
        try:
            for _ in range(count):
                sockets.append(self.listen(backlog, reuse_port=True))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return sockets

    def start_connect(self) -> Connecting | None:
        """Begin connecting an IP literal without waiting (`ConnectError` names the address);
        None for a host name, which `connect` resolves first."""
        infos = self._literal_infos
        if infos is None or len(infos) != 1:
            return None
        family, kind, proto, _, sockaddr = infos[0]
        try:
            sock = socket.socket(family, kind | socket.SOCK_NONBLOCK, proto)
            return _begin(sock, sockaddr, tcp_nodelay=True)
        except OSError as exc:
            raise self._connect_error(exc) from exc

    async def _connect_once(self, deadline: float | None) -> socket.socket:
        """A host name is resolved, and each of its addresses tried in turn."""
        connecting = self.start_connect()
        if connecting is not None:
            return await _connect(self, connecting)
        loop = asyncio.get_running_loop()
        try:
            infos = self._literal_infos or await loop.getaddrinfo(
                self.address.host, self.address.port, type=socket.SOCK_STREAM
            )
            last: OSError = OSError(errno.EHOSTUNREACH, "no addresses")
            for family, kind, proto, _, sockaddr in infos:
                sock = socket.socket(family, kind | socket.SOCK_NONBLOCK, proto)
                try:
                    await connect_socket(sock, sockaddr)
                except OSError as exc:
                    sock.close()
                    last = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            raise last
        except OSError as exc:
            raise self._connect_error(exc) from exc

    def _connect_error(self, exc: OSError) -> ConnectError:
        return ConnectError(
            exc.errno, f"failed to connect to TCP endpoint {self.address}: {exc.strerror or exc}"
        )


Endpoint = VsockEndpoint | IpEndpoint


def emulation_dir_from_env() -> Path | None:
    value = os.environ.get(VSOCK_DIR_ENV)
    return Path(value) if value else None


def vsock_transport(uds_path: Path | None = None) -> VsockTransport:
    """Hybrid vsock through `uds_path` if given; else the emulation when PF_PROXY_VSOCK_DIR
    is set; else real AF_VSOCK. AddressError if both of the first two are asked for."""
    emulation_dir = emulation_dir_from_env()
    if uds_path is None:
        return AF_VSOCK if emulation_dir is None else Emulation(emulation_dir)
    if emulation_dir is not None:
        raise AddressError(f"hybrid vsock and the emulation ({VSOCK_DIR_ENV}) exclude each other")
    return HybridVsock(uds_path)


def vsock_endpoint(
    address: VsockAddress,
    buffer_size: int | None = None,
    transport: VsockTransport | None = None,
    *,
    listening: bool = False,
) -> VsockEndpoint:
    """A vsock endpoint over `transport` (default: `vsock_transport()`); AddressError if
    the address cannot be used that way (`listening` or connecting) there."""
    transport = vsock_transport() if transport is None else transport
    transport.check(address, listening)
    return VsockEndpoint(address, transport, buffer_size)
