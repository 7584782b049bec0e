"""The relay: copy bytes both ways between two connected non-blocking sockets.

Each direction is a `_Pump`, driven by readiness events:

    readable(src) -> move a chunk out of src -> write it to dst
                                             -> dst full? stop reading src, wait writable(dst)
    EOF on src    -> shutdown(dst, SHUT_WR) (half-close); the other direction keeps flowing

Readiness comes from one edge-triggered epoll set per event loop (`Poller`), which the loop
watches as a single reader. Each socket is added to it once (one epoll_ctl) and leaves it when
closed: no system call per reader or writer switched on or off, none per connection beyond
that (the loop's own per-descriptor watchers cost four epoll_ctl, an ioctl and a getsockopt
per socket). Edge-triggered means a pump reads until src says EAGAIN (or a read comes back
short, which says the same), and a pump that pauses, or stops after READS_PER_WAKEUP chunks,
picks up again by itself. An event that reports an error or a hang-up is read to the end, so
a reset right behind the last bytes is never missed.

Each direction starts by copying through a reusable buffer (recv_into, send): for small
messages that is two system calls where splice takes two and a pipe. Once a read brings
SPLICE_FROM bytes or more, the direction moves to splice(2): the chunk goes through a pipe and
never enters user space. Where the kernel refuses splice for a socket type, or no pipe can be
made for want of descriptors, that direction goes back to copying. Either way at most one chunk per
direction is held: a slow reader slows the writer, and memory stays bounded.

The pipe or buffer that carries a chunk (its *carrier*) is borrowed from a small pool of
empty ones for the read and given back as soon as dst has taken the whole chunk; only a
direction waiting for dst to drain keeps one. So an idle connection costs only its two
sockets, and the hot path neither creates pipes nor allocates buffers.

Where the upstream cannot carry a half-close (hybrid vsock: a SHUT_WR there is a full shutdown
for the guest, whose reply would then fail), the client's EOF is held instead: the client has
sent everything, and the upstream direction goes on until the guest closes its stream. A
guest's own half-close does not reach the host either, so that close may never come (a
pf-proxy in the guest closes only once it has seen both ends): with --idle-timeout, a
connection whose client's EOF is held ends cleanly (EOF, not a reset) once it has been idle
that long, its reply delivered. The upstream's EOF is always passed to the client: to a hybrid
client (a guest whose connection came in on its uds_path) that ends the stream once it has
read the rest, as a close would, and its later sends fail.

The relay ends when both directions have reached EOF, or when either fails. After a failure
both sockets are closed abortively (`endpoints.close_abortively`): a TCP peer is reset, so it
cannot mistake a truncated stream for a complete one; a vsock peer reads EOF, because vsock has
no reset. For the same reason a reset read from a vsock socket (only the emulation reports
one) is that direction's EOF, not a failure.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import select
import socket
import weakref
from collections.abc import Callable

from pf_proxy.current import proxy_name
from pf_proxy.endpoints import close_abortively, peer_close_is_eof
from pf_proxy.runtime import info

log = logging.getLogger("pf_proxy")

# Splice path: at most this much per read, and per stalled direction. On loopback (one stream,
# see benchmarks/) 512 KiB pipes carried 11.8 Gbit/s, 256 KiB ones 9.4 and 1 MiB ones 11.3;
# 4 MiB ones 7.6. Of the two best, 512 KiB holds half as much in a stalled direction.
PIPE_SIZE = 512 * 1024
# Copy path: at most this much per read, and per stalled direction. Bigger than the pipe: each
# chunk costs a wakeup and two copies through user space, and on loopback 1 MiB chunks carried
# 16 Gbit/s where 256 KiB ones carried 12 (one stream, see benchmarks/).
COPY_CHUNK = 1024 * 1024
# A direction starts on the copy path and moves to splice once one read brings this much: for
# small messages one recv_into and one send cost less than two splices through a pipe (one
# hop, 64-byte request and reply, 32 clients: 115 vs 133 us of CPU per connection, 1-byte
# ping-pong 11.4 vs 13.0 us per request; benchmarks/cpucost.py), for bulk splice wins.
SPLICE_FROM = 64 * 1024
READS_PER_WAKEUP = 4  # bounded, so one busy connection cannot starve the others
_READS = range(READS_PER_WAKEUP)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
EVENTS_PER_WAKEUP = 256  # epoll events taken per turn of the loop; the rest wait for the next
_WATCHED = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_TO_THE_END = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR  # read until EOF or error

HELD_EOF = "the upstream cannot take a half-close, which would cut its reply"
FREE_CARRIERS_KEPT = 8  # empty pipes (and buffers) kept for reuse; the rest are closed (freed)

# Errors that mean "splice is not supported between these two files", not a broken socket.
_SPLICE_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)

use_splice_default = hasattr(os, "splice") and os.environ.get("PF_PROXY_NO_SPLICE") != "1"


class Poller:
    """Every relayed socket in one edge-triggered epoll set, watched by the loop as one reader.

    `watch` adds a socket once; closing it takes it out of the set (nothing else holds it),
    and `forget` drops its handler. A handler gets the epoll event mask.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        loop.add_reader(self.epoll.fileno(), self._dispatch)
        weakref.finalize(loop, self.epoll.close)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.epoll.fileno())
        self.epoll.close()

    def watch(self, fd: int, handler: Callable[[int], None]) -> None:
        self.epoll.register(fd, _WATCHED)  # first: if it fails, no handler is left behind
        self.handlers[fd] = handler

    def handle(self, fd: int, handler: Callable[[int], None]) -> None:
        """Give a watched socket another handler (a connect done, its relay takes over)."""
        self.handlers[fd] = handler

    def forget(self, fd: int) -> None:
        self.handlers.pop(fd, None)

    def _dispatch(self) -> None:
        handlers = self.handlers
        for fd, events in self.epoll.poll(0, EVENTS_PER_WAKEUP):
            handler = handlers.get(fd)
            if handler is not None:  # else closed by an earlier event of this batch
                handler(events)


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str | None, Poller]] = (
    weakref.WeakKeyDictionary()
)


def poller(loop: asyncio.AbstractEventLoop) -> Poller:
    """The Poller of the proxy served here (:mod:`pf_proxy.current`) on `loop`, made on first
    use. One per proxy, not one per loop: the loop runs a Poller's handlers in the context it
    was made in, so each proxy's connections log under its own name."""
    name = proxy_name()
    by_proxy = _pollers.get(loop)
    if by_proxy is None:
        by_proxy = _pollers[loop] = {}
    found = by_proxy.get(name)
    if found is None:
        found = by_proxy[name] = Poller(loop)
    return found


def release_poller(loop: asyncio.AbstractEventLoop) -> None:
    """The proxy served here has stopped: close its Poller if nothing is watched any more."""
    by_proxy = _pollers.get(loop, {})
    found = by_proxy.get(proxy_name())
    if found is not None and not found.handlers:
        del by_proxy[proxy_name()]
        found.close(loop)


class _Pump:
    """One direction of a relay: src -> dst, then half-close dst.

    The control flow both paths share, in three states: reading src (`reading`), waiting for
    dst to take the chunk in hand (`waiting`), done (`finished`). A subclass moves the bytes:
    its `_read` reads chunks into its carrier and writes them on, all inline because it runs
    for every chunk (on the 2-core benchmark machine, the method calls it had cost 1-byte
    ping-pong about 10% of its rate); `_write_held` writes what dst did not take at once, and
    `_drop_carrier` lets go of the carrier.
    """

    __slots__ = ("bytes", "done_message", "dst", "dst_fd", "finished", "loop", "reading",
                 "relay", "src", "src_fd", "waiting")  # fmt: skip

    def __init__(
        self, relay: Relay, src: socket.socket, dst: socket.socket, done_message: str
    ) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.done_message = done_message
        self.reading = True
        self.waiting = False
        self.finished = False
        self.bytes = 0

    def on_readable(self, events: int) -> None:
        """src has news: read it (to the end if the news is an error or a hang-up)."""
        if self.reading and not self.waiting:
            self._read(events & _TO_THE_END)

    def _read(self, to_the_end: int) -> None:
        raise NotImplementedError

    def _write_held(self) -> bool:
        """Write the chunk in hand to dst; False if dst is full (the rest waits)."""
        raise NotImplementedError

    def _drop_carrier(self) -> None:
        raise NotImplementedError

    def in_hand(self) -> bool:
        """Whether bytes read from src wait to be written to dst."""
        raise NotImplementedError

    def _more(self, to_the_end: int) -> None:
        """READS_PER_WAKEUP chunks read and src may hold more: edge-triggered, no event will
        say so again, so carry on at the loop's next turn (after the others had theirs)."""
        self.loop.call_soon(self._resume, to_the_end)

    def _resume(self, to_the_end: int) -> None:
        if self.reading and not self.waiting:
            self._read(to_the_end)

    def _blocked(self, holding: bool) -> None:
        """src had nothing (let the empty carrier go), or dst took none of the chunk (wait)."""
        if holding:
            self.waiting = True  # writable(dst) calls on_writable
        else:
            self._drop_carrier()

    def _peer_closed(self, exc: OSError) -> bool:
        """A reset read from a socket that has none (emulated vsock): src's peer closed.

        Every byte it sent was read before the reset was reported, or is still queued when
        the reset came first; either way what follows is data, then EOF: read on to the end.
        """
        if exc.errno != errno.ECONNRESET or not peer_close_is_eof(self.src) or self.in_hand():
            return False  # not a read's error: a write to dst failed with bytes in hand
        self._drop_carrier()
        self.loop.call_soon(self._resume, _TO_THE_END)
        return True

    def on_writable(self) -> None:
        if not self.waiting:
            return
        try:
            if not self._write_held():
                return
        except OSError as exc:
            self._fail(exc)
            return
        self.waiting = False
        # What arrived while we waited made no new event (edge-triggered): read to the end.
        self._read(_TO_THE_END)

    def _finish(self) -> None:
        self.stop()
        self.finished = True
        relay = self.relay
        if relay.pumps_finished():  # both directions are done: the close ends the streams
            info(self.done_message)
        elif self.dst is relay.upstream and not relay.upstream_half_close:
            relay.eof_held = True
            info(f"{self.done_message} (end held: {HELD_EOF})")
        else:
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    relay.fail(exc)
                    return
            info(self.done_message)
        relay.pump_finished()

    def _fail(self, exc: OSError) -> None:
        # Drop the chunk in hand now, not when the relay is torn down on a later turn of the
        # loop: in a burst of failing writes (peers gone), every pump would otherwise hold
        # its carrier and the next ones allocate new 1 MiB buffers, hundreds at once.
        self.stop()
        self.relay.fail(exc)

    def stop(self) -> None:
        self.reading = self.waiting = False
        self._drop_carrier()


class _SplicePump(_Pump):
    """src -> pipe -> dst with splice(2): the bytes never enter user space."""

    __slots__ = ("in_pipe", "pipe", "spliced_from")

    def __init__(
        self, relay: Relay, src: socket.socket, dst: socket.socket, done_message: str
    ) -> None:
        super().__init__(relay, src, dst, done_message)
        self.pipe: tuple[int, int] | None = None  # borrowed while it holds bytes
        self.in_pipe = 0  # bytes in the pipe not yet written to dst
        self.spliced_from = 0  # self.bytes when this pump took over: none spliced while equal

    def _read(self, to_the_end: int) -> None:
        try:
            for _ in _READS:
                pipe = self.pipe = _free_pipes.pop() if _free_pipes else _make_pipe()
                count = self.in_pipe = _splice(
                    self.src_fd, pipe[1], PIPE_SIZE, None, None, SPLICE_FLAGS
                )
                if count == 0:
                    self._finish()
                    return
                self.bytes += count
                if self.relay.idle_timeout:
                    self.relay.last_activity = self.loop.time()
                self.in_pipe -= _splice(pipe[0], self.dst_fd, count, None, None, SPLICE_FLAGS)
                if self.in_pipe:
                    self.waiting = True  # dst took part of the chunk
                    return
                self.pipe = None
                if len(_free_pipes) < FREE_CARRIERS_KEPT:
                    _free_pipes.append(pipe)
                else:
                    _close_pipe(pipe)
                if count < PIPE_SIZE and not to_the_end:
                    return  # src is drained; save the read that would say so (EAGAIN)
            self._more(to_the_end)
        except BlockingIOError:
            self._blocked(holding=self.in_pipe > 0)
        except OSError as exc:
            if (_cannot_splice(exc) and self.bytes == self.spliced_from) or _out_of_descriptors(
                exc
            ):
                self._switch_to_copy()
            elif not self._peer_closed(exc):
                self._fail(exc)

    def in_hand(self) -> bool:
        return self.in_pipe > 0

    def _write_held(self) -> bool:
        assert self.pipe is not None
        while self.in_pipe:
            try:
                self.in_pipe -= _splice(
                    self.pipe[0], self.dst_fd, self.in_pipe, None, None, SPLICE_FLAGS
                )
            except BlockingIOError:
                return False
        self._drop_carrier()
        return True

    def _drop_carrier(self) -> None:
        """Give the pipe back to the pool, or close it if it holds bytes dst never took."""
        pipe, self.pipe = self.pipe, None
        if pipe is None:
            return
        if self.in_pipe or len(_free_pipes) >= FREE_CARRIERS_KEPT:
            _close_pipe(pipe)
        else:
            _free_pipes.append(pipe)
        self.in_pipe = 0

    def _switch_to_copy(self) -> None:
        """Carry on through user space: splice is refused for src, or no pipe can be made
        for want of descriptors (no reason to fail the connection). Nothing is in hand."""
        log.debug("no splice for %s, copying through user space", self.done_message)
        self.stop()
        copy = _CopyPump(self.relay, self.src, self.dst, self.done_message)
        copy.may_splice = False
        copy.bytes = self.bytes
        self.relay.replace_pump(self, copy)
        copy._read(_TO_THE_END)


class _CopyPump(_Pump):
    """src -> buffer -> dst with recv_into and send, on a reusable buffer."""

    __slots__ = ("buffer", "filled", "may_splice", "sent")

    def __init__(
        self, relay: Relay, src: socket.socket, dst: socket.socket, done_message: str
    ) -> None:
        super().__init__(relay, src, dst, done_message)
        self.buffer: memoryview | None = None  # borrowed while it holds bytes
        self.sent = self.filled = 0  # buffer[sent:filled] is not yet written to dst
        self.may_splice = relay.splice  # move to splice when the reads grow (SPLICE_FROM)

    def _switch_to_splice(self, to_the_end: int) -> None:
        """Bulk: carry on with splice. Nothing is in hand."""
        self.stop()
        pump = _SplicePump(self.relay, self.src, self.dst, self.done_message)
        pump.bytes = pump.spliced_from = self.bytes
        self.relay.replace_pump(self, pump)
        pump._read(to_the_end)

    def _read(self, to_the_end: int) -> None:
        try:
            for _ in _READS:
                buffer = self.buffer = _free_buffers.pop() if _free_buffers else _make_buffer()
                count = self.filled = self.src.recv_into(buffer)
                if count == 0:
                    self._finish()
                    return
                self.bytes += count
                if self.relay.idle_timeout:
                    self.relay.last_activity = self.loop.time()
                self.sent = self.dst.send(buffer[:count])
                if self.sent < count:
                    self.waiting = True  # dst took part of the chunk
                    return
                self.buffer = None
                self.sent = self.filled = 0
                if len(_free_buffers) < FREE_CARRIERS_KEPT:
                    _free_buffers.append(buffer)
                if count >= SPLICE_FROM and self.may_splice:
                    self._switch_to_splice(to_the_end)
                    return
                if count < COPY_CHUNK and not to_the_end:
                    return  # src is drained; save the read that would say so (EAGAIN)
            self._more(to_the_end)
        except BlockingIOError:
            self._blocked(holding=self.filled > 0)
        except OSError as exc:
            if not self._peer_closed(exc):
                self._fail(exc)

    def in_hand(self) -> bool:
        return self.filled > self.sent

    def _write_held(self) -> bool:
        buffer = self.buffer
        assert buffer is not None
        while self.sent < self.filled:
            try:
                self.sent += self.dst.send(buffer[self.sent : self.filled])
            except BlockingIOError:
                return False
        self._drop_carrier()
        return True

    def hold(self, first: bytes) -> None:
        """Start with `first` in hand, to be written to dst before anything read from src."""
        self.buffer = memoryview(first)
        self.sent, self.filled = 0, len(first)
        self.waiting = True  # writable(dst) writes it, then reads src

    def _drop_carrier(self) -> None:
        """Give the buffer back to the pool (bytes left in it are simply overwritten)."""
        buffer, self.buffer = self.buffer, None
        if (
            buffer is not None
            and len(buffer) == COPY_CHUNK
            and len(_free_buffers) < FREE_CARRIERS_KEPT
        ):
            _free_buffers.append(buffer)
        self.sent = self.filled = 0


def _cannot_splice(exc: OSError) -> bool:
    return exc.errno in _SPLICE_REFUSED


def _out_of_descriptors(exc: OSError) -> bool:
    return exc.errno in (errno.EMFILE, errno.ENFILE)


_free_pipes: list[tuple[int, int]] = []
_free_buffers: list[memoryview] = []
_splice = os.splice  # module-level names: they run for every chunk


def _make_buffer() -> memoryview:
    # An anonymous mapping, not a bytearray: its pages are not zero-filled up front, and
    # when the pool lets it go they return to the system at once (freed 1 MiB bytearrays
    # stay in the allocator's heap, so memory would keep the high-water mark of a burst).
    return memoryview(mmap.mmap(-1, COPY_CHUNK))


def _make_pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over the user's pipe quota: the default 64 KiB pipe works, only slower
    return read_end, write_end


def _close_pipe(pipe: tuple[int, int]) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


class Relay:
    """Both directions between `inbound` and `upstream`, from `start()` until both are done.

    `forward_done` and `backward_done` are the log lines for EOF inbound->upstream and
    upstream->inbound; `first_bytes` are written upstream before anything read inbound, and
    `first_bytes_back` inbound before anything read upstream. `upstream_half_close`: the
    upstream endpoint's `half_close` (if False, the inbound's EOF is held, not passed on).
    When the relay ends, both sockets are closed (reset, after a failure) and `on_done` is
    called once, with None or with what failed: an OSError, a TimeoutError (idle timeout),
    or CancelledError (`abort`).
    """

    # A relay and its two pumps live as long as their connection: with slots, the three
    # take less memory per idle connection (benchmarks: `python -m benchmarks --only memory`).
    __slots__ = ("_idle_timer", "_on_done", "ended", "eof_held", "events", "idle_timeout",
                 "inbound", "last_activity", "loop", "pumps", "splice", "upstream",
                 "upstream_half_close")  # fmt: skip

    def __init__(
        self,
        inbound: socket.socket,
        upstream: socket.socket,
        forward_done: str,
        backward_done: str,
        *,
        first_bytes: bytes = b"",
        first_bytes_back: bytes = b"",
        use_splice: bool | None = None,
        idle_timeout: float | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        upstream_half_close: bool = True,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.upstream_half_close = upstream_half_close
        self.eof_held = False  # the inbound's EOF was not passed on (see upstream_half_close)
        self.events = poller(self.loop)
        self.inbound, self.upstream = inbound, upstream
        self.splice = use_splice_default if use_splice is None else use_splice
        forward = _CopyPump(self, inbound, upstream, forward_done)
        if first_bytes:
            forward.hold(first_bytes)
        backward = _CopyPump(self, upstream, inbound, backward_done)
        if first_bytes_back:
            backward.hold(first_bytes_back)
        # Each pump moves to splice when its reads grow (SPLICE_FROM).
        self.pumps: list[_Pump] = [forward, backward]
        self.idle_timeout = idle_timeout
        self.last_activity = self.loop.time()
        self.ended = False
        self._on_done: Callable[[BaseException | None], None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    def replace_pump(self, old: _Pump, new: _Pump) -> None:
        self.pumps[self.pumps.index(old)] = new

    def pumps_finished(self) -> bool:
        return self.pumps[0].finished and self.pumps[1].finished

    def pump_finished(self) -> None:
        if self.pumps_finished():
            self._end(None)

    def _on_inbound_events(self, events: int) -> None:
        forward, backward = self.pumps
        if events & _WRITE_EVENTS:
            backward.on_writable()
        if events & _READ_EVENTS:
            forward.on_readable(events)

    def _on_upstream_events(self, events: int) -> None:
        forward, backward = self.pumps
        if events & _WRITE_EVENTS:
            forward.on_writable()
        if events & _READ_EVENTS:
            backward.on_readable(events)

    def fail(self, exc: BaseException) -> None:
        self._end(exc)

    def abort(self) -> None:
        """End now (the drain is over): both sockets are reset and closed."""
        self._end(asyncio.CancelledError())

    def start(
        self, on_done: Callable[[BaseException | None], None], upstream_events: int | None = None
    ) -> None:
        """Relay from now on. `upstream_events`: the upstream socket is in the loop's
        Poller already (its connect was waited for there), and these are the events its
        last wakeup brought, handled now (edge-triggered: none will come again)."""
        self._on_done = on_done
        events = self.events
        try:
            for sock in (self.inbound, self.upstream):
                if sock.gettimeout() != 0.0:  # non-blocking already, as a rule: no syscall
                    sock.setblocking(False)
            events.watch(self.inbound.fileno(), self._on_inbound_events)
            if upstream_events is None:
                events.watch(self.upstream.fileno(), self._on_upstream_events)
            else:
                events.handle(self.upstream.fileno(), self._on_upstream_events)
        except OSError as exc:
            self._end(exc)
            return
        if self.idle_timeout:
            self._idle_timer = self._schedule_idle_check()
        if upstream_events:
            self._on_upstream_events(upstream_events)

    async def run(self) -> None:
        """`start`, and wait for the end: raise what failed. Cancelled, it `abort`s."""
        done: asyncio.Future[BaseException | None] = self.loop.create_future()

        def on_done(error: BaseException | None) -> None:
            if not done.done():  # else cancelled: abort() below ends the relay
                done.set_result(error)

        self.start(on_done)
        try:
            error = await done
        except asyncio.CancelledError:
            self.abort()
            raise
        if error is not None:
            raise error

    def _end(self, error: BaseException | None) -> None:
        """Stop both pumps, close both sockets, tell `on_done`: once, and never raising
        before the sockets are closed."""
        if self.ended:
            return
        self.ended = True
        events = self.events
        try:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            for pump in self.pumps:
                pump.stop()
            events.forget(self.inbound.fileno())  # closing takes a socket out of the epoll set
            events.forget(self.upstream.fileno())
        finally:  # the sockets are closed whatever stopping the pumps did
            for sock in (self.inbound, self.upstream):
                if error is None:
                    sock.close()
                else:
                    close_abortively(sock)
        if self._on_done is not None:
            self._on_done(error)

    def _schedule_idle_check(self) -> asyncio.TimerHandle:
        assert self.idle_timeout is not None
        due = self.last_activity + self.idle_timeout
        return self.loop.call_at(due, self._check_idle)

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        if self.ended:
            return
        if self.loop.time() - self.last_activity >= self.idle_timeout:
            if self.eof_held:  # the client is done, and the reply had its time: a clean end
                info(
                    f"{self.pumps[1].done_message}: idle for {self.idle_timeout:g} s with the "
                    "client's end held (hybrid vsock cannot pass a half-close)"
                )
                self._end(None)
            else:
                self.fail(TimeoutError(f"no traffic for {self.idle_timeout:g} s (idle timeout)"))
        else:
            self._idle_timer = self._schedule_idle_check()

    @property
    def bytes_forward(self) -> int:
        return self.pumps[0].bytes

    @property
    def bytes_backward(self) -> int:
        return self.pumps[1].bytes
