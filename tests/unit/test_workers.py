"""The supervisor of --workers when fork fails: the workers already started are stopped and
the command ends with exit 1, rather than waiting forever for workers that never were."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from pf_proxy import workers


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
