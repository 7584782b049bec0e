"""Imports follow use: what a proxy does not use, its process does not load (each of these
costs several MiB of resident memory; benchmarks/memory.py measures them)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("prometheus_client", "dns", "pyroute2")


def _loaded_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, timeout=60)  # fmt: skip
    return {name.split(".")[0] for name in done.stdout.split()}


@pytest.mark.parametrize(
    "code",
    [
        # every kind's command and plan module, the runner and the file reader
        "import pf_proxy.cli.tcp, pf_proxy.cli.udp, pf_proxy.cli.raw, pf_proxy.cli.run, "
        "pf_proxy.runner, pf_proxy.config, pf_proxy.kinds",
        # the planes' engines, as a proxy of each kind runs them
        "import pf_proxy.tcp.engine, pf_proxy.tcp.routes, pf_proxy.udp.engine, "
        "pf_proxy.raw.forward, pf_proxy.raw.addresses, pf_proxy.metrics, pf_proxy.hybrid",
    ],
)
def test_metrics_names_and_netlink_libraries_are_not_imported_by_the_data_path(code: str) -> None:
    assert _loaded_after(code) & set(HEAVY) == set()


def test_they_are_imported_where_they_are_used() -> None:
    """The check above can fail: the same check sees them once their users are imported."""
    assert {"prometheus_client", "dns"} <= _loaded_after(
        "import pf_proxy.metrics; pf_proxy.metrics.exposition()\nimport pf_proxy.tcp.resolver"
    )
