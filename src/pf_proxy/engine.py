"""The one engine behind the five pf-proxy commands.

`serve()` opens the listener, accepts connections and hands each, as its own task, to
`handle_connection()`: ask the route for an upstream, write the route's first bytes, relay.
A failure in one connection is logged and closes that connection only. On SIGTERM or SIGINT
the listener closes, live connections get `drain_timeout` seconds to finish, the rest are
closed, and `serve()` returns 0.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from dataclasses import dataclass

from pf_proxy.dstheader import HeaderError
from pf_proxy.endpoints import BindError, ConnectError, Endpoint
from pf_proxy.origdst import OriginalDestinationError
from pf_proxy.relay import Relay, _set_reset_on_close
from pf_proxy.routes import DeniedDestination, Route
from pf_proxy.runtime import systemd_notify

log = logging.getLogger("pf_proxy")

# accept() failures that mean "out of resources": pause accepting instead of spinning.
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_BACKOFF = 0.1
ACCEPTS_PER_WAKEUP = 64


@dataclass(frozen=True)
class Settings:
    forward: str  # direction names for the copy-done lines, e.g. "vsock to ip"
    backward: str
    connect_timeout: float | None = 10.0
    idle_timeout: float | None = None
    drain_timeout: float = 5.0
    backlog: int = 1024


class Listener:
    """Accepts on a listening socket and starts a task per connection."""

    def __init__(self, sock: socket.socket, name: str, route: Route, settings: Settings) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.name = name
        self.route = route
        self.settings = settings
        self.tasks: set[asyncio.Task[None]] = set()
        self.paused = False

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, peer = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self._pause(exc)
                else:
                    log.error("Failed to accept connection on %s: %s", self.name, exc)
                return
            self.paused = False  # the next resource error is a new episode, logged again
            conn.setblocking(False)
            task = self.loop.create_task(
                handle_connection(conn, _peer_name(peer, self.name), self.route, self.settings)
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _pause(self, exc: OSError) -> None:
        """Out of descriptors: stop accepting for a moment; log once per episode."""
        if not self.paused:
            log.error(
                "Failed to accept connection on %s: %s; pausing accepts while %d connections "
                "are open",
                self.name,
                exc,
                len(self.tasks),
            )
        self.paused = True
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(ACCEPT_BACKOFF, self._resume)

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

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
) -> None:
    """Route one accepted connection and relay it; log and close it on any failure."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(settings.connect_timeout):
            upstream = await route(inbound)
    except TimeoutError:
        log.error(
            "Closing connection from %s: no upstream within %g s (connect timeout)",
            inbound_name,
            settings.connect_timeout,
        )
        _close(inbound, reset=True)
        return
    except (ConnectError, OriginalDestinationError, HeaderError, DeniedDestination) as exc:
        log.error("Closing connection from %s: %s", inbound_name, exc)
        _close(inbound, reset=True)
        return
    except OSError as exc:
        log.error("Closing connection from %s: %s", inbound_name, exc)
        _close(inbound, reset=True)
        return
    except BaseException:
        _close(inbound, reset=True)
        raise

    try:
        if upstream.first_bytes:
            await loop.sock_sendall(upstream.sock, upstream.first_bytes)
    except OSError as exc:
        log.error("Failed to transfer data: error=%s (to %s)", exc, upstream.name)
        _close(inbound, reset=True)
        _close(upstream.sock, reset=True)
        return
    except BaseException:
        _close(inbound, reset=True)
        _close(upstream.sock, reset=True)
        raise

    a, b, detail = inbound_name, upstream.name, upstream.detail
    relay = Relay(
        inbound,
        upstream.sock,
        f"{settings.forward} IO copy done, from {a} to {b}{detail}",
        f"{settings.backward} IO copy done, from {b} to {a}{detail}",
        idle_timeout=settings.idle_timeout,
    )
    try:
        await relay.run()
    except (OSError, TimeoutError) as exc:
        log.error(
            "Failed to transfer data: error=%s (between %s and %s, %d and %d bytes relayed)",
            exc,
            a,
            b,
            relay.bytes_forward,
            relay.bytes_backward,
        )


def _close(sock: socket.socket, *, reset: bool) -> None:
    if reset:
        _set_reset_on_close(sock)
    sock.close()


async def serve(listen: Endpoint, route: Route, settings: Settings) -> int:
    """Listen on `listen` and route every connection until SIGTERM/SIGINT; return the exit code."""
    try:
        sock = listen.listen(settings.backlog)
    except BindError as exc:
        log.error("%s", exc)
        return 1
    loop = asyncio.get_running_loop()
    listener = Listener(sock, str(listen), route, settings)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    listener.start()
    log.info("Listening on: %s", listen)
    systemd_notify("READY=1")
    await stop.wait()
    log.info("Shutting down: no longer accepting on %s", listen)
    systemd_notify("STOPPING=1")
    await listener.close(settings.drain_timeout)
    return 0
