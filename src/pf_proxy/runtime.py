"""Process set-up shared by every command: logging, the event loop, limits, systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TextIO

from pf_proxy import metrics
from pf_proxy.current import log_prefix
from pf_proxy.endpoints import BindError, IpAddress, emulation_dir_from_env
from pf_proxy.loops import LOOP_ENV, LOOPS, import_uvloop

log = logging.getLogger("pf_proxy")


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class _Formatter(logging.Formatter):
    """logging's default time format, with the date and time formatted once a second.

    The TCP proxies log three lines per connection; at thousands of connections a second,
    strftime for every line was a visible share of a proxy's time, and formatting the
    timestamp for every line another 5% of a short connection's CPU time
    (benchmarks/cpucost.py: 161 against 170 us, medians of 8 alternating runs).
    """

    _second = -1
    _second_text = ""
    _stamp_at = (-1, -1)  # the (second, millisecond) of _stamp
    _stamp = ""  # what an INFO line starts with in that millisecond

    def __init__(self, stamped: bool, prefix: str) -> None:
        timestamp = "%(asctime)s " if stamped else ""
        super().__init__(f"{timestamp}%(levelname)s {prefix}%(proxy)s%(message)s")
        self.stamped = stamped
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        record.proxy = log_prefix()  # the proxy's name under `pf-proxy run`, else ""
        return super().format(record)

    def info_line(self, message: str) -> str:
        """What `format` makes of an INFO record of `message`, without the record (its
        start made once a millisecond: a busy proxy logs several lines in each)."""
        if not self.stamped:
            return f"INFO {self.prefix}{log_prefix()}{message}\n"
        now = time.time()
        second = int(now)
        at = second, int((now - second) * 1000)  # as LogRecord.msecs
        if at != self._stamp_at:
            self._stamp = f"{self._date_and_time(second)},{at[1]:03d} INFO {self.prefix}"
            self._stamp_at = at
        return self._stamp + log_prefix() + message + "\n"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        return f"{self._date_and_time(second)},{int(record.msecs):03d}"  # as default_msec_format

    def _date_and_time(self, second: int) -> str:
        """The date and time of `second` as the default format has them (made once a second)."""
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return self._second_text


def _line(handler: logging.Handler, record: logging.LogRecord) -> str | None:
    """`record` formatted as one line; None (after logging's own report) if it cannot be."""
    try:
        return handler.format(record) + "\n"
    except Exception:
        handler.handleError(record)
        return None


class _LoopFlushedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that, on a running event loop, writes at most every FLUSH_DELAY.

    The relays log up to three INFO lines per connection, each in a different turn of the
    loop; flushed one by one, each line was a write(2) of its own (three of a short
    connection's 43 system calls). Now the lines of FLUSH_DELAY seconds go out together.
    Without a running loop (start-up, shutdown, other threads) every line is written at once.
    An INFO line waits at most FLUSH_DELAY (or until WRITE_SIZE bytes are held), so a process
    killed by SIGKILL loses at most that much INFO; SIGTERM, SIGINT and normal exits lose
    none (logging.shutdown flushes). Warnings and errors never wait: see `_AtOnceHandler`.

    Lines are written whole, in writes of at most PIPE_BUF bytes where they fit: such a
    write to a pipe is atomic, so the workers of ``--workers N``, which share one stdout,
    never cut into each other's lines.
    """

    FLUSH_DELAY = 0.05
    WRITE_SIZE = 4096  # PIPE_BUF on Linux (limits.h)
    _flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._size = 0  # bytes in _lines (characters, for ASCII lines)

    def emit(self, record: logging.LogRecord) -> None:
        line = _line(self, record)
        if line is not None:
            self.add_line(line)

    def add_line(self, line: str) -> None:
        """Write `line` (whole, newline included) with the others of this FLUSH_DELAY."""
        size = len(line) if line.isascii() else len(line.encode())
        if self._size + size > self.WRITE_SIZE:
            self._write()
        self._lines.append(line)
        self._size += size
        self.flush()

    def flush(self) -> None:
        if self._flush_on is not None and self._flush_on.is_running():
            return  # a flush is on its way (checked first: finding the loop costs a getpid)
        loop = asyncio._get_running_loop()
        if loop is None:
            self._flush_now()
        else:
            self._flush_on = loop
            loop.call_later(self.FLUSH_DELAY, self._flush_now)

    def _flush_now(self) -> None:
        self._flush_on = None
        self._write()

    def write_held(self) -> None:
        """Write the lines held now (the scheduled flush then finds none)."""
        self._write()

    def _write(self) -> None:
        """Write the lines held, in one write(2) (each call holds at most WRITE_SIZE bytes,
        or one longer line)."""
        if not self._lines:
            return
        text, self._lines, self._size = "".join(self._lines), [], 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stdout gone (a closed pipe): nothing to tell, nowhere to tell it


class _AtOnceHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The WARNING-and-above handler: each line is written the moment it is logged, after
    the INFO lines `earlier` holds (flushed first, so the two streams keep their order where
    they meet, as in the journal or a supervisord log).

    These are the lines that explain a failure, and the last ones before an end the process
    does not choose (the OOM killer's or a supervisor's SIGKILL): they must not wait in a
    buffer the process dies with.
    """

    def __init__(self, stream: TextIO, earlier: _LoopFlushedHandler) -> None:
        super().__init__(stream)
        self.earlier = earlier

    def emit(self, record: logging.LogRecord) -> None:
        line = _line(self, record)
        if line is None:
            return
        self.earlier.write_held()
        try:
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr gone (a closed pipe): nothing to tell, nowhere to tell it


def configure_logging(level: int = logging.INFO, prefix: str = "") -> None:
    """Information to stdout, warnings and errors to stderr (as the originals print), each
    message after `prefix` (a worker's ``[worker K] ``).

    Under systemd (JOURNAL_STREAM set) the journal adds its own timestamps.
    """
    global _quick
    formatter = _Formatter(stamped=not os.environ.get("JOURNAL_STREAM"), prefix=prefix)
    # No log line shows where, in which thread or in which process it was made: skip
    # finding out (the logging HOWTO's "Optimization"), per line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    out = _LoopFlushedHandler(sys.stdout)
    out.addFilter(_BelowWarning())
    err = _AtOnceHandler(sys.stderr, earlier=out)
    err.setLevel(logging.WARNING)
    root = logging.getLogger()
    for old in root.handlers:
        old.flush()
    root.handlers.clear()
    for handler in (out, err):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)
    _quick = (root.handlers, out, formatter)


# The handlers configure_logging installed, the one for INFO lines, and its formatter.
_quick: tuple[list[logging.Handler], _LoopFlushedHandler, _Formatter] | None = None


def info(message: str) -> None:
    """`log.info(message)` for the lines logged for every connection, at a fraction of its
    cost: while the handlers `configure_logging` installed are the only ones, the line goes
    straight to the INFO handler, the way that handler would write it. (A LogRecord, the
    logger's and handlers' checks and the formatting took a fifth of a short connection's
    CPU time for its three lines; benchmarks/cpucost.py.) Anywhere else (a test's log
    capture, another handler) it is `log.info`.
    """
    quick = _quick
    if (
        quick is not None
        and len(quick[0]) == 2
        and quick[0][0] is quick[1]
        and log.isEnabledFor(logging.INFO)
    ):
        quick[1].add_line(quick[2].info_line(message))
    else:
        log.info("%s", message)


def start_logging() -> None:
    """Configure logging for a command; say so when vsock is emulated."""
    configure_logging()
    emulation_dir = emulation_dir_from_env()
    if emulation_dir is not None:
        log.info(
            "vsock emulation on: vsock CID:PORT is the Unix socket %s/CID_PORT.sock", emulation_dir
        )


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


# Descriptors kept for everything but connections (or UDP flows): the event loop's own, the
# relay's pool of spare pipes, name resolution; with --metrics, the metrics listener's
# waiting connections too (`run` adds them).
SPARE_FDS = 64
_spare_fds = SPARE_FDS
MIN_CONNECTION_LIMIT = 8


def open_file_limit() -> int:
    """The soft RLIMIT_NOFILE now (after `raise_open_file_limit`); unlimited reads as 2**30."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft


def connection_limit(open_files: int, fds_per_connection: int) -> int:
    """How many connections (or UDP flows) of `fds_per_connection` descriptors each fit in
    `open_files` descriptors at once, the spare ones kept aside."""
    return max(MIN_CONNECTION_LIMIT, (open_files - _spare_fds) // fds_per_connection)


def systemd_notify(state: str) -> None:
    """Send `state` (e.g. READY=1) to systemd when NOTIFY_SOCKET is set; else do nothing."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("systemd notify %s to %s failed: %s", state, address, exc)


_ready_pipe: tuple[int, int] | None = None  # in a worker: (the pipe to the parent, its index)


def report_ready_to(fd: int, index: int) -> None:
    """In a worker of ``--workers``: :func:`ready` writes `index` to the parent's pipe `fd`."""
    global _ready_pipe
    _ready_pipe = (fd, index)


def ready() -> None:
    """The command serves: tell systemd (READY=1), or, in a worker, the parent."""
    if _ready_pipe is None:
        systemd_notify("READY=1")
        return
    fd, index = _ready_pipe
    try:
        os.write(fd, bytes([index]))
    except OSError as exc:
        log.warning("Could not tell the parent process that this worker is ready: %s", exc)


def chosen_loop() -> str | None:
    """The event loop PF_PROXY_LOOP names (uvloop when it is unset); None, and an error
    logged, for a name it does not know."""
    name = os.environ.get(LOOP_ENV, "uvloop")
    if name not in LOOPS:
        log.error("%s=%s: the event loop is one of %s", LOOP_ENV, name, ", ".join(LOOPS))
        return None
    if name != "uvloop":
        log.info("Event loop: %s (%s)", name, LOOP_ENV)
    return name


def run(
    main: Coroutine[Any, Any, int],
    loop: str,
    metrics_address: IpAddress | None = None,
    metrics_socket: socket.socket | None = None,
) -> int:
    """Run `main` on `loop` (`chosen_loop`'s answer; asyncio's loop also when uvloop is not
    installed); return `main`'s code.

    With `metrics_address`, /metrics and /healthz are served there (see :mod:`metrics`) from
    before `main` starts until it ends, on `metrics_socket` if it is bound already; if that
    address cannot be bound, exit 1 at once.
    """
    global _spare_fds
    limit = raise_open_file_limit()
    log.info("Open file limit: %d", limit)
    if metrics_address is not None:
        _spare_fds = SPARE_FDS + metrics.MAX_SCRAPERS
    serving = _serving(main, metrics_address, metrics_socket)
    try:
        uvloop = import_uvloop() if loop == "uvloop" else None
        if uvloop is not None:
            result: int = uvloop.run(serving)
            return result
        return asyncio.run(serving)
    finally:
        ignore_stop_signals()


def ignore_stop_signals() -> None:
    """From the end of the loop to the exit, SIGTERM and SIGINT are ignored, as during the
    drain: the loop's handlers are gone, and the default action would end a process that has
    drained cleanly with 143 (or 130) instead of its own exit code.

    `_serving` blocked them before its loop closed (closing it restores the default action);
    one that came since is pending, and is discarded once its action is to ignore it.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


async def _serving(
    main: Coroutine[Any, Any, int],
    metrics_address: IpAddress | None,
    metrics_socket: socket.socket | None,
) -> int:
    server = None
    if metrics_address is not None:
        try:
            server = await metrics.serve(metrics_address, metrics_socket)
        except BindError as exc:
            log.error("%s", exc)
            main.close()
            return 1
    try:
        return await main
    finally:
        if server is not None:
            server.close()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # see ignore_stop_signals


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_event() -> asyncio.Event:
    """An event SIGTERM or SIGINT sets, on the running loop.

    The two signals are unblocked once their handlers are in place: a worker of ``--workers``
    starts with them blocked (see :mod:`pf_proxy.workers`), so one that arrived while it was
    starting is handled now, as a drain, instead of killing it half-started.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    return stop


_drain_reasons: list[str] = []


def draining(reason: str) -> None:
    """The process stops taking new work: tell systemd (STOPPING=1, once) and /healthz (503,
    with each draining proxy's reason)."""
    if not _drain_reasons:
        systemd_notify("STOPPING=1")
    _drain_reasons.append(log_prefix() + reason)
    metrics.HEALTH.drain("; ".join(_drain_reasons))


class Stop:
    """How one proxy learns that it must stop taking new work and drain: because the process
    stops (SIGTERM or SIGINT), or because a reload removed or changed it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.process_stopping = False

    def set(self, process_stopping: bool) -> None:
        self.process_stopping = process_stopping
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()

    def draining(self, what: str) -> None:
        """The proxy drains (`what`: "draining 3 connections"): if the whole process stops,
        /healthz and systemd hear of it (see `draining`); a proxy a reload stops leaves the
        process serving."""
        if self.process_stopping:
            draining(f"SIGTERM or SIGINT received: {what}")
        else:
            log.info("Stopped by a reload: %s", what)


Ready = Callable[[], None]
