"""The one engine behind the TCP commands (the five pf-proxy ones and vsock-to-ip-proxy).

`serve()` opens the listener and accepts connections; each is a `Connection`: ask the route
where it goes, connect there, relay (the route's first bytes go first). A failure in one
connection is logged and closes that connection only. On SIGTERM or SIGINT the listener
closes, live connections get `drain_timeout` seconds to finish, the rest are closed, and
`serve()` returns 0.

An upstream connect that fails with an error that may pass (vsock's ECONNRESET: a full
backlog, or no listener yet) is tried again on `endpoints.ConnectRetries`' schedule, by a
timer, until the connect timeout would run out; only the failure that ends it is logged.

A connection is driven by callbacks, not a task: on the common path (a route that answers at
once, a connect that completes at once or in the relay's own epoll set) a task, its timeout
and its futures were a sixth of a short connection's CPU time (benchmarks/cpucost.py). A route
that reads the stream first, or an upstream named by a host name, takes a task for that part.

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
import functools
import inspect
import logging
import select
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pf_proxy import metrics
from pf_proxy.endpoints import (
    ConnectError,
    ConnectRetries,
    Endpoint,
    close_abortively,
    max_backlog,
)
from pf_proxy.runtime import Ready, Stop, connection_limit, open_file_limit
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
from pf_proxy.tcp.relay import Relay, poller, release_poller
from pf_proxy.tcp.routes import DeniedDestination, RequestFailed, Route, Upstream

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
    backlog: int | None = None  # None: the largest the kernel allows (net.core.somaxconn)


# What a route or a connect raises for one connection's own trouble: logged, that one closed.
_ROUTE_ERRORS = (OSError, HeaderError, DeniedDestination, RequestFailed)
# A connect in progress is over (done or failed) when one of these comes.
_CONNECT_OVER = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class Connection:
    """One accepted connection, from routing to its end; `on_end` hears how it ended, once.

    Every socket it owns is closed on every path: the relay closes both of its own, and
    before the relay starts each path closes what it opened (`close_abortively` never raises).
    """

    # One per live connection: slots keep it small (see Relay).
    __slots__ = ("accepted", "connect_seconds", "connecting", "ended", "inbound", "loop",
                 "name", "on_end", "relay", "retries", "route", "settings", "task", "timer",
                 "upstream_name")  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        inbound: socket.socket,
        name: str,
        route: Route,
        settings: Settings,
        on_end: Callable[[Connection, Ended], None],
    ) -> None:
        self.loop = loop  # given: asking for the running loop costs a getpid
        self.inbound = inbound
        self.name = name
        self.route = route
        self.settings = settings
        self.on_end = on_end
        self.accepted = self.loop.time()
        self.connect_seconds: float | None = None
        self.upstream_name = ""
        # One of these at a time: the task routing or connecting; the upstream socket whose
        # connect is in progress, with its timer; the timer of the next try of a connect that
        # failed (`retries`, made at the first failure); the relay.
        self.task: asyncio.Task[None] | None = None
        self.connecting: tuple[Upstream, socket.socket] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.retries: ConnectRetries | None = None
        self.relay: Relay | None = None
        self.ended = False

    def start(self) -> None:
        try:
            found = self.route(self.inbound)
        except _ROUTE_ERRORS as exc:
            self._refused(exc)
            return
        except Exception:
            self._crashed("routing")
            return
        if isinstance(found, Upstream):
            self._connect(found)
        else:
            self._start_task(found)

    def _start_task(self, routing: Upstream | Awaitable[Upstream]) -> None:
        self.task = self.loop.create_task(self._connect_slowly(routing))
        self.task.add_done_callback(functools.partial(self._task_done, routing))

    def _task_done(self, routing: Upstream | Awaitable[Upstream], task: asyncio.Task[None]) -> None:
        """A task cancelled before its first step never ran its handlers: end it here (and
        close the route's coroutine, which nothing awaited)."""
        if task.cancelled() and not self.ended:
            if inspect.iscoroutine(routing):
                routing.close()
            self._closed_at_drain()

    def _connect(self, upstream: Upstream) -> None:
        """Connect without a task: at once, or waiting in the relay's epoll set."""
        try:
            connecting = upstream.endpoint.start_connect()
        except ConnectError as exc:
            self._connect_failed(upstream, exc)
            return
        except OSError as exc:
            self._refused(exc)
            return
        except Exception:
            self._crashed("connecting")
            return
        if connecting is None:  # a host name: resolve it first
            self._start_task(upstream)
        elif connecting.done:
            self._connected(upstream, connecting.sock)
        else:
            self.connecting = upstream, connecting.sock
            try:
                poller(self.loop).watch(connecting.sock.fileno(), self._on_connect_event)
            except OSError as exc:
                self._give_up_connect()
                self._refused(exc)
                return
            timeout = self.settings.connect_timeout
            if timeout is not None:
                remaining = max(0.0, self.accepted + timeout - self.loop.time())
                self.timer = self.loop.call_later(remaining, self._connect_timed_out)

    def _on_connect_event(self, events: int) -> None:
        assert self.connecting is not None
        if not events & _CONNECT_OVER:
            return
        upstream, sock = self.connecting
        try:
            upstream.endpoint.finish_connect(sock)
        except ConnectError as exc:
            self._give_up_connect()
            self._connect_failed(upstream, exc)
            return
        except OSError as exc:
            self._give_up_connect()
            self._refused(exc)
            return
        self.connecting = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._connected(upstream, sock, events)

    def _connect_failed(self, upstream: Upstream, exc: ConnectError) -> None:
        """Try again after a while if the failure may pass and the connect timeout leaves
        room; else the connection ends with the error (saying how often it was retried)."""
        retries = self.retries
        if retries is None:
            retries = self.retries = ConnectRetries(self._deadline())
        now = self.loop.time()
        delay = retries.delay(exc, now)
        if delay is None:
            self._refused(retries.final(exc, now))
        else:
            self.timer = self.loop.call_later(delay, self._retry, upstream)

    def _retry(self, upstream: Upstream) -> None:
        self.timer = None
        self._connect(upstream)

    def _deadline(self) -> float | None:
        timeout = self.settings.connect_timeout
        return None if timeout is None else self.accepted + timeout

    def _connect_timed_out(self) -> None:
        self._give_up_connect()
        self._timed_out()

    def _give_up_connect(self) -> None:
        """Stop waiting for the connect in progress: its timer, its epoll entry, its socket."""
        assert self.connecting is not None
        _, sock = self.connecting
        self.connecting = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        poller(self.loop).forget(sock.fileno())  # before close: the number may be reused
        close_abortively(sock)

    async def _connect_slowly(self, routing: Upstream | Awaitable[Upstream]) -> None:
        """The route and the connect in a task, within the connect timeout."""
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                upstream = routing if isinstance(routing, Upstream) else await routing
                self.retries = ConnectRetries(self._deadline())
                sock = await upstream.endpoint.connect(self.retries)
        except TimeoutError:
            self._timed_out()
        except _ROUTE_ERRORS as exc:
            self._refused(exc)
        except asyncio.CancelledError:
            self._closed_at_drain()
            raise
        except Exception:
            self._crashed("routing")
        else:
            self.task = None
            self._connected(upstream, sock)

    def _connected(
        self, upstream: Upstream, sock: socket.socket, events: int | None = None
    ) -> None:
        """Relay between the two sockets; `events`: the upstream's connect came by the
        relay's epoll set, with these events."""
        self.connect_seconds = self.loop.time() - self.accepted
        self.upstream_name = upstream.name
        settings, a, b, detail = self.settings, self.name, upstream.name, upstream.detail
        try:
            self.relay = Relay(
                self.inbound,
                sock,
                f"{settings.forward} IO copy done, from {a} to {b}{detail}",
                f"{settings.backward} IO copy done, from {b} to {a}{detail}",
                first_bytes=upstream.first_bytes,
                first_bytes_back=upstream.first_bytes_back,
                idle_timeout=settings.idle_timeout,
                loop=self.loop,
                upstream_half_close=upstream.endpoint.half_close,
            )
        except Exception:
            poller(self.loop).forget(sock.fileno())  # watched if its connect was waited for
            close_abortively(sock)
            self._crashed("starting the relay")
            return
        self.relay.start(self._relayed, events)

    def _relayed(self, error: BaseException | None) -> None:
        relay = self.relay
        assert relay is not None
        outcome = COMPLETED
        if isinstance(error, asyncio.CancelledError):
            outcome = CLOSED_AT_DRAIN
        elif error is not None:
            outcome = IDLE_TIMEOUT if isinstance(error, TimeoutError) else RELAY_FAILED
            log.error(
                "Failed to transfer data: error=%s (between %s and %s, %d and %d bytes relayed)",
                error,
                self.name,
                self.upstream_name,
                relay.bytes_forward,
                relay.bytes_backward,
            )
        self._end(Ended(outcome, relay.bytes_forward, relay.bytes_backward, self.connect_seconds))

    def abort(self) -> None:
        """The drain is over: close the connection now, wherever it is."""
        if self.relay is not None:
            self.relay.abort()  # _relayed ends it
        elif self.task is not None:
            self.task.cancel()  # _connect_slowly ends it
        elif self.connecting is not None:
            self._give_up_connect()
            self._closed_at_drain()
        elif self.timer is not None:  # waiting to try the connect again
            self.timer.cancel()
            self.timer = None
            self._closed_at_drain()

    # --- the ends before a relay: the inbound socket is closed here ----------------------

    def _refused(self, exc: BaseException) -> None:
        log.error("Closing connection from %s: %s", self.name, exc)
        close_abortively(self.inbound)
        self._end(Ended(_route_outcome(exc)))

    def _timed_out(self) -> None:
        retried = None if self.retries is None else self.retries.interrupted(self.loop.time())
        log.error(
            "Closing connection from %s: no upstream within %g s (connect timeout)%s",
            self.name,
            self.settings.connect_timeout,
            "" if retried is None else f", after {retried}",
        )
        close_abortively(self.inbound)
        self._end(Ended(CONNECT_TIMEOUT))

    def _closed_at_drain(self) -> None:
        close_abortively(self.inbound)
        self._end(Ended(CLOSED_AT_DRAIN))

    def _crashed(self, doing: str) -> None:
        log.exception("Closing connection from %s: unexpected error while %s", self.name, doing)
        close_abortively(self.inbound)
        self._end(Ended(ROUTE_FAILED))

    def _end(self, ended: Ended) -> None:
        if not self.ended:
            self.ended = True
            if self.retries is not None and self.retries.count:
                ended = dataclasses.replace(ended, connect_retries=self.retries.count)
            self.on_end(self, ended)


class Listener:
    """Accepts on a listening socket and starts a `Connection` for each, up to
    `max_connections` at once."""

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
        self.connections: set[Connection] = set()
        self.overloaded = False  # an overload was logged; cleared when accept() catches up
        self.stats = TcpStats()
        self._all_ended: asyncio.Future[None] | None = None  # set while draining

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            if len(self.connections) >= self.max_connections:
                self._stop_accepting(
                    "connection_limit",
                    f"{len(self.connections)} connections open, the limit "
                    "(it grows with the open file limit, e.g. systemd's LimitNOFILE=)",
                )
                return  # _connection_ended() starts accepting again
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
                        "descriptors", f"{exc}, with {len(self.connections)} connections open"
                    )
                    self.loop.call_later(ACCEPT_BACKOFF, self._resume)
                else:
                    log.error("Failed to accept connection on %s: %s", self.name, exc)
                return
            conn.setblocking(False)
            self.stats.accepted += 1
            connection = Connection(
                self.loop,
                conn,
                _peer_name(peer, self.name),
                self.route,
                self.settings,
                self._connection_ended,
            )
            self.connections.add(connection)
            connection.start()

    def _stop_accepting(self, reason: str, why: str) -> None:
        """Leave new connections in the backlog for now; log (and count) once per overload."""
        if not self.overloaded:
            log.error("Not accepting on %s for now: %s; new connections wait", self.name, why)
            self.overloaded = True
            self.stats.pauses[reason] += 1
        self.loop.remove_reader(self.sock.fileno())

    def _connection_ended(self, connection: Connection, ended: Ended) -> None:
        self.connections.discard(connection)
        self.stats.end(ended)
        if self.overloaded and len(self.connections) < self.max_connections:
            # On the loop's next turn: this may run inside a batch of epoll events, whose
            # later ones must not reach a socket accepted now under a reused descriptor.
            self.loop.call_soon(self._resume)
        if self._all_ended is not None and not self.connections and not self._all_ended.done():
            self._all_ended.set_result(None)

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self._on_readable()  # accept now, or learn that nobody waits any more

    async def close(self, drain_timeout: float) -> None:
        """Stop accepting; give live connections `drain_timeout` seconds, close the rest."""
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        if not self.connections:
            return
        log.info("Draining %d connections for up to %g s", len(self.connections), drain_timeout)
        self._all_ended = self.loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._all_ended), drain_timeout)
        except TimeoutError:
            left = list(self.connections)
            log.warning("Closed %d connections still open after the drain", len(left))
            for connection in left:
                connection.abort()
            if self.connections:  # tasks being cancelled end on the loop's next turns
                await self._all_ended


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
    """One accepted connection through the engine, outside a listener (for tests): route,
    connect, relay; say how it ended. Cancelled, it closes the connection (as at the drain's
    end) and raises CancelledError."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[Ended] = loop.create_future()

    def on_end(_: Connection, ended: Ended) -> None:
        if not result.done():
            result.set_result(ended)

    connection = Connection(loop, inbound, inbound_name, route, settings, on_end)
    connection.start()
    try:
        return await asyncio.shield(result)
    except asyncio.CancelledError:
        connection.abort()
        if not result.done():
            await result  # a task being cancelled ends on the loop's next turns
        raise


def _route_outcome(exc: BaseException) -> str:
    if isinstance(exc, RequestFailed):
        return exc.outcome
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
    listen: Endpoint,
    route: Route,
    settings: Settings,
    sock: socket.socket,
    stop: Stop,
    ready: Ready,
) -> int:
    """Accept on `sock` (listening on `listen`) and route every connection until `stop`; then
    drain. Returns the exit code."""
    loop = asyncio.get_running_loop()
    open_files = open_file_limit()
    limit = connection_limit(open_files, FDS_PER_CONNECTION)
    listener = Listener(sock, str(listen), route, settings, limit)
    unregister = metrics.register(
        tcp_metrics.source(
            listener.stats, lambda: len(listener.connections), lambda: listener.overloaded
        )
    )
    log.info(
        "Accepting up to %d connections at once (open file limit %d, listen backlog %d)",
        listener.max_connections,
        open_files,
        max_backlog() if settings.backlog is None else settings.backlog,
    )
    listener.start()
    log.info("Listening on: %s", listen)
    ready()
    try:
        await stop.wait()
        log.info("Shutting down: no longer accepting on %s", listen)
        stop.draining(f"draining {len(listener.connections)} connections")
        await listener.close(settings.drain_timeout)
    finally:
        unregister()
        release_poller(loop)
    return 0


@dataclass
class Plan:
    """A TCP proxy to run (see :mod:`pf_proxy.runner`): a listener and a route."""

    listen: Endpoint
    make_route: Callable[[], Route]  # called in each process that serves (a worker's own)
    settings: Settings

    def bind(self, count: int) -> list[socket.socket]:
        if count > 1:
            return self.listen.listen_shared(self.settings.backlog, count)
        return [self.listen.listen(self.settings.backlog)]

    async def serve(self, sock: socket.socket | None, stop: Stop, ready: Ready) -> int:
        assert sock is not None, "a TCP proxy's listener is bound before it serves"
        return await serve(self.listen, self.make_route(), self.settings, sock, stop, ready)
