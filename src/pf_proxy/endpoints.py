"""Places to listen on or connect to: vsock addresses and IP addresses.

Parsing turns the command-line text into values (`VsockAddress`, `IpAddress`); endpoints turn
those values into non-blocking sockets. This module is the only place that knows whether a
vsock address is real AF_VSOCK or emulated:

    When the environment variable PF_PROXY_VSOCK_DIR names a directory, the vsock address
    CID:PORT is the Unix stream socket $PF_PROXY_VSOCK_DIR/<CID>_<PORT>.sock, both for
    listening and for connecting.

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
import random
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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


class ConnectRetries:
    """How one connect is tried again while it fails with a retryable error, until `deadline`
    (the event loop's clock; None: never retried, the caller has a schedule of its own).

    After each failed try the caller asks `delay()`: the seconds to wait before the next try
    (RETRY_FIRST, doubling up to RETRY_CAP, each drawn from its upper half so that a burst
    of clients refused together does not come back together), or None once the error is not
    retryable or the next try would start past the deadline. `final()` is then the error to
    report: it says how often the connect was retried, and for how long.
    """

    __slots__ = ("_next_delay", "count", "deadline", "first_failure")

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.count = 0  # tries after the first
        self.first_failure: float | None = None
        self._next_delay = RETRY_FIRST

    def delay(self, exc: ConnectError, now: float) -> float | None:
        if self.first_failure is None:
            self.first_failure = now
        if not exc.retryable or self.deadline is None:
            return None
        delay = self._next_delay * (0.5 + random.random() / 2)
        if now + delay >= self.deadline:
            return None
        self._next_delay = min(self._next_delay * 2, RETRY_CAP)
        self.count += 1
        return delay

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
    ready = loop.create_future()

    def on_writable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), on_writable)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


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

    async def _connect_once(self) -> socket.socket:
        raise NotImplementedError

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
            return await self._connect_once()
        loop = asyncio.get_running_loop()
        while True:
            try:
                return await self._connect_once()
            except ConnectError as exc:
                delay = retries.delay(exc, loop.time())
                if delay is None:
                    final = retries.final(exc, loop.time())
                    if final is exc:
                        raise
                    raise final from exc
            await asyncio.sleep(delay)


class VsockEndpoint(_Connectable):
    """A vsock address, real or emulated by a Unix socket in `emulation_dir`.

    `buffer_size` (bytes), when given, is each real vsock socket's SO_VM_SOCKETS_BUFFER_SIZE:
    the receive buffer that caps one connection's bytes in flight (vsock's flow control is
    credit based). It is set on the listener before accept (accepted sockets inherit it) and
    on a connecting socket before connect. The emulation has no such buffer and ignores it.
    """

    def __init__(
        self, address: VsockAddress, emulation_dir: Path | None, buffer_size: int | None = None
    ) -> None:
        self.address = address
        self.emulation_dir = emulation_dir
        self.buffer_size = buffer_size
        # Where an emulated connect looks, in order: the CID's own socket, then CID-any's
        # (strings made once: a Path per connection showed in profiles).
        self._emulated_paths = (
            (str(self.socket_path()), str(self.socket_path(VMADDR_CID_ANY)))
            if emulation_dir is not None
            else ()
        )

    def at_port(self, port: int) -> VsockEndpoint:
        """The same CID, emulation and buffer size, another port."""
        return VsockEndpoint(
            VsockAddress(self.address.cid, port), self.emulation_dir, self.buffer_size
        )

    def _vsock_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_VSOCK, _NONBLOCKING_STREAM)
        if self.buffer_size is not None:
            try:
                # The maximum first: a size above it is silently clamped. Integers only, as
                # CPython passes every AF_VSOCK option as a 64-bit value.
                sock.setsockopt(socket.AF_VSOCK, SO_VM_SOCKETS_BUFFER_MAX_SIZE, self.buffer_size)
                sock.setsockopt(socket.AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, self.buffer_size)
            except BaseException:
                sock.close()
                raise
        return sock

    def __str__(self) -> str:
        return f"vsock {self.address}"

    @property
    def emulated(self) -> bool:
        return self.emulation_dir is not None

    def socket_path(self, cid: int | None = None) -> Path:
        assert self.emulation_dir is not None
        cid = self.address.cid if cid is None else cid
        return self.emulation_dir / f"{cid}_{self.address.port}.sock"

    def listen(self, backlog: int | None = None) -> socket.socket:
        """A bound, listening, non-blocking socket; `BindError` names the address."""
        try:
            if self.emulation_dir is None:
                sock = self._vsock_socket()
                return _listen(sock, (self.address.cid, self.address.port), backlog)
            path = self.socket_path()
            _remove_stale_socket(path)
            return _listen(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), str(path), backlog)
        except OSError as exc:
            where = f" (emulated at {self.socket_path()})" if self.emulated else ""
            raise BindError(
                exc.errno,
                f"Failed to bind listener to vsock {self.address}{where}: {exc.strerror or exc}",
            ) from exc

    def listen_shared(self, backlog: int | None, count: int) -> list[socket.socket]:
        """Listening sockets for `count` worker processes: AF_VSOCK (and the Unix socket
        that emulates it) has no SO_REUSEPORT, so it is one socket, which every worker
        inherits and accepts on (the list holds it `count` times)."""
        return [self.listen(backlog)] * count

    def start_connect(self) -> Connecting:
        """Begin connecting without waiting; `ConnectError` names the address and says what
        the error means for vsock (ECONNRESET: nobody listens, or the backlog is full)."""
        try:
            if self.emulation_dir is not None:
                return self._connect_emulated()
            return _begin(self._vsock_socket(), (self.address.cid, self.address.port))
        except OSError as exc:
            raise self._connect_error(exc) from exc

    async def _connect_once(self) -> socket.socket:
        return await _connect(self, self.start_connect())

    def _connect_error(self, exc: OSError) -> ConnectError:
        meaning = _VSOCK_CONNECT_ERRORS.get(exc.errno or 0, "").format(self)
        why = f"{meaning} ({exc.strerror})" if meaning else (exc.strerror or str(exc))
        error = ConnectError(
            exc.errno, f"failed to connect to vsock endpoint {self.address}: {why}"
        )
        return _retryable(error) if exc.errno == errno.ECONNRESET else error

    def _connect_emulated(self) -> Connecting:
        """Connect as AF_VSOCK would: a listener on VMADDR_CID_ANY takes every CID; no
        listener, or a full backlog, is ECONNRESET at once (never EAGAIN, never a wait)."""
        for path in self._emulated_paths:
            try:
                return _begin(socket.socket(socket.AF_UNIX, _NONBLOCKING_STREAM), path)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:  # the listener's backlog is full
                    raise _reset() from exc
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    raise
        raise _reset()  # nobody listens on either path


async def _connect(endpoint: Endpoint, connecting: Connecting) -> socket.socket:
    """Wait for a connect `endpoint.start_connect()` began; the connected socket."""
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
    errno.ENODEV: "no such CID: nothing at {0.address.cid} is reachable over vsock",
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
                self._literal_infos = socket.getaddrinfo(
                    address.host,
                    address.port,
                    type=socket.SOCK_STREAM,
                    flags=socket.AI_NUMERICHOST,
                )
            except OSError:
                pass  # e.g. an unknown scope id: connect() looks it up and reports it

    def __str__(self) -> str:
        return str(self.address)

    def listen(self, backlog: int | None = None, reuse_port: bool = False) -> socket.socket:
        """A bound, listening, non-blocking socket; `BindError` names the address."""
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                self.address.host,
                self.address.port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_NUMERICHOST | socket.AI_PASSIVE,
            )[0]
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

    async def _connect_once(self) -> socket.socket:
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


def vsock_endpoint(address: VsockAddress, buffer_size: int | None = None) -> VsockEndpoint:
    """A vsock endpoint, emulated when PF_PROXY_VSOCK_DIR is set."""
    return VsockEndpoint(address, emulation_dir_from_env(), buffer_size)
