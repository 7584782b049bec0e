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
import socket
from collections.abc import Callable, Iterator

from pf_proxy.endpoints import Endpoint, VsockEndpoint
from pf_proxy.raw.framing import FramingError, Ipv4StreamFramer
from pf_proxy.raw.links import connect_with_backoff, open_with_backoff
from pf_proxy.raw.nfq import NfQueue
from pf_proxy.raw.policy import Drop, DropCounters
from pf_proxy.raw.rawsock import SEND_BATCH, PacketRejected, RawSender
from pf_proxy.runtime import Ready, Stop

log = logging.getLogger("pf_proxy")

LINK_BUFFER = 4 << 20  # the vsock link's send buffer: room for a burst of jumbo packets
SO_SNDBUFFORCE = 32  # asm-generic/socket.h: SO_SNDBUF beyond wmem_max (CAP_NET_ADMIN)
IOV_MAX = 1024  # limits.h: most buffers one sendmsg takes
READS_PER_WAKEUP = 16  # vsock reads per readiness callback, so one link cannot starve a loop
READ_SIZE = 1 << 16  # least free space one vsock read offers (the framer holds 64 KiB + 2 reads)

# Drop reasons the I/O layer adds to those of policy.Drop.
LINK_DOWN = "vsock-link-down"  # in hand when the vsock stream broke
CUT_BY_DISCONNECT = "cut-by-disconnect"  # a stream ended inside a packet
NOT_WHOLE_IPV4 = "not-whole-ipv4"  # queued but cut by the copy range, or not IPv4
RAW_SOCKET_BROKEN = "raw-socket-broken"  # in hand when the raw socket failed


class Stats:
    """Packets and bytes forwarded, drops by reason, streams dropped as malformed, and how
    often the vsock link was (re)established."""

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.drops = DropCounters()
        self.malformed_streams = 0
        self.link_connects = 0

    def format(self) -> str:
        text = f"forwarded {self.packets} packets ({self.bytes} bytes), {self.drops.format()}"
        if self.malformed_streams:
            text += f", {self.malformed_streams} malformed streams dropped"
        return text


class _Forwarder:
    """What both forwarders share: counters, and the state a stop looks at.

    The hot path runs in the event loop's readiness callbacks (no task switch per batch);
    :meth:`run` is a supervisor that opens what is needed, then waits on :attr:`_trouble`
    for a callback to report something broken, and reopens it.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stats = Stats()
        self.stopping = False
        """Set by :func:`serve`: take no new packets in hand."""
        self.idle = asyncio.Event()
        """Set while no packets are in hand (waiting for a full socket to drain)."""
        self.idle.set()
        self._trouble: asyncio.Future[str] = self.loop.create_future()

    @property
    def link_up(self) -> bool:
        """Whether the vsock link is established now."""
        raise NotImplementedError

    def _report_trouble(self, what: str) -> None:
        if not self._trouble.done():
            self._trouble.set_result(what)

    async def _wait_for_trouble(self) -> str:
        try:
            return await self._trouble
        finally:
            self._trouble = self.loop.create_future()


class QueueToVsock(_Forwarder):
    """nfqueue `queue_num` -> vsock `endpoint`, verdict DROP for everything read."""

    def __init__(
        self, queue_num: int, endpoint: VsockEndpoint, ready: Ready = lambda: None
    ) -> None:
        super().__init__()
        self.ready = ready  # called once the queue is open
        self.queue_num = queue_num
        self.endpoint = endpoint
        self._queue: NfQueue | None = None
        self._link: socket.socket | None = None
        self._pending: list[memoryview] = []  # read, not yet wholly sent; views of the queue
        self._first = 0  # self._pending[self._first] is the first not yet wholly sent

    async def run(self) -> None:
        announced = False
        try:
            while True:
                if self._queue is None:
                    self._queue = await open_with_backoff(
                        f"nfqueue {self.queue_num}", lambda: NfQueue.open(self.queue_num)
                    )
                    log.info("Listening on: nfqueue %d", self.queue_num)
                    if not announced:
                        self.ready()
                        announced = True
                if self._link is None:
                    self._link = await connect_with_backoff(self.endpoint)
                    self.stats.link_connects += 1
                    if self.endpoint.half_close:  # on hybrid vsock it would end the stream
                        self._link.shutdown(socket.SHUT_RD)  # nothing comes back on it
                    try:
                        self._link.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, LINK_BUFFER)
                    except OSError:
                        pass  # not root, or not a socket type that has it: the default works
                self.loop.add_reader(self._queue.fileno(), self._on_queue_readable)
                try:
                    await self._wait_for_trouble()
                finally:
                    self._stop_watching()
        finally:
            for resource in (self._queue, self._link):
                if resource is not None:
                    resource.close()

    @property
    def link_up(self) -> bool:
        return self._link is not None

    def _stop_watching(self) -> None:
        if self._queue is not None:
            self.loop.remove_reader(self._queue.fileno())
        if self._link is not None:
            self.loop.remove_writer(self._link.fileno())

    def _on_queue_readable(self) -> None:
        queue = self._queue
        assert queue is not None
        if self.stopping:
            self.loop.remove_reader(queue.fileno())
            return
        for _ in range(READS_PER_WAKEUP):  # a full batch: more may wait, read on at once
            try:
                packets = queue.read_packets()
            except OSError as exc:
                self._queue_failed(exc)
                return
            if queue.unusable_packets:
                self.stats.drops.add(NOT_WHOLE_IPV4, queue.unusable_packets)
                queue.unusable_packets = 0  # counted here now
            self._pending, self._first = packets, 0
            flushed = self._flush()
            if flushed is False:  # the link is full: stop reading until it drains
                assert self._link is not None
                self.loop.remove_reader(queue.fileno())
                self.loop.add_writer(self._link.fileno(), self._on_link_writable)
                return
            if flushed is None or self._queue is not queue or len(packets) < queue.batch:
                return

    def _on_link_writable(self) -> None:
        if self._flush() is True:
            assert self._link is not None and self._queue is not None
            self.loop.remove_writer(self._link.fileno())
            self.loop.add_reader(self._queue.fileno(), self._on_queue_readable)

    def _flush(self) -> bool | None:
        """Send the packets in hand, then drop them all with one verdict.

        True when done, False when the link is full (call again once it is writable), None
        when something broke (reported to :meth:`run`).
        """
        link, pending = self._link, self._pending
        assert link is not None
        while self._first < len(pending):
            self.idle.clear()
            batch = pending[self._first : self._first + IOV_MAX]
            try:
                sent = link.sendmsg(batch)
            except BlockingIOError:
                return False
            except OSError as exc:
                self._link_failed(exc)
                return None
            if sent == sum(map(len, batch)):  # the usual case: count the batch at once
                self.stats.packets += len(batch)
                self.stats.bytes += sent
                self._first += len(batch)
                continue
            while sent:
                size = len(pending[self._first])
                if sent < size:
                    pending[self._first] = pending[self._first][sent:]
                    break
                sent -= size
                self.stats.packets += 1
                self.stats.bytes += size
                self._first += 1
        self._release()
        return True

    def _release(self) -> None:
        """Verdict DROP for everything read; nothing is in hand afterwards."""
        self._pending, self._first = [], 0
        self.idle.set()
        if self._queue is not None:
            try:
                self._queue.drop_read_packets()
            except OSError as exc:
                self._queue_failed(exc)

    def _link_failed(self, exc: OSError) -> None:
        unsent = len(self._pending) - self._first
        log.error(
            "Failed to send packets to %s: %s; reconnecting (%d packets dropped)",
            self.endpoint,
            exc,
            unsent,
        )
        self.stats.drops.add(LINK_DOWN, unsent)
        self._stop_watching()
        assert self._link is not None
        self._link.close()
        self._link = None
        self._release()
        self._report_trouble("link")

    def _queue_failed(self, exc: OSError) -> None:
        log.error("nfqueue %d failed: %s; reopening it", self.queue_num, exc)
        self._stop_watching()
        assert self._queue is not None
        self._queue.close()
        self._queue = None
        self._pending, self._first = [], 0  # views into the closed queue's buffer
        self.idle.set()
        self._report_trouble("queue")


class VsockToDevice(_Forwarder):
    """vsock `listen` -> packets checked by `check` -> raw socket on `device`."""

    def __init__(
        self,
        listen: Endpoint,
        device: str,
        check: Callable[[memoryview], Drop | None],
        ready: Ready = lambda: None,
    ) -> None:
        super().__init__()
        self.ready = ready  # called once the listener listens
        self.listen = listen
        self.device = device
        self.check = check
        self._sender: RawSender | None = None
        self._listener: socket.socket | None = None
        self._stream: _Stream | None = None
        self._rejections_logged: set[int | None] = set()

    async def run(self) -> None:
        try:
            self._sender = await self._open_sender()
            self._listener = await open_with_backoff(
                f"listener on {self.listen}", self.listen.listen
            )
            log.info("Listening on: %s", self.listen)
            self.ready()
            self.loop.add_reader(self._listener.fileno(), self._on_acceptable)
            while True:
                await self._wait_for_trouble()  # the raw socket broke: reopen it
                self._sender = await self._open_sender()
                if self._stream is not None:
                    self._stream.resume()
        finally:
            if self._listener is not None:
                self.loop.remove_reader(self._listener.fileno())
                self._listener.close()
            if self._stream is not None:
                self._stream.close()
            if self._sender is not None:
                self._sender.close()

    async def _open_sender(self) -> RawSender:
        return await open_with_backoff(
            f"raw socket on device {self.device}", lambda: RawSender(self.device)
        )

    def _on_acceptable(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("Failed to accept connection on %s: %s", self.listen, exc)
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                fd = self._listener.fileno()  # out of resources: pause instead of spinning
                self.loop.remove_reader(fd)
                self.loop.call_later(0.1, self.loop.add_reader, fd, self._on_acceptable)
            return
        if self._stream is not None:
            log.warning("New connection on %s replaces the current one", self.listen)
            self._stream.close()
        else:
            log.info("Accepted connection on %s", self.listen)
        self._stream = _Stream(self, conn)
        self.stats.link_connects += 1

    @property
    def link_up(self) -> bool:
        return self._stream is not None

    def stream_ended(self, stream: _Stream) -> None:
        if self._stream is stream:
            self._stream = None

    @property
    def raw_socket_up(self) -> bool:
        """Whether the raw socket is open (it is None while :meth:`run` reopens it)."""
        return self._sender is not None

    def send_checked(self, packets: list[memoryview], start: int) -> int:
        """Send ``packets[start:]``, which passed the check, through the raw socket.

        Returns the index of the first packet not yet done with: ``len(packets)`` once every
        one was sent or dropped. Less means wait: for the raw socket to be writable while
        :attr:`raw_socket_up`, else for :meth:`run` to reopen it (the packet it broke on is
        dropped).
        """
        stats = self.stats
        while start < len(packets):
            sender = self._sender
            if sender is None:
                break
            try:
                sent = sender.send_batch(packets[start : start + SEND_BATCH])
            except PacketRejected as rejected:
                self._count_rejection(rejected)
                start += 1
                continue
            except OSError as exc:
                self._raw_socket_failed(exc)
                start += 1
                continue
            if not sent:
                break
            stats.packets += sent
            stats.bytes += sum(map(len, packets[start : start + sent]))
            start += sent
        return start

    def sender_fileno(self) -> int:
        assert self._sender is not None
        return self._sender.fileno()

    def _raw_socket_failed(self, exc: OSError) -> None:
        log.error("Raw socket on device %s failed: %s; reopening it", self.device, exc)
        self.stats.drops.add(RAW_SOCKET_BROKEN)
        assert self._sender is not None
        self._sender.close()
        self._sender = None
        self._report_trouble("raw socket")

    def _count_rejection(self, rejected: PacketRejected) -> None:
        name = errno.errorcode.get(rejected.errno or 0, str(rejected.errno))
        self.stats.drops.add(f"send-{name}")
        if rejected.errno not in self._rejections_logged:
            self._rejections_logged.add(rejected.errno)
            log.warning("%s; dropped (further %s drops are counted, not logged)", rejected, name)


class _Stream:
    """One accepted vsock connection of a :class:`VsockToDevice`, read in callbacks.

    Each read's whole packets are checked and sent in runs of up to :data:`SEND_BATCH` (one
    ``sendmmsg`` each). While the raw socket cannot take a run (full, or being reopened) the
    rest of it waits in :attr:`backlog` and reading pauses, so the framer's buffer, which the
    packets point into, is not overwritten.
    """

    def __init__(self, forwarder: VsockToDevice, conn: socket.socket) -> None:
        self.forwarder = forwarder
        self.loop = forwarder.loop
        self.conn = conn
        self.fd = conn.fileno()
        self.name = str(forwarder.listen)
        self.framer = Ipv4StreamFramer(READ_SIZE)
        self.packets: Iterator[memoryview] = iter(())  # whole packets not yet checked
        self.backlog: list[memoryview] = []  # checked, not yet sent from backlog[self.next] on
        self.next = 0
        self.malformed: FramingError | None = None  # met after the packets in the backlog
        self.waiting = False  # for the raw socket: reading is paused
        self.writer_fd = -1  # the raw socket, while waiting for it to be writable
        self.received = 0
        conn.setblocking(False)
        if forwarder.listen.half_close:  # on hybrid vsock it would end the guest's stream
            try:
                conn.shutdown(socket.SHUT_WR)  # nothing goes back on this stream
            except OSError:
                pass
        self.loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        forwarder = self.forwarder
        if forwarder.stopping:
            self.loop.remove_reader(self.fd)
            return
        framer = self.framer
        for _ in range(READS_PER_WAKEUP):
            space = framer.buffer_for_read()
            try:
                count = self.conn.recv_into(space)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("Connection on %s failed: %s", self.name, exc)
                if framer.pending:
                    forwarder.stats.drops.add(CUT_BY_DISCONNECT)
                self.close()
                return
            if count == 0:
                self._ended()
                return
            self.received += count
            framer.commit(count)
            self.packets = framer.packets()
            if not self._send_packets() or count < len(space):
                return  # paused, or drained: no EAGAIN read (an exception) to learn it

    def _send_packets(self) -> bool:
        """Send the backlog, then check and send every whole packet received; False if
        reading must pause (or has ended)."""
        while self._flush():
            if self.malformed is not None:
                self._drop_malformed(self.malformed)
                return False
            self.backlog, self.next = self._checked_packets(), 0
            if not self.backlog and self.malformed is None:
                return True
        return False

    def _checked_packets(self) -> list[memoryview]:
        """Up to SEND_BATCH of the next whole packets that pass the check (the others are
        counted as dropped); a malformed stream met on the way is kept in :attr:`malformed`."""
        check, drops = self.forwarder.check, self.forwarder.stats.drops
        batch: list[memoryview] = []
        try:
            for packet in self.packets:
                reason = check(packet)
                if reason is not None:
                    drops.add(reason)
                    continue
                batch.append(packet)
                if len(batch) == SEND_BATCH:
                    break
        except FramingError as exc:
            self.malformed = exc
        return batch

    def _flush(self) -> bool:
        """Send the backlog: True once it is all done with, False when it must wait for the
        raw socket (reading paused until then)."""
        if self.next < len(self.backlog):
            self.next = self.forwarder.send_checked(self.backlog, self.next)
            if self.next < len(self.backlog):
                self._wait_for_raw_socket()
                return False
        return True

    def _wait_for_raw_socket(self) -> None:
        forwarder = self.forwarder
        self.loop.remove_reader(self.fd)
        self.waiting = True
        forwarder.idle.clear()
        if forwarder.raw_socket_up:  # full: wait until writable
            self.writer_fd = forwarder.sender_fileno()
            self.loop.add_writer(self.writer_fd, self.resume)
        # else run() reopens it, then calls resume()

    def resume(self) -> None:
        """Send what is in hand, then read again (after the raw socket drained or was
        reopened)."""
        if self.conn.fileno() < 0:
            return
        if self.writer_fd >= 0:
            self.loop.remove_writer(self.writer_fd)
            self.writer_fd = -1
        if not self._send_packets():  # waiting again, or closed (which ends the waiting)
            return
        if self.waiting:
            self.waiting = False
            self.forwarder.idle.set()
        if not self.forwarder.stopping:
            self.loop.add_reader(self.fd, self._on_readable)

    def _drop_malformed(self, exc: FramingError) -> None:
        self.forwarder.stats.malformed_streams += 1
        log.error(
            "Dropping the connection on %s: malformed packet stream after %d bytes: %s",
            self.name,
            self.received - self.framer.pending,
            exc,
        )
        self.close()

    def _ended(self) -> None:
        pending = self.framer.pending
        if pending:
            self.forwarder.stats.drops.add(CUT_BY_DISCONNECT)
            log.warning(
                "Connection on %s closed inside a packet (%d bytes of it dropped)",
                self.name,
                pending,
            )
        else:
            log.info("Connection on %s closed after %d bytes", self.name, self.received)
        self.close()

    def close(self) -> None:
        if self.conn.fileno() < 0:
            return
        self.loop.remove_reader(self.fd)
        if self.writer_fd >= 0:
            self.loop.remove_writer(self.writer_fd)
            self.writer_fd = -1
        if self.waiting:
            self.waiting = False
            self.forwarder.idle.set()
        self.backlog, self.next = [], 0
        self.conn.close()
        self.forwarder.stream_ended(self)


async def serve(
    forwarder: QueueToVsock | VsockToDevice,
    name: str,
    stats_interval: float,
    drain_timeout: float,
    stop: Stop,
) -> int:
    """Run `forwarder` until `stop`; log its counters periodically and at the end."""
    loop = asyncio.get_running_loop()
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
        stop.draining("sending the packets in hand, then stopping")
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
