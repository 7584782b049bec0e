"""The log lines: the per-second time cache must print what logging itself prints, and the
handler that flushes once per FLUSH_DELAY on a running loop loses nothing."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from pf_proxy import runtime
from pf_proxy.runtime import _Formatter

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def _record(created: float) -> logging.LogRecord:
    record = logging.LogRecord("pf_proxy", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    return record


@pytest.mark.parametrize(
    "times",
    [
        [1_795_000_000.0, 1_795_000_000.001, 1_795_000_000.999],  # one second, three lines
        [1_795_000_000.5, 1_795_000_001.25, 1_795_000_001.75, 1_795_000_061.0],  # seconds change
        [1_795_000_005.0, 1_795_000_004.0],  # the clock stepped back
    ],
)
def test_lines_are_what_the_default_formatter_prints(times: list[float]) -> None:
    ours, reference = _Formatter(FORMAT), logging.Formatter(FORMAT)
    for created in times:
        record = _record(created)
        assert ours.format(record) == reference.format(record)


class _CountingStream(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_lines_on_a_running_loop_are_flushed_together_and_none_is_lost_at_the_end() -> None:
    stream = _CountingStream()
    handler = runtime._LoopFlushedHandler(stream)
    logger = logging.getLogger("test-flush")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:

        async def busy() -> int:
            for index in range(100):
                logger.info("line %d", index)
            await asyncio.sleep(runtime._LoopFlushedHandler.FLUSH_DELAY * 3)
            flushed = stream.flushes
            logger.info("the last line, just before the loop ends")
            return flushed

        flushes_during = asyncio.run(busy())
        assert flushes_during == 1  # a hundred lines, one flush
        handler.flush()  # what logging.shutdown does at exit: the loop is gone
        assert stream.getvalue().count("\n") == 101
        assert stream.getvalue().endswith("the last line, just before the loop ends\n")
        logger.info("no loop: flushed at once")
        assert stream.flushes == flushes_during + 2
    finally:
        logger.removeHandler(handler)
