"""contrib/prometheus: the scrape example is valid Prometheus configuration, and the alerting
rules fire as their unit tests say (promtool, from Debian's prometheus package)."""

from __future__ import annotations

import subprocess
from pathlib import Path

CONTRIB = Path(__file__).parents[2] / "contrib" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=60, cwd=CONTRIB
    )


def test_the_scrape_example_and_its_rules_are_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout + result.stderr


def test_the_alerts_fire_as_their_unit_tests_say() -> None:
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
