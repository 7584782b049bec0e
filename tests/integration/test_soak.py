"""The soak (benchmarks/soak.py) for 10 s: 500 connections through the TCP pair, every byte
checked end to end, none lost, memory flat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MiB_KIB = 1024


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_loses_nothing() -> None:
    args = [sys.executable, "-m", "benchmarks.soak", "--seconds", "10", "--json"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    print(done.stdout)
    result = json.loads(done.stdout.splitlines()[-1])
    totals = result["totals"]
    assert totals["bytes_lost"] == 0
    assert totals["connections_lost"] == 0, totals["failures"]
    assert totals["bytes_received"] == totals["bytes_sent"] > 0
    # Every one of the 500 workers finished at least its first connection, both endings ran.
    assert totals["connections_completed"] >= 500
    assert totals["half_closed"] > 0
    assert totals["fully_closed"] > 0
    # The splice path holds no chunk buffers: connections come and go, memory stays put.
    for name, start in result["rss_start_kib"].items():
        end = result["rss_end_kib"][name]
        assert end - start < 20 * MiB_KIB, f"{name}: resident {start} -> {end} KiB"
