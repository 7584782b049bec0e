"""The log line format: the per-second time cache must print what logging itself prints."""

from __future__ import annotations

import logging

import pytest

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
