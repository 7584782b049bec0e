"""Shared test set-up: the `root` gate.

Tests marked `@pytest.mark.root` need root, network namespaces and iptables. Outside CI they
skip with the reason; with PF_PROXY_REQUIRE_ROOT_TESTS=1 (set by .ci/run) a missing
requirement is a failure, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.hybrid import require_hybrid_stage
from tests.integration.helpers import EchoServer
from tests.vsock import require_guest
from tests.vsocks import Vsock, in_guest, vsock_under_test

REQUIRE_ROOT_TESTS = os.environ.get("PF_PROXY_REQUIRE_ROOT_TESTS") == "1"
ROOT_TOOLS = ("ip", "iptables", "ip6tables", "ipset")


def _missing_root_requirement() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    missing = [tool for tool in ROOT_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} on PATH"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("guest") is not None:
        require_guest()  # outside the guest: a skip, a failure under PF_PROXY_REQUIRE_GUEST=1
    if item.get_closest_marker("hybrid") is not None:
        require_hybrid_stage()  # the same for the hybrid stage
    if item.get_closest_marker("root") is None:
        return
    reason = _missing_root_requirement()
    if reason is None:
        return
    if REQUIRE_ROOT_TESTS:
        pytest.fail(f"PF_PROXY_REQUIRE_ROOT_TESTS=1 but this test {reason}", pytrace=False)
    pytest.skip(reason)


# In the guest (software emulation, slow) the splice path only: the copy path moves the same
# bytes through user space, and its failure paths are covered here and in tests/unit.
RELAY_PATHS = ["splice"] if in_guest() else ["splice", "copy"]


@pytest.fixture(params=RELAY_PATHS)
def vsock(request: pytest.FixtureRequest) -> Iterator[Vsock]:
    """The vsock under test, on each of the relay's two paths."""
    with vsock_under_test(splice=request.param == "splice") as place:
        yield place


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    """A TCP echo server on loopback (a thread per connection)."""
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def vsock_link() -> Iterator[Vsock]:
    """The vsock under test, for the raw proxies' links (they have one path)."""
    with vsock_under_test() as place:
        yield place
