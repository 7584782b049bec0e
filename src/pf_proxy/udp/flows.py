"""Client flows and the vsock streams that carry them, driven by the event loop's readiness
callbacks (no task per datagram, bounded work per wakeup).

A *flow* is one client of UDP: `udp-to-vsock` keys it by the client's address and port and
gives it a vsock stream of its own (one descriptor); `vsock-to-udp` gets one per accepted
vsock stream and gives it a UDP socket connected to the upstream (two descriptors). On the
stream every datagram is a frame (:mod:`framing`).

    datagram in  -> frame it in a shared buffer -> send it whole down the stream
                                                -> stream full? keep it (bounded), else drop
    stream bytes -> Deframer -> each datagram out of the UDP socket (full? drop it)

What bounds a flow's cost:

- Memory. Datagrams are received into one shared buffer behind room for their length, so a
  frame is written without a copy. A flow owns a buffer only while its stream holds back a
  frame (`pending`, at most MAX_PENDING bytes, and all flows together at most
  MAX_PENDING_TOTAL); beyond that datagrams are dropped and counted, as UDP allows. Its
  deframer holds only an unfinished frame. An idle flow is a few small objects.
- Time. All flows sit in one `FlowTable`, an OrderedDict in order of last activity: one timer
  closes those idle for `idle_timeout`, and at the cap (from the open-file limit) the flow idle
  the longest is closed to make room, so new clients are served, not refused.
- Failures. Every socket of a flow is closed by `Flow.close()`, which never raises: a failed
  stream abortively (`endpoints.close_abortively`; vsock has no reset, its peer reads EOF). A
  reset read from a vsock socket is the peer's close (`endpoints.peer_close_is_eof`). Each
  failure is one log line naming the flow, what failed and the address.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from pf_proxy.endpoints import close_abortively, peer_close_is_eof
from pf_proxy.udp.framing import HEADER_SIZE, MAX_DATAGRAM, Deframer, FramingError
from pf_proxy.udp.sockets import AddressInfo, UdpTarget

log = logging.getLogger("pf_proxy")

# A frame waiting for its stream: one largest frame and then some. Over this, datagrams for
# that flow are dropped until the stream takes what it holds.
MAX_PENDING = 128 * 1024
# All flows' waiting frames together: a stalled peer across thousands of flows costs at most
# this much memory.
MAX_PENDING_TOTAL = 32 << 20
DATAGRAMS_PER_WAKEUP = 32  # per UDP socket and wakeup, so one busy flow cannot starve others
STREAM_READS_PER_WAKEUP = 4
STREAM_READ_SIZE = 256 * 1024  # the shared buffer stream bytes are read into
# Idle flows are closed at most this late: the timer fires no more often than this.
SWEEP_GRANULARITY = 0.1
# During the drain, a flow ends once it has been idle this long: a UDP flow has no end of its
# own, but an answer in flight (a DNS answer takes milliseconds) still gets through.
DRAIN_IDLE_TIMEOUT = 1.0
# udp-to-vsock keeps up to this much of a flow's unanswered datagrams, to send them again on a
# new stream if the peer closes the old one under them (ClientFlow): DNS queries fit.
RESEND_LIMIT = 4096

# The shared receive buffers: the loop runs one callback at a time, and every callback is
# done with them before it returns. A datagram lands behind HEADER_SIZE bytes of room, so its
# frame is `_frame_buffer[:HEADER_SIZE + size]` once the length is written in front.
_frame_buffer = bytearray(HEADER_SIZE + MAX_DATAGRAM)
_frame_view = memoryview(_frame_buffer)
DATAGRAM_SPACE = _frame_view[HEADER_SIZE:]
_stream_buffer = memoryview(bytearray(STREAM_READ_SIZE))


def frame_in_place(size: int) -> memoryview:
    """The frame of the datagram just received into DATAGRAM_SPACE (`size` bytes)."""
    _frame_buffer[0] = size >> 8
    _frame_buffer[1] = size & 0xFF
    return _frame_view[: HEADER_SIZE + size]


# Why a flow ended: the log lines' and the `reason` label's values.
IDLE_TIMEOUT = "idle_timeout"  # no datagram either way for --idle-timeout
PEER_CLOSED = "peer_closed"  # the other side ended the vsock stream
FLOW_LIMIT = "flow_limit"  # closed at the cap to make room for a new flow
FAILED = "failed"  # a connect, a send, a cut frame, ICMP unreachable ... (logged)
REOPENED = "reopened"  # udp-to-vsock: the peer closed the stream under a datagram
SHUTDOWN = "shutdown"  # still open at the end of the drain
CLOSE_REASONS = (IDLE_TIMEOUT, PEER_CLOSED, FLOW_LIMIT, FAILED, REOPENED, SHUTDOWN)


@dataclass
class Counters:
    """What a data plane did: for the periodic and final log lines, and /metrics."""

    flows: int = 0  # opened
    datagrams_to_stream: int = 0
    datagrams_from_stream: int = 0
    bytes_to_stream: int = 0  # of frames, their 2-byte lengths included
    bytes_from_stream: int = 0
    dropped_stream_full: int = 0  # the vsock stream was slow: held back too much already
    dropped_udp: int = 0  # the UDP socket refused one (full, too large, unreachable)
    connect_retries: int = 0  # vsock connects tried again (endpoints.ConnectRetries)
    closed: Counter[str] = field(default_factory=Counter)  # by CLOSE_REASONS

    def snapshot(self) -> tuple[object, ...]:
        return tuple(
            dict(value) if isinstance(value := getattr(self, f.name), Counter) else value
            for f in fields(self)
        )

    def format(self, open_flows: int) -> str:
        text = (
            f"{self.flows} flows ({open_flows} open), {self.datagrams_to_stream} datagrams "
            f"to vsock, {self.datagrams_from_stream} from vsock, dropped "
            f"{self.dropped_stream_full} (vsock stream slow) and {self.dropped_udp} (refused "
            "by UDP)"
        )
        if self.closed[FAILED]:
            text += f", {self.closed[FAILED]} flows failed"
        if self.closed[FLOW_LIMIT]:
            text += f", {self.closed[FLOW_LIMIT]} closed at the flow limit"
        if self.closed[REOPENED]:
            text += f", {self.closed[REOPENED]} reopened (closed by the peer under a datagram)"
        if self.connect_retries:
            text += f", {self.connect_retries} vsock connects retried"
        return text


def _forget(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Stop watching `fd`; never raises."""
    try:
        loop.remove_reader(fd)
        loop.remove_writer(fd)
    except (OSError, ValueError, RuntimeError):
        pass


class Flow:
    """One flow's vsock stream: frames out (with a bounded hold-back), datagrams in.

    A subclass says where datagrams from the stream go (`deliver`) and what else it owns
    (`_close_own`). `stream` is None until connected; frames sent meanwhile are held back.
    """

    __slots__ = (
        "closed",
        "deframer",
        "dropped",
        "key",
        "last_active",
        "name",
        "pending",
        "stream",
        "stream_fd",
        "table",
    )
    named_by_stream = False  # the flow's name is its stream's peer (vsock-to-udp)

    def __init__(self, table: FlowTable, key: object, name: str) -> None:
        self.table = table
        self.key = key
        self.name = name  # the client, as log lines name the flow
        self.stream: socket.socket | None = None
        self.stream_fd = -1
        self.deframer = Deframer()
        self.pending: bytearray | None = None  # frames the stream has not taken yet
        self.dropped = 0
        self.closed = False
        self.last_active = table.loop.time()

    # --- the stream ----------------------------------------------------------------------

    def attach_stream(self, stream: socket.socket) -> None:
        """The stream is connected: read it, and send what was held back meanwhile."""
        self.stream, self.stream_fd = stream, stream.fileno()
        loop = self.table.loop
        loop.add_reader(self.stream_fd, self._on_stream_readable)
        if self.pending is not None:
            loop.add_writer(self.stream_fd, self._on_stream_writable)

    def send_frame(self, frame: memoryview) -> None:
        """Send one whole frame down the stream, hold it back, or drop it (counted)."""
        table = self.table
        if self.pending is None and self.stream is not None:
            try:
                sent = self.stream.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._send_failed(exc)
                return
            if sent == len(frame):
                table.counters.datagrams_to_stream += 1
                table.counters.bytes_to_stream += sent
                return
            held = len(frame) - sent
            if table.pending_total + held > MAX_PENDING_TOTAL and sent == 0:
                self._drop()
                return
            table.counters.datagrams_to_stream += 1
            table.counters.bytes_to_stream += len(frame)
            self.pending = bytearray(frame[sent:])  # a frame is never cut: the rest goes next
            table.pending_total += held
            table.loop.add_writer(self.stream_fd, self._on_stream_writable)
        elif self._room_for(len(frame)):
            if self.pending is None:
                self.pending = bytearray(frame)
            else:
                self.pending += frame
            table.pending_total += len(frame)
            table.counters.datagrams_to_stream += 1
            table.counters.bytes_to_stream += len(frame)
        else:
            self._drop()

    def _room_for(self, size: int) -> bool:
        held = 0 if self.pending is None else len(self.pending)
        return held + size <= MAX_PENDING and self.table.pending_total + size <= MAX_PENDING_TOTAL

    def _drop(self) -> None:
        self.dropped += 1
        self.table.counters.dropped_stream_full += 1

    def _on_stream_writable(self) -> None:
        pending = self.pending
        assert pending is not None and self.stream is not None
        try:
            sent = self.stream.send(pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self._send_failed(exc)
            return
        self.table.pending_total -= sent
        if sent == len(pending):
            self.pending = None
            self.table.loop.remove_writer(self.stream_fd)
        else:
            del pending[:sent]

    def _send_failed(self, exc: OSError) -> None:
        self.fail(f"failed to send to {self.table.stream_name}: {_describe(exc)}")

    def _on_stream_readable(self) -> None:
        stream = self.stream
        assert stream is not None
        buffer = _stream_buffer
        try:
            for _ in range(STREAM_READS_PER_WAKEUP):
                count = stream.recv_into(buffer)
                if count == 0:
                    self._stream_ended()
                    return
                self.table.counters.bytes_from_stream += count
                datagrams = self.deframer.feed(buffer[:count])
                if datagrams:
                    self.table.touch(self)
                    self.table.counters.datagrams_from_stream += len(datagrams)
                    for datagram in datagrams:
                        self.deliver(datagram)
                        if self.closed:
                            return
                if count < STREAM_READ_SIZE:
                    break  # drained: save the read that would say so (EAGAIN)
            # A short read leaves the stream drained, but an error may be waiting behind the
            # bytes (a reset): uvloop reports such readiness once only, so ask for it now
            # (SO_ERROR reads and clears it), as the TCP relay does.
            error = stream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno == errno.ECONNRESET and peer_close_is_eof(stream):
                self._stream_ended()  # the emulation's way of saying the peer closed
            else:
                self.fail(f"failed to read from {self.table.stream_name}: {_describe(exc)}")

    def _stream_ended(self) -> None:
        """EOF: the peer closed its end. A frame cut short is the peer's failure."""
        try:
            self.deframer.end()
        except FramingError as exc:
            where = "" if self.named_by_stream else f"{self.table.stream_name}: "
            self.fail(f"{where}{exc}", clean_stream=True)
            return
        self.close("the vsock stream ended", PEER_CLOSED)

    # --- what a subclass provides --------------------------------------------------------

    def deliver(self, datagram: bytes | memoryview) -> None:
        """Send a datagram that came down the stream on its way (a subclass's UDP side)."""
        raise NotImplementedError

    def _close_own(self, clean: bool) -> None:
        """Close whatever else the flow owns; never raises."""

    # --- the end -------------------------------------------------------------------------

    def fail(self, reason: str, clean_stream: bool = False) -> None:
        """Log one line naming the flow and what failed, then close it."""
        log.error("Dropping flow from %s: %s%s", self.name, reason, self._drops_note())
        self.dropped = 0  # said already
        self.close(reason, FAILED, clean=clean_stream)

    def _drops_note(self) -> str:
        if not self.dropped:
            return ""
        return f" ({self.dropped} datagrams dropped: the vsock stream was slow)"

    def close(self, why: str, reason: str, clean: bool = True) -> None:
        """Close every socket of the flow and forget it, counting `reason` (CLOSE_REASONS);
        never raises. A clean close ends the stream as an EOF; otherwise `close_abortively`
        (vsock's peer reads EOF all the same)."""
        if self.closed:
            return
        self.closed = True
        table = self.table
        table.counters.closed[reason] += 1
        table.discard(self)
        if self.dropped and clean:
            log.warning("Flow from %s closed (%s)%s", self.name, why, self._drops_note())
        try:
            self._close_own(clean)
        finally:
            stream, self.stream = self.stream, None
            if self.pending is not None:
                table.pending_total -= len(self.pending)
                self.pending = None
            if stream is not None:
                _forget(table.loop, self.stream_fd)
                if clean:
                    try:
                        stream.close()
                    except OSError:
                        pass
                else:
                    close_abortively(stream)


def _describe(exc: OSError) -> str:
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno else str(exc)


class FlowTable:
    """Every open flow, least recently active first: idle expiry and the cap.

    `touch()` on each datagram keeps the order (an O(1) move to the end). One timer, set for
    when the least recently active flow would expire, closes every flow idle for
    `idle_timeout`. At `limit` flows, `add()` first closes the flow idle the longest.
    """

    def __init__(self, limit: int, idle_timeout: float | None, stream_name: str, what: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.flows: OrderedDict[object, Flow] = OrderedDict()
        self.limit = limit
        self.idle_timeout = idle_timeout or None
        self.stream_name = stream_name  # the vsock side, for log lines
        self.what = what  # "udp-to-vsock", "vsock-to-udp"
        self.counters = Counters()
        self.pending_total = 0
        self.overloaded = False
        self._evicted_this_overload = 0
        self._timer: asyncio.TimerHandle | None = None
        self._emptied: asyncio.Future[None] | None = None
        # udp-to-vsock: open a new flow for a client, with these frames to send first
        self.reopen: Callable[[Any, bytes], None] | None = None

    def __len__(self) -> int:
        return len(self.flows)

    def add(self, flow: Flow) -> None:
        """Count the flow in; at the limit, close the one idle the longest first."""
        if len(self.flows) >= self.limit:
            self._make_room()
        elif self.overloaded and len(self.flows) < self.limit * 9 // 10:
            log.info(
                "Below the flow limit again: %d flows open, %d were closed to make room",
                len(self.flows),
                self._evicted_this_overload,
            )
            self.overloaded = False
        self.flows[flow.key] = flow
        self.counters.flows += 1
        if self._timer is None and self.idle_timeout:
            self._schedule(flow.last_active)

    def touch(self, flow: Flow) -> None:
        flow.last_active = self.loop.time()
        self.flows.move_to_end(flow.key)

    def discard(self, flow: Flow) -> None:
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
            if not self.flows and self._emptied is not None and not self._emptied.done():
                self._emptied.set_result(None)

    def _make_room(self) -> None:
        if not self.overloaded:
            log.error(
                "%d flows open, the limit (it grows with the open file limit, e.g. systemd's "
                "LimitNOFILE=): closing the flow idle the longest for each new one",
                len(self.flows),
            )
            self.overloaded = True
            self._evicted_this_overload = 0
        _, oldest = self.flows.popitem(last=False)
        self._evicted_this_overload += 1
        oldest.close("closed to make room at the flow limit", FLOW_LIMIT)

    # --- idle expiry ---------------------------------------------------------------------

    def _schedule(self, last_active: float) -> None:
        assert self.idle_timeout is not None
        due = max(last_active + self.idle_timeout, self.loop.time() + SWEEP_GRANULARITY)
        self._timer = self.loop.call_at(due, self._expire_idle)

    def _expire_idle(self) -> None:
        self._timer = None
        assert self.idle_timeout is not None
        deadline = self.loop.time() - self.idle_timeout
        flows = self.flows
        while flows:
            oldest = next(iter(flows.values()))
            if oldest.last_active > deadline:
                self._schedule(oldest.last_active)
                return
            flows.popitem(last=False)  # progress even if close() misbehaved
            oldest.close(f"idle for {self.idle_timeout:g} s", IDLE_TIMEOUT)
        if self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)

    # --- the end -------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Let the flows end for up to `timeout` seconds, each once it has been idle for
        DRAIN_IDLE_TIMEOUT (or the idle timeout, if shorter); close the rest."""
        if self.flows and timeout > 0:
            log.info("Draining %d flows for up to %g s", len(self.flows), timeout)
            self._emptied = self.loop.create_future()
            self.idle_timeout = min(self.idle_timeout or DRAIN_IDLE_TIMEOUT, DRAIN_IDLE_TIMEOUT)
            if self._timer is not None:
                self._timer.cancel()
            self._schedule(next(iter(self.flows.values())).last_active)
            await asyncio.wait({self._emptied}, timeout=timeout)
        if self.flows:
            log.warning("Closed %d flows still open after the drain", len(self.flows))
        self.close_all()

    def close_all(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.flows:
            _, flow = self.flows.popitem(last=False)
            flow.close("shutting down", SHUTDOWN)


def log_counters(table: FlowTable) -> None:
    log.info("%s: %s", table.what, table.counters.format(len(table)))


async def report_periodically(table: FlowTable, interval: float) -> None:
    """Log the counters every `interval` seconds when they changed (0: never)."""
    if not interval:
        return
    last = table.counters.snapshot()
    while True:
        await asyncio.sleep(interval)
        now = table.counters.snapshot()
        if now != last:
            log_counters(table)
            last = now


# --- udp-to-vsock --------------------------------------------------------------------------


class ClientFlow(Flow):
    """udp-to-vsock: one client's datagrams, its own vsock stream; replies are sent to the
    client from the listening socket (so from the address it wrote to).

    The other side closes a stream when it is idle or to make room at its flow limit, and a
    datagram may be on its way down that stream just then (a stub resolver reusing a source
    port, say). So a flow that has had replies keeps the datagrams sent since the last one
    (up to RESEND_LIMIT bytes); if the stream ends, or refuses a send, before a reply came,
    they go again on a new stream, once. UDP allows a datagram to arrive twice.
    """

    __slots__ = ("connecting", "listener", "replied", "unanswered")

    def __init__(self, table: FlowTable, client: object, name: str, listener: socket.socket):
        super().__init__(table, client, name)
        self.listener = listener
        self.connecting: asyncio.Task[None] | None = None
        self.replied = False
        self.unanswered: bytearray | None = None  # frames sent since the last reply

    def remember(self, frame: memoryview) -> None:
        """Keep `frame` until a reply comes, if this flow may need to send it again."""
        if not self.replied:
            return
        if self.unanswered is None:
            if len(frame) <= RESEND_LIMIT:
                self.unanswered = bytearray(frame)
        elif len(self.unanswered) + len(frame) <= RESEND_LIMIT:
            self.unanswered += frame
        else:
            self.replied = False  # too much to keep: give up on resending for this flow
            self.unanswered = None

    def deliver(self, datagram: bytes | memoryview) -> None:
        self.replied = True
        self.unanswered = None
        try:
            self.listener.sendto(datagram, self.key)  # type: ignore[call-overload]
        except OSError:
            self.table.counters.dropped_udp += 1  # full, or the client's address is gone

    def _send_failed(self, exc: OSError) -> None:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET) and self._reopen("the stream refused"):
            return
        super()._send_failed(exc)

    def _stream_ended(self) -> None:
        if self.deframer.pending or not self._reopen("the vsock stream ended"):
            super()._stream_ended()

    def _reopen(self, why: str) -> bool:
        """Close this flow and open a new one sending the unanswered datagrams again."""
        frames, reopen = self.unanswered, self.table.reopen
        if frames is None or reopen is None:
            return False
        self.unanswered = None
        self.close(f"{why} under a datagram", REOPENED)
        reopen(self.key, bytes(frames))
        return True

    def _close_own(self, clean: bool) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None


# --- vsock-to-udp --------------------------------------------------------------------------


class UpstreamFlow(Flow):
    """vsock-to-udp: one accepted vsock stream, one UDP socket connected to the upstream.

    If the upstream refuses (ICMP port unreachable) before it answered anything, the flow
    moves on to the next address the upstream's name resolved to, if any, and sends what it
    sent so far again there (up to RESEND_LIMIT bytes of it are kept until the first answer).
    """

    __slots__ = (
        "answered",
        "resolving",
        "sent",
        "target",
        "too_large_logged",
        "udp",
        "udp_fd",
        "untried",
        "upstream_name",
    )
    named_by_stream = True

    def __init__(self, table: FlowTable, key: object, name: str, stream: socket.socket):
        super().__init__(table, key, name)
        self.stream, self.stream_fd = stream, stream.fileno()
        self.udp: socket.socket | None = None
        self.udp_fd = -1
        self.upstream_name = ""
        self.target: UdpTarget | None = None
        self.untried: list[AddressInfo] = []
        self.answered = False
        self.sent: list[bytes] | None = None  # datagrams sent before the first answer
        self.resolving: asyncio.Task[None] | None = None
        self.too_large_logged = False

    def attach_upstream(
        self, udp: socket.socket, name: str, target: UdpTarget, untried: list[AddressInfo]
    ) -> None:
        """The UDP socket is connected: start both directions."""
        self._use_udp(udp, name)
        self.target, self.untried = target, untried
        assert self.stream is not None
        self.attach_stream(self.stream)

    def _use_udp(self, udp: socket.socket, name: str) -> None:
        self.udp, self.udp_fd, self.upstream_name = udp, udp.fileno(), name
        self.table.loop.add_reader(self.udp_fd, self._on_udp_readable)

    def deliver(self, datagram: bytes | memoryview) -> None:
        udp = self.udp
        assert udp is not None
        if self.untried and not self.answered:
            self._keep(datagram)
        try:
            udp.send(datagram)
        except BlockingIOError:
            self.table.counters.dropped_udp += 1
        except ConnectionRefusedError as exc:
            self._unreachable(exc)
        except OSError as exc:
            self.table.counters.dropped_udp += 1
            if exc.errno != errno.EMSGSIZE:
                self.fail(f"failed to send to {self.upstream_name}: {_describe(exc)}")
            elif not self.too_large_logged:
                self.too_large_logged = True
                log.warning(
                    "Flow from %s: a datagram of %d bytes is too large for %s (%s): dropped",
                    self.name,
                    len(datagram),
                    self.upstream_name,
                    exc.strerror,
                )

    def _on_udp_readable(self) -> None:
        udp = self.udp
        assert udp is not None
        space = DATAGRAM_SPACE
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                size = udp.recv_into(space)
            except BlockingIOError:
                return
            except ConnectionRefusedError as exc:
                self._unreachable(exc)
                return
            except OSError as exc:
                self.fail(f"failed to receive from {self.upstream_name}: {_describe(exc)}")
                return
            self.answered = True
            self.sent = None
            self.table.touch(self)
            self.send_frame(frame_in_place(size))
            if self.closed:
                return

    def _keep(self, datagram: bytes | memoryview) -> None:
        kept = self.sent
        if kept is None:
            kept = self.sent = []
        if sum(map(len, kept)) + len(datagram) <= RESEND_LIMIT:
            kept.append(bytes(datagram))

    def _unreachable(self, exc: OSError) -> None:
        """ICMP port unreachable: try the next address, or end the flow."""
        why = f"{self.upstream_name} is unreachable: {_describe(exc)} (ICMP port unreachable)"
        if not self.answered and self.untried and self.target is not None:
            try:
                udp, name, self.untried = self.target.connect(self.untried)
            except OSError:
                pass
            else:
                log.warning("Flow from %s: %s; trying %s", self.name, why, name)
                self._close_udp()
                self._use_udp(udp, name)
                for datagram in self.sent or ():
                    try:
                        udp.send(datagram)
                    except OSError:
                        break  # the new address's own refusal comes as an ICMP error, too
                return
        self.fail(why)

    def _close_udp(self) -> None:
        udp, self.udp = self.udp, None
        if udp is not None:
            _forget(self.table.loop, self.udp_fd)
            try:
                udp.close()
            except OSError:
                pass

    def _close_own(self, clean: bool) -> None:
        if self.resolving is not None:
            self.resolving.cancel()
            self.resolving = None
        self._close_udp()
