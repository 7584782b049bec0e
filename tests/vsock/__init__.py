"""Tests over real AF_VSOCK, run inside a throw-away QEMU guest (`make test-guest`).

`tests/vsock/guest.py` boots the guest and runs pytest in it, selecting the tests marked `guest`
(real vsock only) and `vsock` (the same test code over the emulation on the host, over real
vsock here). tests/conftest.py calls `require_guest()` for the `guest` ones before they open an
AF_VSOCK socket: this machine's own vsock belongs to the infrastructure and must never be used.
"""

from __future__ import annotations

import os
from pathlib import Path

GUEST_ENV = "PF_PROXY_GUEST"  # set to "1" by tests/vsock/guest-init.sh
GUEST_CMDLINE_MARK = "pf_proxy_guest=1"  # only the guest's kernel command line carries it
SKIP_REASON = "runs inside the vsock guest stage (make test-guest)"


def in_guest() -> bool:
    """True only inside the guest that tests/vsock/guest.py boots: both the environment
    variable and the kernel command-line marker must be there."""
    if os.environ.get(GUEST_ENV) != "1":
        return False
    try:
        cmdline = Path("/proc/cmdline").read_text().split()
    except OSError:
        return False
    return GUEST_CMDLINE_MARK in cmdline


def require_guest() -> None:
    """Skip the calling test outside the guest, or fail it if PF_PROXY_REQUIRE_GUEST=1 (a
    guest test run on the host by mistake must not pass as a skip in CI)."""
    import pytest  # here, so that `python -m tests.vsock.guest` does not need pytest

    if in_guest():
        return
    if os.environ.get("PF_PROXY_REQUIRE_GUEST") == "1":
        pytest.fail(f"PF_PROXY_REQUIRE_GUEST=1 but this test {SKIP_REASON}", pytrace=False)
    pytest.skip(SKIP_REASON)
