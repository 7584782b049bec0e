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
    ours, reference = _Formatter(stamped=True, prefix=""), logging.Formatter(FORMAT)
    for created in times:
        record = _record(created)
        assert ours.format(record) == reference.format(record)


@pytest.mark.parametrize("stamped", [True, False], ids=["timestamp", "journal"])
@pytest.mark.parametrize("prefix", ["", "[worker 2] "])
def test_a_quick_info_line_is_what_format_makes_of_the_record(
    stamped: bool, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    formatter = _Formatter(stamped=stamped, prefix=prefix)
    for created in (
        1_795_000_000.0,
        1_795_000_000.999,
        1_795_000_001.25,
        1_795_000_001.2504,  # the same millisecond: the line's start is reused
        1_795_000_001.2514,  # the next one
        1_795_000_000.5,  # the clock stepped back
    ):
        monkeypatch.setattr(runtime.time, "time", lambda created=created: created)
        assert formatter.info_line("hello x") == formatter.format(_record(created)) + "\n"


def test_quick_info_lines_go_to_stdout_and_to_any_other_handler_through_logging(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        runtime.configure_logging()
        caplog.handler.records.clear()
        runtime.info("Proxying to: vsock 3:5000")  # ours alone: straight to stdout's handler
        root.handlers[0].flush()
        assert capsys.readouterr().out.endswith(" INFO Proxying to: vsock 3:5000\n")
        assert caplog.records == []
        root.addHandler(caplog.handler)  # somebody else listens too: through logging
        runtime.info("Proxying to: vsock 3:5001")
        assert [r.getMessage() for r in caplog.records] == ["Proxying to: vsock 3:5001"]
        logging.getLogger("pf_proxy").setLevel(logging.WARNING)
        root.removeHandler(caplog.handler)
        runtime.info("Proxying to: vsock 3:5002")  # INFO is off: nothing
        root.handlers[0].flush()
        assert "3:5002" not in capsys.readouterr().out
    finally:
        logging.getLogger("pf_proxy").setLevel(logging.NOTSET)
        root.handlers[:], root.level = saved


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


class _RecordingStream(io.StringIO):
    """Each flush is one write(2) of what was written since the last: record them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        return super().write(text)

    def flush(self) -> None:
        if self._pending:
            self.writes.append(self._pending)
            self._pending = ""


def test_lines_go_out_whole_in_writes_a_pipe_keeps_atomic() -> None:
    """The workers of --workers share stdout: every write is whole lines, at most PIPE_BUF
    bytes unless one line is longer, so no worker's write cuts into another's line."""
    stream = _RecordingStream()
    handler = runtime._LoopFlushedHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test-atomic")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lines = [f"line {index} " + "x" * (index % 300) for index in range(400)]
    lines.insert(200, "long " + "y" * 9000)
    lines.insert(300, "snowman \u2603 " * 400)  # 4,400 characters, 6,000 bytes
    try:

        async def busy() -> None:
            for line in lines:
                logger.info("%s", line)
            await asyncio.sleep(runtime._LoopFlushedHandler.FLUSH_DELAY * 3)

        asyncio.run(busy())
    finally:
        logger.removeHandler(handler)
    assert "".join(stream.writes) == "".join(line + "\n" for line in lines)
    assert len(stream.writes) > 10
    for write in stream.writes:
        assert write.endswith("\n")
        assert len(write.encode()) <= 4096 or write.count("\n") == 1, write[:80]


def test_warnings_and_errors_are_written_at_once_after_the_info_lines_held() -> None:
    """An ERROR line must not wait in the batch (a SIGKILL would lose it), and the INFO lines
    logged before it go out first, so a reader of both streams sees them in order."""
    shared: list[str] = []  # both streams' writes, in the order they happened

    class _Shared(_RecordingStream):
        def flush(self) -> None:
            if self._pending:
                shared.append(self._pending)
            super().flush()

    out, err = _Shared(), _Shared()
    info_handler = runtime._LoopFlushedHandler(out)
    error_handler = runtime._AtOnceHandler(err, earlier=info_handler)
    error_handler.setLevel(logging.WARNING)
    for handler in (info_handler, error_handler):
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    info_handler.addFilter(runtime._BelowWarning())
    logger = logging.getLogger("test-at-once")
    logger.addHandler(info_handler)
    logger.addHandler(error_handler)
    logger.setLevel(logging.INFO)
    try:

        async def failing() -> tuple[list[str], list[str]]:
            logger.info("accepted")
            logger.info("proxying")
            logger.error("closing: upstream refused")
            seen_at_once = list(shared)
            logger.info("after")
            await asyncio.sleep(runtime._LoopFlushedHandler.FLUSH_DELAY * 3)
            return seen_at_once, list(shared)

        at_once, at_end = asyncio.run(failing())
    finally:
        logger.removeHandler(info_handler)
        logger.removeHandler(error_handler)
    assert at_once == ["INFO accepted\nINFO proxying\n", "ERROR closing: upstream refused\n"]
    assert at_end == [*at_once, "INFO after\n"]


def test_configure_logging_sends_warnings_through_the_at_once_handler() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        runtime.configure_logging()
        kinds = [type(handler) for handler in root.handlers]
        assert kinds == [runtime._LoopFlushedHandler, runtime._AtOnceHandler]
        assert root.handlers[1].level == logging.WARNING
    finally:
        root.handlers[:], root.level = saved
