"""The one engine behind the five pf-proxy commands.

`serve()` opens the listener, accepts connections and hands each, as its own task, to
`handle_connection()`: ask the route for an upstream, write the route's first bytes, relay.
A failure in one connection is logged and closes that connection only. On SIGTERM or SIGINT
the listener closes, live connections get `drain_timeout` seconds to finish, the rest are
closed, and `serve()` returns 0.

Descriptors: each relayed connection holds two sockets, and a pipe while a direction waits
for a slow reader. So the listener accepts at most `runtime.connection_limit()` connections at
once, computed from the open-file limit; beyond that, new connections wait in the listen backlog
(they are not accepted only to be reset when their upstream socket cannot be opened). Should
accept() still run out of descriptors, the listener pauses briefly instead of spinning. Either
overload is logged once, and once more when the listener has caught up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from pf_proxy import metrics, runtime, workers
from pf_proxy.endpoints import BindError, ConnectError, Endpoint, IpAddress, close_abortively
from pf_proxy.runtime import connection_limit, draining, open_file_limit, ready
from pf_proxy.tcp import metrics as tcp_metrics
from pf_proxy.tcp.dstheader import HeaderError
from pf_proxy.tcp.metrics import (
    BAD_HEADER,
    CLOSED_AT_DRAIN,
    COMPLETED,
    CONNECT_TIMEOUT,
    DENIED,
    IDLE_TIMEOUT,
    NO_ORIGINAL_DESTINATION,
    RELAY_FAILED,
    ROUTE_FAILED,
    UPSTREAM_CONNECT_FAILED,
    Ended,
    TcpStats,
)
from pf_proxy.tcp.origdst import OriginalDestinationError
from pf_proxy.tcp.relay import Relay
from pf_proxy.tcp.routes import DeniedDestination, Route

log = logging.getLogger("pf_proxy")

# accept() failures that mean "out of resources": pause accepting instead of spinning.
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_BACKOFF = 0.1
ACCEPTS_PER_WAKEUP = 64
# Descriptors per connection: its two sockets. A pipe is borrowed only while a direction
# holds bytes, and when none can be had the relay copies through user space instead, so
# pipes do not count: 5,000 idle connections fit in 20,000 descriptors with room to spare.
FDS_PER_CONNECTION = 2


@dataclass(frozen=True)
class Settings:
    forward: str  # direction names for the copy-done lines, e.g. "vsock to ip"
    backward: str
    connect_timeout: float | None = 10.0
    idle_timeout: float | None = None
    drain_timeout: float = 5.0
    backlog: int = 1024


class Listener:
    """Accepts on a listening socket and starts a task per connection, up to `max_connections`."""

    def __init__(
        self,
        sock: socket.socket,
        name: str,
        route: Route,
        settings: Settings,
        max_connections: int,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.name = name
        self.route = route
        self.settings = settings
        self.max_connections = max_connections
        self.tasks: set[asyncio.Task[Ended]] = set()
        self.overloaded = False  # an overload was logged; cleared when accept() catches up
        self.stats = TcpStats()

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            if len(self.tasks) >= self.max_connections:
                self._stop_accepting(
                    "connection_limit",
                    f"{len(self.tasks)} connections open, the limit "
                    "(it grows with the open file limit, e.g. systemd's LimitNOFILE=)",
                )
                return  # _connection_closed() starts accepting again
            try:
                conn, peer = self.sock.accept()
            except BlockingIOError:
                if self.overloaded:
                    log.info("Accepting on %s again: no connection waiting", self.name)
                    self.overloaded = False
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self._stop_accepting(
                        "descriptors", f"{exc}, with {len(self.tasks)} connections open"
                    )
                    self.loop.call_later(ACCEPT_BACKOFF, self._resume)
                else:
                    log.error("Failed to accept connection on %s: %s", self.name, exc)
                return
            conn.setblocking(False)
            self.stats.accepted += 1
            task = self.loop.create_task(
                handle_connection(conn, _peer_name(peer, self.name), self.route, self.settings)
            )
            self.tasks.add(task)
            task.add_done_callback(self._connection_closed)

    def _stop_accepting(self, reason: str, why: str) -> None:
        """Leave new connections in the backlog for now; log (and count) once per overload."""
        if not self.overloaded:
            log.error("Not accepting on %s for now: %s; new connections wait", self.name, why)
            self.overloaded = True
            self.stats.pauses[reason] += 1
        self.loop.remove_reader(self.sock.fileno())

    def _connection_closed(self, task: asyncio.Task[Ended]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            self.stats.end(Ended(CLOSED_AT_DRAIN))
        elif task.exception() is None:
            self.stats.end(task.result())
        if self.overloaded and len(self.tasks) < self.max_connections:
            self._resume()

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self._on_readable()  # accept now, or learn that nobody waits any more

    async def close(self, drain_timeout: float) -> None:
        """Stop accepting; give live connections `drain_timeout` seconds, cancel the rest."""
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        if self.tasks:
            log.info("Draining %d connections for up to %g s", len(self.tasks), drain_timeout)
            _, pending = await asyncio.wait(set(self.tasks), timeout=drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("Closed %d connections still open after the drain", len(pending))
                await asyncio.wait(pending)


def _peer_name(peer: object, listener_name: str) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2 and isinstance(peer[0], str):
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(peer, tuple) and len(peer) == 2:  # AF_VSOCK (cid, port)
        return f"vsock {peer[0]}:{peer[1]}"
    return listener_name  # emulated vsock: the peer has no address of its own


async def handle_connection(
    inbound: socket.socket, inbound_name: str, route: Route, settings: Settings
) -> Ended:
    """Route one accepted connection and relay it; log and close it on any failure; say how
    it ended.

    Whatever happens (a route or relay failure, a cancel at the drain), every socket the
    connection owns is closed: `close_abortively` and `Relay.run`'s own cleanup never raise.
    """
    loop = asyncio.get_running_loop()
    accepted = loop.time()
    try:
        async with asyncio.timeout(settings.connect_timeout):
            upstream = await route(inbound)
    except TimeoutError:
        log.error(
            "Closing connection from %s: no upstream within %g s (connect timeout)",
            inbound_name,
            settings.connect_timeout,
        )
        close_abortively(inbound)
        return Ended(CONNECT_TIMEOUT)
    except (OSError, HeaderError, DeniedDestination) as exc:
        log.error("Closing connection from %s: %s", inbound_name, exc)
        close_abortively(inbound)
        return Ended(_route_outcome(exc))
    except BaseException:
        close_abortively(inbound)
        raise
    connect_seconds = loop.time() - accepted

    try:
        if upstream.first_bytes:
            await loop.sock_sendall(upstream.sock, upstream.first_bytes)
    except BaseException as exc:
        close_abortively(inbound)
        close_abortively(upstream.sock)
        if not isinstance(exc, OSError):
            raise
        log.error("Failed to transfer data: error=%s (to %s)", exc, upstream.name)
        return Ended(RELAY_FAILED, connect_seconds=connect_seconds)

    a, b, detail = inbound_name, upstream.name, upstream.detail
    try:
        relay = Relay(
            inbound,
            upstream.sock,
            f"{settings.forward} IO copy done, from {a} to {b}{detail}",
            f"{settings.backward} IO copy done, from {b} to {a}{detail}",
            idle_timeout=settings.idle_timeout,
            loop=loop,
        )
    except BaseException:
        close_abortively(inbound)
        close_abortively(upstream.sock)
        raise
    outcome = COMPLETED
    try:
        await relay.run()  # closes both sockets, whatever happens
    except (OSError, TimeoutError) as exc:
        outcome = IDLE_TIMEOUT if isinstance(exc, TimeoutError) else RELAY_FAILED
        log.error(
            "Failed to transfer data: error=%s (between %s and %s, %d and %d bytes relayed)",
            exc,
            a,
            b,
            relay.bytes_forward,
            relay.bytes_backward,
        )
    return Ended(outcome, relay.bytes_forward, relay.bytes_backward, connect_seconds)


def _route_outcome(exc: BaseException) -> str:
    if isinstance(exc, ConnectError):
        return UPSTREAM_CONNECT_FAILED
    if isinstance(exc, OriginalDestinationError):
        return NO_ORIGINAL_DESTINATION
    if isinstance(exc, HeaderError):
        return BAD_HEADER
    if isinstance(exc, DeniedDestination):
        return DENIED
    return ROUTE_FAILED


async def serve(
    listen: Endpoint, route: Route, settings: Settings, sock: socket.socket | None = None
) -> int:
    """Listen on `listen` (on `sock`, if it listens there already) and route every connection
    until SIGTERM/SIGINT; return the exit code."""
    if sock is None:
        try:
            sock = listen.listen(settings.backlog)
        except BindError as exc:
            log.error("%s", exc)
            return 1
    loop = asyncio.get_running_loop()
    open_files = open_file_limit()
    limit = connection_limit(open_files, FDS_PER_CONNECTION)
    listener = Listener(sock, str(listen), route, settings, limit)
    metrics.register(
        tcp_metrics.source(listener.stats, lambda: len(listener.tasks), lambda: listener.overloaded)
    )
    log.info(
        "Accepting up to %d connections at once (open file limit %d)",
        listener.max_connections,
        open_files,
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    listener.start()
    log.info("Listening on: %s", listen)
    ready()
    await stop.wait()
    log.info("Shutting down: no longer accepting on %s", listen)
    draining(f"SIGTERM or SIGINT received: draining {len(listener.tasks)} connections")
    await listener.close(settings.drain_timeout)
    return 0


def serve_in_workers(
    listen: Endpoint,
    make_route: Callable[[], Route],
    settings: Settings,
    metrics_address: IpAddress | None,
    count: int,
) -> int:
    """`serve` in `count` processes (:mod:`pf_proxy.workers`), each with a route of its own
    and, with `metrics_address`, /metrics on that port plus its number less one; return the
    exit code. Every address is bound here, before the workers start: a port in use is exit
    1 at once."""
    bound: list[socket.socket] = []
    metrics_at: list[tuple[IpAddress | None, socket.socket | None]] = [(None, None)] * count
    try:
        listening = listen.listen_shared(settings.backlog, count)
        bound += listening
        if metrics_address is not None:
            for index in range(count):
                address = worker_metrics_address(metrics_address, index)
                metrics_socket = metrics.bind(address)
                bound.append(metrics_socket)
                metrics_at[index] = (address, metrics_socket)
    except (BindError, ValueError) as exc:
        log.error("%s", exc)
        for sock in bound:
            sock.close()
        return 1
    log.info("Serving %s with %d worker processes", listen, count)

    def work(number: int) -> int:
        index = number - 1
        address, metrics_socket = metrics_at[index]
        for sock in bound:  # the other workers' sockets are theirs
            if sock is not listening[index] and sock is not metrics_socket:
                sock.close()

        async def main() -> int:
            return await serve(listen, make_route(), settings, listening[index])

        return runtime.run(main(), address, metrics_socket)

    def stop_listening() -> None:
        for sock in bound:
            sock.close()

    return workers.Supervisor(count, work, stop_listening).run()


def worker_metrics_address(first: IpAddress, index: int) -> IpAddress:
    """Worker `index` (from 0) serves /metrics on the port `index` above `first`'s."""
    port = first.port + index
    if port > 0xFFFF:
        raise ValueError(f"--metrics {first}: worker {index + 1} would need port {port}")
    return dataclasses.replace(first, port=port)
