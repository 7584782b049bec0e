"""The raw proxies' two forwarding loops, on the asyncio event loop.

- :class:`QueueToVsock` (``ip-to-vsock-raw-incoming``, ``ip-to-vsock-raw-outgoing``): read
  every packet waiting on an nfqueue, send them all down one long-lived vsock stream in one
  ``sendmsg``, then drop them with one batch verdict. While the vsock peer is slow the queue
  is not read, so the kernel queue fills and drops (as IP allows) instead of our memory
  growing. A broken vsock stream is reconnected, a broken queue reopened; the packets in hand
  are counted as dropped, and a new stream always starts at a packet boundary.
- :class:`VsockToDevice` (``vsock-to-ip-raw-incoming``, ``vsock-to-ip-raw-outgoing``): listen
  on vsock, cut the stream into packets (:mod:`framing`), check each (:mod:`policy`) and send
  the ones that pass through a raw socket bound to a device (:mod:`rawsock`). A malformed
  stream drops that connection; a newer connection replaces the current one (the peer
  reconnected, or the old stream is half-dead), so the link never waits on a stale peer.

Both count what they forward and drop (:class:`Stats`). On SIGTERM, :func:`serve` lets the
packets in hand go out, then ends :meth:`run` and logs the counters.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pf_proxy.endpoints import Endpoint, VsockEndpoint
from pf_proxy.raw.framing import FramingError, Ipv4StreamFramer
from pf_proxy.raw.links import connect_with_backoff, open_with_backoff
from pf_proxy.raw.nfq import NfQueue
from pf_proxy.raw.policy import Drop, DropCounters
from pf_proxy.raw.rawsock import PacketRejected, RawSender
from pf_proxy.runtime import systemd_notify

log = logging.getLogger("pf_proxy")

LINK_BUFFER = 4 << 20
SO_SNDBUFFORCE = 32
IOV_MAX = 1024  # limits.h: most buffers one sendmsg takes
READS_PER_WAKEUP = 16  # vsock reads per readiness callback, so one link cannot starve a loop

# Drop reasons the I/O layer adds to those of policy.Drop.
LINK_DOWN = "vsock-link-down"  # in hand when the vsock stream broke
CUT_BY_DISCONNECT = "cut-by-disconnect"  # a stream ended inside a packet
NOT_WHOLE_IPV4 = "not-whole-ipv4"  # queued but cut by the copy range, or not IPv4
RAW_SOCKET_BROKEN = "raw-socket-broken"  # in hand when the raw socket failed


class Stopped(Exception):
    """Raised inside :meth:`run` instead of taking new packets in hand after a stop."""


class Stats:
    """Packets and bytes forwarded, drops by reason, and streams dropped as malformed."""

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.drops = DropCounters()
        self.malformed_streams = 0

    def format(self) -> str:
        text = f"forwarded {self.packets} packets ({self.bytes} bytes), {self.drops.format()}"
        if self.malformed_streams:
            text += f", {self.malformed_streams} malformed streams dropped"
        return text


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Forwarder:
    """Waiting for sockets, and knowing when no packets are in hand (safe to stop)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stats = Stats()
        self.stopping = False
        self.idle = asyncio.Event()
        self.idle.set()

    @contextmanager
    def _in_hand(self) -> Iterator[None]:
        """Around taking packets and sending them on: a stop waits for the block to end."""
        if self.stopping:
            raise Stopped
        self.idle.clear()
        try:
            yield
        finally:
            self.idle.set()

    async def _readable(self, fd: int) -> None:
        waiter = self.loop.create_future()
        self.loop.add_reader(fd, _wake, waiter)
        try:
            await waiter
        finally:
            self.loop.remove_reader(fd)

    async def _writable(self, fd: int) -> None:
        waiter = self.loop.create_future()
        self.loop.add_writer(fd, _wake, waiter)
        try:
            await waiter
        finally:
            self.loop.remove_writer(fd)


class LinkBroken(Exception):
    def __init__(self, error: OSError, unsent: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.unsent = unsent


class QueueToVsock(_Forwarder):
    """nfqueue `queue_num` -> vsock `endpoint`, verdict DROP for everything read."""

    def __init__(self, queue_num: int, endpoint: VsockEndpoint) -> None:
        super().__init__()
        self.queue_num = queue_num
        self.endpoint = endpoint
        self._queue: NfQueue | None = None
        self._link: socket.socket | None = None

    async def run(self) -> None:
        try:
            await self._forward()
        except Stopped:
            pass
        finally:
            for resource in (self._queue, self._link):
                if resource is not None:
                    resource.close()

    async def _forward(self) -> None:
        announced = False
        while True:
            if self._queue is None:
                self._queue = await open_with_backoff(
                    f"nfqueue {self.queue_num}", lambda: NfQueue.open(self.queue_num)
                )
                log.info("Listening on: nfqueue %d", self.queue_num)
                if not announced:
                    systemd_notify("READY=1")
                    announced = True
            if self._link is None:
                self._link = await connect_with_backoff(self.endpoint)
                self._link.shutdown(socket.SHUT_RD)  # nothing comes back on this stream
                try:
                    self._link.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, LINK_BUFFER)
                except OSError:
                    pass
            queue = self._queue
            await self._readable(queue.fileno())
            with self._in_hand():
                try:
                    packets = queue.read_packets()
                except OSError as exc:
                    self._reopen_queue(exc)
                    continue
                self._count_unusable(queue)
                if packets:
                    try:
                        await self._send(self._link, packets)
                    except LinkBroken as broken:
                        log.error(
                            "Failed to send packets to %s: %s; reconnecting (%d packets dropped)",
                            self.endpoint,
                            broken.error,
                            broken.unsent,
                        )
                        self.stats.drops.add(LINK_DOWN, broken.unsent)
                        self._link.close()
                        self._link = None
                try:
                    queue.drop_read_packets()
                except OSError as exc:
                    self._reopen_queue(exc)

    def _count_unusable(self, queue: NfQueue) -> None:
        if queue.unusable_packets:
            self.stats.drops.add(NOT_WHOLE_IPV4, queue.unusable_packets)
            queue.unusable_packets = 0  # counted here now

    def _reopen_queue(self, exc: OSError) -> None:
        log.error("nfqueue %d failed: %s; reopening it", self.queue_num, exc)
        assert self._queue is not None
        self._queue.close()
        self._queue = None

    async def _send(self, link: socket.socket, packets: list[memoryview]) -> None:
        """Send every packet whole, in order, waiting while the link is full."""
        first = 0  # packets[first] is the first not yet wholly sent
        while first < len(packets):
            try:
                sent = link.sendmsg(packets[first : first + IOV_MAX])
            except BlockingIOError:
                await self._writable(link.fileno())
                continue
            except OSError as exc:
                raise LinkBroken(exc, len(packets) - first) from exc
            while sent:
                size = len(packets[first])
                if sent < size:
                    packets[first] = packets[first][sent:]
                    break
                sent -= size
                self.stats.packets += 1
                self.stats.bytes += size
                first += 1


class VsockToDevice(_Forwarder):
    """vsock `listen` -> packets checked by `check` -> raw socket on `device`."""

    def __init__(
        self,
        listen: Endpoint,
        device: str,
        check: Callable[[memoryview], Drop | None],
    ) -> None:
        super().__init__()
        self.listen = listen
        self.device = device
        self.check = check
        self._sender: RawSender | None = None
        self._reader: asyncio.Task[None] | None = None
        self._rejections_logged: set[int | None] = set()

    async def run(self) -> None:
        listener: socket.socket | None = None
        try:
            self._sender = await self._open_sender()
            listener = await open_with_backoff(f"listener on {self.listen}", self.listen.listen)
            log.info("Listening on: %s", self.listen)
            systemd_notify("READY=1")
            await self._accept_forever(listener)
        except Stopped:
            pass
        finally:
            if listener is not None:
                listener.close()
            if self._reader is not None:
                self._reader.cancel()
                await asyncio.wait([self._reader])
            if self._sender is not None:
                self._sender.close()

    async def _open_sender(self) -> RawSender:
        return await open_with_backoff(
            f"raw socket on device {self.device}", lambda: RawSender(self.device)
        )

    async def _accept_forever(self, listener: socket.socket) -> None:
        while True:
            await self._readable(listener.fileno())
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                log.error("Failed to accept connection on %s: %s", self.listen, exc)
                await asyncio.sleep(0.1)  # out of descriptors: let some go first
                continue
            conn.setblocking(False)
            if self._reader is not None and not self._reader.done():
                log.warning("New connection on %s replaces the current one", self.listen)
                self._reader.cancel()
                await asyncio.wait([self._reader])
            else:
                log.info("Accepted connection on %s", self.listen)
            self._reader = self.loop.create_task(self._read_stream(conn))

    async def _read_stream(self, conn: socket.socket) -> None:
        """Forward the packets of one vsock stream until it ends or proves malformed."""
        framer = Ipv4StreamFramer()
        received = 0
        try:
            try:
                conn.shutdown(socket.SHUT_WR)  # nothing goes back on this stream
            except OSError:
                pass
            while True:
                await self._readable(conn.fileno())
                with self._in_hand():
                    for _ in range(READS_PER_WAKEUP):
                        try:
                            count = conn.recv_into(framer.buffer_for_read())
                        except BlockingIOError:
                            break
                        if count == 0:
                            self._stream_ended(framer.pending, received)
                            return
                        received += count
                        framer.commit(count)
                        for packet in framer.packets():
                            await self._forward(packet)
        except FramingError as exc:
            self.stats.malformed_streams += 1
            log.error(
                "Dropping the connection on %s: malformed packet stream after %d bytes: %s",
                self.listen,
                received - framer.pending,
                exc,
            )
        except OSError as exc:
            log.error("Connection on %s failed: %s", self.listen, exc)
            if framer.pending:
                self.stats.drops.add(CUT_BY_DISCONNECT)
        except Stopped:
            pass
        finally:
            conn.close()

    def _stream_ended(self, pending: int, received: int) -> None:
        if pending:
            self.stats.drops.add(CUT_BY_DISCONNECT)
            log.warning(
                "Connection on %s closed inside a packet (%d bytes of it dropped)",
                self.listen,
                pending,
            )
        else:
            log.info("Connection on %s closed after %d bytes", self.listen, received)

    async def _forward(self, packet: memoryview) -> None:
        reason = self.check(packet)
        if reason is not None:
            self.stats.drops.add(reason)
            return
        while True:
            sender = self._sender
            assert sender is not None
            try:
                if sender.send(packet):
                    self.stats.packets += 1
                    self.stats.bytes += len(packet)
                    return
                await self._writable(sender.fileno())
            except PacketRejected as rejected:
                self._count_rejection(rejected)
                return
            except OSError as exc:
                log.error("Raw socket on device %s failed: %s; reopening it", self.device, exc)
                self.stats.drops.add(RAW_SOCKET_BROKEN)
                sender.close()
                self._sender = await self._open_sender()
                return

    def _count_rejection(self, rejected: PacketRejected) -> None:
        name = errno.errorcode.get(rejected.errno or 0, str(rejected.errno))
        self.stats.drops.add(f"send-{name}")
        if rejected.errno not in self._rejections_logged:
            self._rejections_logged.add(rejected.errno)
            log.warning("%s; dropped (further %s drops are counted, not logged)", rejected, name)


async def serve(
    forwarder: QueueToVsock | VsockToDevice, name: str, stats_interval: float, drain_timeout: float
) -> int:
    """Run `forwarder` until SIGTERM/SIGINT; log its counters periodically and at the end."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    task = loop.create_task(forwarder.run())
    reporter = loop.create_task(_report_periodically(forwarder.stats, name, stats_interval))
    stopper = loop.create_task(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if task.done():
        code = 1
        exc = task.exception()
        log.error("%s stopped unexpectedly: %r", name, exc)
    else:
        log.info("Shutting down")
        systemd_notify("STOPPING=1")
        forwarder.stopping = True
        try:
            await asyncio.wait_for(forwarder.idle.wait(), drain_timeout)
        except TimeoutError:
            log.warning("Packets still in hand after %g s (drain timeout): dropped", drain_timeout)
        task.cancel()
        await asyncio.wait([task])
    for helper in (reporter, stopper):
        helper.cancel()
    log.info("%s: %s", name, forwarder.stats.format())
    return code


async def _report_periodically(stats: Stats, name: str, interval: float) -> None:
    """Log the counters every `interval` seconds when they changed (never when 0)."""
    if interval <= 0:
        return
    last = stats.format()
    while True:
        await asyncio.sleep(interval)
        text = stats.format()
        if text != last:
            log.info("%s: %s", name, text)
            last = text
