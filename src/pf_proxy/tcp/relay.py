"""The relay: copy bytes both ways between two connected non-blocking sockets.

Each direction is a `_Pump` driven by the event loop's readiness callbacks:

    readable(src) -> move a chunk out of src -> write it to dst
                                             -> dst full? stop reading src, wait writable(dst)
    EOF on src    -> shutdown(dst, SHUT_WR) (half-close); the other direction keeps flowing

On Linux the chunk moves through a pipe with splice(2) and never enters user space. Where the
kernel refuses splice for a socket type, or no pipe can be made for want of descriptors, that
direction falls back to recv_into a reusable buffer. Either way at most one chunk per
direction is held: a slow reader slows the writer, and memory stays bounded.

The pipe or buffer that carries a chunk (its *carrier*) is borrowed from a small pool of
empty ones for the read and given back as soon as dst has taken the whole chunk; only a
direction waiting for dst to drain keeps one. So an idle connection costs only its two
sockets, and the hot path neither creates pipes nor allocates buffers.

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
import socket

from pf_proxy.endpoints import close_abortively, peer_close_is_eof

log = logging.getLogger("pf_proxy")

# Splice path: at most this much per read, and per stalled direction. On loopback (one stream,
# see benchmarks/) 512 KiB pipes carried 11.8 Gbit/s, 256 KiB ones 9.4 and 1 MiB ones 11.3;
# 4 MiB ones 7.6. Of the two best, 512 KiB holds half as much in a stalled direction.
PIPE_SIZE = 512 * 1024
# Copy path: at most this much per read, and per stalled direction. Bigger than the pipe: each
# chunk costs a wakeup and two copies through user space, and on loopback 1 MiB chunks carried
# 16 Gbit/s where 256 KiB ones carried 12 (one stream, see benchmarks/).
COPY_CHUNK = 1024 * 1024
READS_PER_WAKEUP = 4  # bounded, so one busy connection cannot starve the others
_READS = range(READS_PER_WAKEUP)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
SOL_SOCKET, SO_ERROR = socket.SOL_SOCKET, socket.SO_ERROR

FREE_CARRIERS_KEPT = 8  # empty pipes (and buffers) kept for reuse; the rest are closed (freed)

# Errors that mean "splice is not supported between these two files", not a broken socket.
_SPLICE_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)

use_splice_default = hasattr(os, "splice") and os.environ.get("PF_PROXY_NO_SPLICE") != "1"


# _PENDING_ERROR: when readiness comes with an error (a reset right behind the last bytes),
# uvloop calls the reader once and then stops watching the socket: an error not found in that
# call is never reported, and the relay would wait for ever. So a wakeup that stops reading
# before src said EAGAIN asks for the error src holds (SO_ERROR reads and clears it).


class _Pump:
    """One direction of a relay: src -> dst, then half-close dst.

    The control flow both paths share. A subclass moves the bytes: its `_on_readable` reads a
    chunk into its carrier and writes it on, all inline because it runs for every chunk (on
    the 2-core benchmark machine, the method calls it had cost 1-byte ping-pong about 10% of
    its rate); `_write_held` writes what dst did not take at once, and `_drop_carrier` lets
    go of the carrier.
    """

    def __init__(
        self, relay: Relay, src: socket.socket, dst: socket.socket, done_message: str
    ) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.done_message = done_message
        self.finished = False
        self.bytes = 0

    def start(self) -> None:
        self.loop.add_reader(self.src_fd, self._on_readable)

    def _on_readable(self) -> None:
        raise NotImplementedError

    def _write_held(self) -> bool:
        """Write the chunk in hand to dst; False if dst is full (the rest waits)."""
        raise NotImplementedError

    def _drop_carrier(self) -> None:
        raise NotImplementedError

    def _blocked(self, holding: bool) -> None:
        """src had nothing (let the empty carrier go), or dst took none of the chunk (wait)."""
        if holding:
            self._wait_for_dst()
        else:
            self._drop_carrier()

    def _peer_closed(self, exc: OSError) -> bool:
        """A reset read from a socket that has none (emulated vsock): src's peer closed.

        Every byte it sent was read before the reset was reported, or is still queued when
        the reset was found by the SO_ERROR check; either way what follows is data, then EOF.
        uvloop stops watching a socket whose readiness came with an error, so watch src (and
        dst, should it wait to write there) afresh, and read on as usual.
        """
        if exc.errno != errno.ECONNRESET or not peer_close_is_eof(self.src) or self.in_hand():
            return False  # not a read's error: a write to dst failed with bytes in hand
        self._drop_carrier()
        self.loop.remove_reader(self.src_fd)
        self.loop.add_reader(self.src_fd, self._on_readable)
        return True

    def in_hand(self) -> bool:
        """Whether bytes read from src wait to be written to dst."""
        raise NotImplementedError

    def _wait_for_dst(self) -> None:
        """dst is full: stop reading src until dst has taken the chunk in hand."""
        self.loop.remove_reader(self.src_fd)
        self.loop.add_writer(self.dst_fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            if not self._write_held():
                return
        except OSError as exc:
            self._fail(exc)
            return
        self.loop.remove_writer(self.dst_fd)
        self.loop.add_reader(self.src_fd, self._on_readable)

    def _finish(self) -> None:
        self.stop()
        self.finished = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                self.relay.fail(exc)
                return
        log.info(self.done_message)
        self.relay.pump_finished()

    def _fail(self, exc: OSError) -> None:
        # Drop the chunk in hand now, not when the relay is torn down on a later turn of the
        # loop: in a burst of failing writes (peers gone), every pump would otherwise hold
        # its carrier and the next ones allocate new 1 MiB buffers, hundreds at once.
        self.stop()
        self.relay.fail(exc)

    def stop(self) -> None:
        self.loop.remove_reader(self.src_fd)
        self.loop.remove_writer(self.dst_fd)
        self._drop_carrier()


class _SplicePump(_Pump):
    """src -> pipe -> dst with splice(2): the bytes never enter user space."""

    def __init__(
        self, relay: Relay, src: socket.socket, dst: socket.socket, done_message: str
    ) -> None:
        super().__init__(relay, src, dst, done_message)
        self.pipe: tuple[int, int] | None = None  # borrowed while it holds bytes
        self.in_pipe = 0  # bytes in the pipe not yet written to dst

    def _on_readable(self) -> None:
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
                    self._wait_for_dst()  # dst took part of the chunk
                    return
                self.pipe = None
                if len(_free_pipes) < FREE_CARRIERS_KEPT:
                    _free_pipes.append(pipe)
                else:
                    _close_pipe(pipe)
                if count < PIPE_SIZE:
                    break  # src is drained; save the read that would say so (EAGAIN)
            error = self.src.getsockopt(SOL_SOCKET, SO_ERROR)  # see _PENDING_ERROR
            if error:
                raise OSError(error, os.strerror(error))
        except BlockingIOError:
            self._blocked(holding=self.in_pipe > 0)
        except OSError as exc:
            if (_cannot_splice(exc) and not self.bytes) or _out_of_descriptors(exc):
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
        copy.bytes = self.bytes
        self.relay.replace_pump(self, copy)
        copy.start()


class _CopyPump(_Pump):
    """src -> buffer -> dst with recv_into and send, on a reusable buffer."""

    def __init__(
        self, relay: Relay, src: socket.socket, dst: socket.socket, done_message: str
    ) -> None:
        super().__init__(relay, src, dst, done_message)
        self.buffer: memoryview | None = None  # borrowed while it holds bytes
        self.sent = self.filled = 0  # buffer[sent:filled] is not yet written to dst

    def _on_readable(self) -> None:
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
                    self._wait_for_dst()  # dst took part of the chunk
                    return
                self.buffer = None
                self.sent = self.filled = 0
                if len(_free_buffers) < FREE_CARRIERS_KEPT:
                    _free_buffers.append(buffer)
                if count < COPY_CHUNK:
                    break  # src is drained; save the read that would say so (EAGAIN)
            error = self.src.getsockopt(SOL_SOCKET, SO_ERROR)  # see _PENDING_ERROR
            if error:
                raise OSError(error, os.strerror(error))
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

    def _drop_carrier(self) -> None:
        """Give the buffer back to the pool (bytes left in it are simply overwritten)."""
        buffer, self.buffer = self.buffer, None
        if buffer is not None and len(_free_buffers) < FREE_CARRIERS_KEPT:
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
    """Both directions between `inbound` and `upstream`; `run()` returns when both are done.

    `forward_done` and `backward_done` are the log lines for EOF inbound->upstream and
    upstream->inbound. Failures raise from `run()` after both sockets were reset and closed.
    """

    def __init__(
        self,
        inbound: socket.socket,
        upstream: socket.socket,
        forward_done: str,
        backward_done: str,
        *,
        use_splice: bool | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.inbound, self.upstream = inbound, upstream
        splice = use_splice_default if use_splice is None else use_splice
        pump = _SplicePump if splice else _CopyPump
        self.pumps: list[_Pump] = [
            pump(self, inbound, upstream, forward_done),
            pump(self, upstream, inbound, backward_done),
        ]
        self.idle_timeout = idle_timeout
        self.last_activity = self.loop.time()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._idle_timer: asyncio.TimerHandle | None = None

    def replace_pump(self, old: _Pump, new: _Pump) -> None:
        self.pumps[self.pumps.index(old)] = new

    def pump_finished(self) -> None:
        if all(pump.finished for pump in self.pumps) and not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    async def run(self) -> None:
        clean = False
        try:
            for sock in (self.inbound, self.upstream):
                sock.setblocking(False)
            for pump in self.pumps:
                pump.start()
            if self.idle_timeout:
                self._idle_timer = self._schedule_idle_check()
            await self.done
            clean = True
        finally:
            try:
                if self._idle_timer is not None:
                    self._idle_timer.cancel()
                for pump in self.pumps:
                    pump.stop()
            finally:  # the sockets are closed whatever stopping the pumps did
                for sock in (self.inbound, self.upstream):
                    if clean:
                        sock.close()
                    else:
                        close_abortively(sock)

    def _schedule_idle_check(self) -> asyncio.TimerHandle:
        assert self.idle_timeout is not None
        due = self.last_activity + self.idle_timeout
        return self.loop.call_at(due, self._check_idle)

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        if self.done.done():
            return
        if self.loop.time() - self.last_activity >= self.idle_timeout:
            self.fail(TimeoutError(f"no traffic for {self.idle_timeout:g} s (idle timeout)"))
        else:
            self._idle_timer = self._schedule_idle_check()

    @property
    def bytes_forward(self) -> int:
        return self.pumps[0].bytes

    @property
    def bytes_backward(self) -> int:
        return self.pumps[1].bytes

