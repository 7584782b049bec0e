"""``--workers N``: one command served by N processes, supervised by the one systemd started.

The parent binds every listening socket before it forks (so a port in use is exit 1 at
start, as with one process), then forks the workers before any event loop or thread exists;
each worker runs the command's ordinary event loop on the sockets the parent handed it. The
parent never touches a connection. It:

- says READY=1 to systemd once every worker has reported, through a pipe, that it listens;
- on SIGTERM or SIGINT says STOPPING=1, closes its own copies of the listening sockets (so,
  as with one process, new connections are refused from then on), sends SIGTERM to each
  worker (each drains its connections as one process would) and exits 0 when they all did;
- restarts a worker that dies while serving (its connections are lost; the others' are
  not), at most once a second per worker; a worker that exits before it was ready is a
  start-up failure: the others are stopped and the parent exits 1.

Workers die with the parent (PR_SET_PDEATHSIG), so a killed parent leaves no worker holding
the port. Each worker's log lines start with ``[worker K]``; its connection limit is computed
from the open-file limit of its own process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from pf_proxy import runtime

log = logging.getLogger("pf_proxy")

PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal this process gets when its parent dies
RESTART_INTERVAL = 1.0  # seconds: a worker that keeps dying is restarted at most this often
_STOP_SIGNALS = runtime.STOP_SIGNALS


@dataclass
class _Worker:
    index: int  # 1..N
    pid: int = 0
    started: float = 0.0
    ready: bool = False
    exit_code: int | None = None  # once reaped


def _exit_code(status: int) -> int:
    """A wait status as a shell shows it: the exit code, or 128 + the signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(code))
    if os.getppid() != parent:  # the parent died before prctl: nobody would stop us
        os._exit(1)


class Supervisor:
    """Forks ``count`` workers that run ``work(index)`` (index 1..count, its exit code) and
    looks after them until they have all exited; :meth:`run` returns the command's exit code.

    ``stop_listening`` closes the parent's copies of the listening sockets (at the drain).
    """

    def __init__(
        self, count: int, work: Callable[[int], int], stop_listening: Callable[[], None]
    ) -> None:
        self.workers = [_Worker(index) for index in range(1, count + 1)]
        self.work = work
        self.stop_listening = stop_listening
        self.stopping = False
        self.failed = False  # a worker failed to start: exit 1
        self.all_ready_said = False
        self._ready_read, self._ready_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop_requested = False

    # --- the parent ------------------------------------------------------------------------

    def run(self) -> int:
        previous_wakeup = signal.set_wakeup_fd(self._wake_write)
        handlers = {signum: signal.signal(signum, self._on_stop_signal) for signum in _STOP_SIGNALS}
        handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._ready_read, selectors.EVENT_READ)
                selector.register(self._wake_read, selectors.EVENT_READ)
                for worker in self.workers:
                    self._start(worker)
                while any(worker.exit_code is None or self._restart_due(worker) is not None
                          for worker in self.workers):  # fmt: skip
                    selector.select(self._next_timeout())
                    self._drain_wakeups()
                    self._read_ready()
                    self._reap()
                    if self._stop_requested and not self.stopping:
                        self._stop("SIGTERM or SIGINT received")
                    self._restart_due_workers()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in handlers.items():
                # The stop signals stay ignored until the exit: their default action would
                # turn this drained command's exit code into 143 or 130.
                signal.signal(signum, signal.SIG_IGN if signum in _STOP_SIGNALS else handler)
            for fd in (self._ready_read, self._ready_write, self._wake_read, self._wake_write):
                os.close(fd)
        if self.failed:
            return 1
        codes = [worker.exit_code for worker in self.workers]
        log.info("All %d workers exited (exit codes %s)", len(codes), codes)
        return 0 if all(code == 0 for code in codes) else 1

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self._stop_requested = True

    def _start(self, worker: _Worker) -> None:
        if self.stopping:  # a worker not yet started when the command began to stop
            worker.exit_code = 1
            return
        parent = os.getpid()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            log.error("Failed to start worker %d: fork: %s", worker.index, exc)
            worker.exit_code = 1  # nothing to wait for
            self.failed = True
            self._stop("a worker could not be started")
            return
        if pid == 0:
            self._become_worker(worker, parent)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        worker.pid, worker.started = pid, time.monotonic()
        worker.ready, worker.exit_code = False, None
        log.info("Worker %d started (pid %d)", worker.index, pid)

    def _read_ready(self) -> None:
        try:
            reported = os.read(self._ready_read, 4096)  # a byte per worker: its index
        except BlockingIOError:
            reported = b""
        for index in reported:
            self.workers[index - 1].ready = True
        if not self.all_ready_said and all(worker.ready for worker in self.workers):
            self.all_ready_said = True
            log.info("All %d workers ready", len(self.workers))
            runtime.systemd_notify("READY=1")

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((worker for worker in self.workers if worker.pid == pid), None)
            if worker is None:
                continue
            worker.exit_code = _exit_code(status)
            if self.stopping:
                continue
            if not worker.ready:
                log.error(
                    "Worker %d (pid %d) exited before it was ready (exit code %d); stopping",
                    worker.index, pid, worker.exit_code,
                )  # fmt: skip
                self.failed = True
                self._stop("a worker failed to start")
            else:
                log.error(
                    "Worker %d (pid %d) exited while serving (exit code %d); restarting it",
                    worker.index, pid, worker.exit_code,
                )  # fmt: skip

    def _restart_due(self, worker: _Worker) -> float | None:
        """When a dead worker is to be restarted (monotonic time), or None if it is not."""
        if worker.exit_code is None or self.stopping or not worker.ready:
            return None
        return worker.started + RESTART_INTERVAL

    def _next_timeout(self) -> float | None:
        due = [when for worker in self.workers if (when := self._restart_due(worker)) is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _restart_due_workers(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            when = self._restart_due(worker)
            if when is not None and when <= now:
                self._start(worker)

    def _stop(self, why: str) -> None:
        """Stop serving: refuse new connections, and let every worker drain."""
        self.stopping = True
        alive = [worker for worker in self.workers if worker.exit_code is None and worker.pid]
        log.info("Shutting down: %s; stopping %d workers", why, len(alive))
        runtime.draining(f"{why}: stopping {len(alive)} workers")
        self.stop_listening()
        for worker in alive:
            try:
                os.kill(worker.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # exited already: reaped next

    # --- a worker --------------------------------------------------------------------------

    def _become_worker(self, worker: _Worker, parent: int) -> None:
        """In the child: reset what the parent set up, run the work, exit with its code.

        SIGTERM and SIGINT stay blocked, as the parent blocked them around the fork, until
        the worker's event loop handles them (`runtime.stop_event`): one that arrives while
        the worker starts (the command stopping just as a worker is restarted) waits for the
        handlers and drains the worker, instead of killing it with exit code 143.
        """
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (self._ready_read, self._wake_read, self._wake_write):
                os.close(fd)
            _die_with_parent(parent)
            os.environ.pop("NOTIFY_SOCKET", None)  # only the parent speaks to systemd
            runtime.report_ready_to(self._ready_write, worker.index)
            runtime.configure_logging(prefix=f"[worker {worker.index}] ")
            code = self.work(worker.index)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            log.exception("Worker %d failed", worker.index)
        finally:
            logging.shutdown()
            os._exit(code)
