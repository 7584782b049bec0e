"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["splice", "copy"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Emulated vsock in a fresh directory, on each of the relay's two paths."""
    vsock_dir = tmp_path / "vsock"
    vsock_dir.mkdir()
    values = {"PF_PROXY_VSOCK_DIR": str(vsock_dir)}
    if request.param == "copy":
        values["PF_PROXY_NO_SPLICE"] = "1"
    return values
