"""The supervisor of --workers: when fork fails, the workers already started are stopped and
the command ends with exit 1, rather than waiting forever for workers that never were; a
SIGTERM that reaches a worker while it starts is handled once its loop runs."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import time
from collections.abc import Iterator

import pytest

from pf_proxy import runtime, workers


@pytest.fixture(autouse=True)
def _stop_signals_restored() -> Iterator[None]:
    """Supervisor.run leaves SIGTERM and SIGINT ignored for the command's exit; give this
    process (pytest) its own handlers back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_failed_fork_stops_the_started_workers_and_exits_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_fork = os.fork
    forks = []

    def fork_once() -> int:
        if forks:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        pid = real_fork()
        if pid == 0:  # the one worker: wait for the parent's SIGTERM, as a proxy would
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            signal.sigwait({signal.SIGTERM})
            os._exit(0)
        forks.append(pid)
        return pid

    monkeypatch.setattr(workers.os, "fork", fork_once)
    closed = []
    supervisor = workers.Supervisor(3, lambda index: 0, lambda: closed.append(True))
    signal.alarm(20)  # a hang fails the test instead of the run
    try:
        assert supervisor.run() == 1
    finally:
        signal.alarm(0)
    assert len(forks) == 1
    assert closed == [True]  # the listeners were closed
    assert [worker.exit_code for worker in supervisor.workers] == [0, 1, 1]


def test_a_sigterm_while_a_worker_starts_waits_for_its_loop_instead_of_killing_it() -> None:
    """A worker starts with SIGTERM blocked: one that arrives before its event loop handles
    it (the command stopping just as a worker is restarted) is handled then, as a drain, and
    the worker exits 0; it used to die of the signal's default action (exit code 143)."""

    def work(index: int) -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during start-up
        time.sleep(0.1)  # still starting

        async def serve() -> int:
            stop = runtime.stop_event()
            await asyncio.wait_for(stop.wait(), 5)
            return 0

        return asyncio.run(serve())

    supervisor = workers.Supervisor(1, work, lambda: None)
    signal.alarm(20)  # a hang fails the test instead of the run
    try:
        supervisor.run()  # 1: the worker exits before it said it was ready, as a failed start
    finally:
        signal.alarm(0)
    assert [worker.exit_code for worker in supervisor.workers] == [0]
