"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import EchoServer


@pytest.fixture(params=["splice", "copy"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Emulated vsock in a fresh directory, on each of the relay's two paths."""
    vsock_dir = tmp_path / "vsock"
    vsock_dir.mkdir()
    values = {"PF_PROXY_VSOCK_DIR": str(vsock_dir)}
    if request.param == "copy":
        values["PF_PROXY_NO_SPLICE"] = "1"
    return values


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()
