"""The engines of `udp-to-vsock` and `vsock-to-udp`: open the listener, give each client flow
its vsock stream (:mod:`flows`), serve until SIGTERM/SIGINT, then drain.

- `UdpToVsock`: one UDP socket receives every client's datagrams; a datagram from a new source
  address and port opens a flow and connects its vsock stream (a task per new flow, nothing
  per datagram); datagrams coming back on the stream are sent to that client from the
  listening socket.
- `VsockToUdp`: each accepted vsock stream is a flow with a UDP socket connected to the
  upstream. A literal upstream address is resolved once; a host name for every new stream,
  trying each address it resolves to in turn (IPv4 and IPv6).

The number of flows is capped from the open-file limit (`runtime.connection_limit`, with
one descriptor per udp-to-vsock flow and two per vsock-to-udp flow); at the cap the flow idle
the longest makes room. On SIGTERM or SIGINT no new flow is opened (vsock-to-udp closes its
listener), open flows get `drain_timeout` seconds to end, the rest are closed, and the counters
are logged.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass
from typing import Any

from pf_proxy import metrics
from pf_proxy.endpoints import ConnectRetries, IpAddress, VsockEndpoint
from pf_proxy.runtime import Ready, Stop, connection_limit, open_file_limit
from pf_proxy.udp import metrics as udp_metrics
from pf_proxy.udp.flows import (
    DATAGRAM_SPACE,
    DATAGRAMS_PER_WAKEUP,
    ClientFlow,
    FlowTable,
    UpstreamFlow,
    frame_in_place,
    log_counters,
    report_periodically,
)
from pf_proxy.udp.sockets import AddressInfo, UdpTarget, bind_udp, ip_name

log = logging.getLogger("pf_proxy")

FDS_PER_CLIENT_FLOW = 1  # udp-to-vsock: the flow's vsock stream
FDS_PER_UPSTREAM_FLOW = 2  # vsock-to-udp: the vsock stream and the UDP socket
ACCEPTS_PER_WAKEUP = 64
ACCEPT_BACKOFF = 0.1
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(frozen=True)
class Settings:
    connect_timeout: float = 10.0
    idle_timeout: float = 30.0  # 0: flows end only at the cap, on a failure or at the peer's close
    drain_timeout: float = 5.0
    stats_interval: float = 60.0
    backlog: int | None = None  # vsock-to-udp's listener; None: net.core.somaxconn


def _flow_limit(fds_per_flow: int) -> tuple[int, int]:
    """(the most flows open at once, the open-file limit it comes from)."""
    open_files = open_file_limit()
    return connection_limit(open_files, fds_per_flow), open_files


class UdpToVsock:
    """Every client's datagrams on one UDP socket; a flow, with its vsock stream, per client."""

    def __init__(
        self,
        sock: socket.socket,
        name: str,
        upstream: VsockEndpoint,
        table: FlowTable,
        connect_timeout: float,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.name = name
        self.upstream = upstream
        self.table = table
        self.connect_timeout = connect_timeout
        self.accepting = True
        self.refused_while_draining = 0
        table.reopen = self._reopen

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        sock, table = self.sock, self.table
        flows: dict[Any, ClientFlow] = table.flows  # type: ignore[assignment]  # all ClientFlows
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                size, client = sock.recvfrom_into(DATAGRAM_SPACE)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("Failed to receive on %s: %s", self.name, exc)
                return
            flow = flows.get(client)
            if flow is None:
                if not self.accepting:
                    self.refused_while_draining += 1
                    continue
                flow = self._open_flow(client)
            else:
                table.touch(flow)
            frame = frame_in_place(size)
            flow.remember(frame)
            flow.send_frame(frame)

    def _open_flow(self, client: Any) -> ClientFlow:
        flow = ClientFlow(self.table, client, ip_name(client), self.sock)
        self.table.add(flow)
        flow.connecting = self.loop.create_task(self._connect(flow))
        return flow

    def _reopen(self, client: Any, frames: bytes) -> None:
        """A new flow for `client`, its first frames `frames` (see `ClientFlow`)."""
        if self.accepting:
            self._open_flow(client).send_frame(memoryview(frames))

    async def _connect(self, flow: ClientFlow) -> None:
        # A refused connect (a full backlog, no listener yet) is tried again until just
        # before the connect timeout; the timeout itself bounds a connect that hangs.
        retries = ConnectRetries(self.loop.time() + self.connect_timeout)
        try:
            async with asyncio.timeout(self.connect_timeout):
                stream = await self.upstream.connect(retries)
        except TimeoutError:
            flow.connecting = None
            flow.fail(
                f"no vsock connection to {self.upstream.address} within "
                f"{self.connect_timeout:g} s (connect timeout)"
            )
            return
        except OSError as exc:
            flow.connecting = None
            flow.fail(str(exc))  # names the vsock address and what the error means there
            return
        finally:
            self.table.counters.connect_retries += retries.count
        flow.connecting = None
        if flow.closed:  # idle or evicted while connecting (the task was cancelled too late)
            stream.close()
            return
        flow.attach_stream(stream)

    def stop_accepting(self) -> None:
        self.accepting = False

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.sock.fileno())
        finally:
            self.sock.close()


class VsockToUdp:
    """Accepts vsock streams; each is a flow with a UDP socket connected to the upstream."""

    def __init__(
        self,
        sock: socket.socket,
        name: str,
        target: UdpTarget,
        table: FlowTable,
        connect_timeout: float,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.name = name
        self.target = target
        self.table = table
        self.connect_timeout = connect_timeout
        self._keys = 0
        self._paused = False

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._on_acceptable)

    def _on_acceptable(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                stream, peer = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            stream.setblocking(False)
            self._keys += 1
            flow = UpstreamFlow(self.table, self._keys, self._peer_name(peer), stream)
            self.table.add(flow)
            infos = self.target.literal_infos
            if infos is not None:
                self._open_upstream(flow, infos)
            else:
                flow.resolving = self.loop.create_task(self._resolve_and_open(flow))

    def _peer_name(self, peer: Any) -> str:
        if isinstance(peer, tuple) and len(peer) == 2:  # AF_VSOCK (cid, port)
            return f"vsock {peer[0]}:{peer[1]}"
        return self.name  # emulated vsock: the peer has no address of its own

    def _accept_failed(self, exc: OSError) -> None:
        if exc.errno not in _RESOURCE_ERRORS:
            log.error("Failed to accept a stream on %s: %s", self.name, exc)
            return
        if not self._paused:
            log.error(
                "Not accepting on %s for %g s: %s, with %d flows open",
                self.name, ACCEPT_BACKOFF, exc, len(self.table),
            )  # fmt: skip
            self._paused = True
            self.loop.remove_reader(self.sock.fileno())
            self.loop.call_later(ACCEPT_BACKOFF, self._resume)

    def _resume(self) -> None:
        self._paused = False
        if self.sock.fileno() >= 0:
            self.start()

    async def _resolve_and_open(self, flow: UpstreamFlow) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                infos = await self.target.resolve()
        except TimeoutError:
            flow.resolving = None
            flow.fail(
                f"{self.target} not resolved within {self.connect_timeout:g} s (connect timeout)"
            )
            return
        except OSError as exc:
            flow.resolving = None
            flow.fail(f"failed to resolve {self.target}: {exc}")
            return
        flow.resolving = None
        if not flow.closed:
            self._open_upstream(flow, infos)

    def _open_upstream(self, flow: UpstreamFlow, infos: list[AddressInfo]) -> None:
        try:
            udp, name, untried = self.target.connect(infos)
        except OSError as exc:
            flow.fail(f"failed to connect to UDP endpoint {self.target}: {exc.strerror or exc}")
            return
        flow.attach_upstream(udp, name, self.target, untried)

    def stop_accepting(self) -> None:
        self.close()

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            try:
                self.loop.remove_reader(self.sock.fileno())
            finally:
                self.sock.close()


async def _serve(
    plane: UdpToVsock | VsockToUdp,
    table: FlowTable,
    target: str,
    settings: Settings,
    stop: Stop,
    ready: Ready,
) -> int:
    """Serve until `stop`; drain; log the counters; return the exit code 0."""
    loop = asyncio.get_running_loop()
    unregister = metrics.register(udp_metrics.source(table))
    plane.start()
    log.info("Listening on: %s", plane.name)
    log.info("Proxying to: %s", target)
    ready()
    reporter = loop.create_task(report_periodically(table, settings.stats_interval))
    try:
        await stop.wait()
        log.info("Shutting down: no new flows on %s", plane.name)
        stop.draining(f"draining {len(table)} flows")
        plane.stop_accepting()
        await table.drain(settings.drain_timeout)
    finally:
        reporter.cancel()
        table.close_all()
        plane.close()
        unregister()
    if isinstance(plane, UdpToVsock) and plane.refused_while_draining:
        log.info(
            "%d datagrams from new clients were not answered during the drain",
            plane.refused_while_draining,
        )
    log_counters(table)
    return 0


def _log_limit(limit: int, open_files: int) -> None:
    log.info("Serving up to %d flows at once (open file limit %d)", limit, open_files)


async def serve_udp_to_vsock(
    sock: socket.socket,
    listen: IpAddress,
    upstream: VsockEndpoint,
    settings: Settings,
    stop: Stop,
    ready: Ready,
) -> int:
    """udp-to-vsock on `sock` (bound to `listen`, see `sockets.bind_udp`): the exit code."""
    limit, open_files = _flow_limit(FDS_PER_CLIENT_FLOW)
    _log_limit(limit, open_files)
    table = FlowTable(limit, settings.idle_timeout, str(upstream), "udp-to-vsock")
    plane = UdpToVsock(sock, f"udp {listen}", upstream, table, settings.connect_timeout)
    return await _serve(plane, table, str(upstream), settings, stop, ready)


async def serve_vsock_to_udp(
    sock: socket.socket,
    listen: VsockEndpoint,
    upstream: IpAddress,
    settings: Settings,
    stop: Stop,
    ready: Ready,
) -> int:
    """vsock-to-udp on `sock` (listening on `listen`): the exit code."""
    limit, open_files = _flow_limit(FDS_PER_UPSTREAM_FLOW)
    _log_limit(limit, open_files)
    table = FlowTable(limit, settings.idle_timeout, "the vsock stream", "vsock-to-udp")
    target = UdpTarget(upstream)
    plane = VsockToUdp(sock, str(listen), target, table, settings.connect_timeout)
    return await _serve(plane, table, f"udp {upstream}", settings, stop, ready)


@dataclass
class UdpToVsockPlan:
    """udp-to-vsock to run (see :mod:`pf_proxy.runner`)."""

    listen: IpAddress
    upstream: VsockEndpoint
    settings: Settings

    def bind(self, count: int) -> list[socket.socket]:
        return [bind_udp(self.listen)]

    async def serve(self, sock: socket.socket | None, stop: Stop, ready: Ready) -> int:
        assert sock is not None
        return await serve_udp_to_vsock(
            sock, self.listen, self.upstream, self.settings, stop, ready
        )


@dataclass
class VsockToUdpPlan:
    """vsock-to-udp to run (see :mod:`pf_proxy.runner`)."""

    listen: VsockEndpoint
    upstream: IpAddress
    settings: Settings

    def bind(self, count: int) -> list[socket.socket]:
        return [self.listen.listen(self.settings.backlog)]

    async def serve(self, sock: socket.socket | None, stop: Stop, ready: Ready) -> int:
        assert sock is not None
        return await serve_vsock_to_udp(
            sock, self.listen, self.upstream, self.settings, stop, ready
        )
