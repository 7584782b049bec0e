"""The hybrid stage: the proxies' hybrid vsock side against a real backend.

`python -m tests.vsock.guest --hybrid -- CMD` boots the guest with its vsock device behind
rust-vmm's vhost-device-vsock (the host side of Firecracker and Cloud Hypervisor's protocol),
starts `tests.hybrid.agent` in it, and runs CMD (above all pytest selecting the tests marked
`hybrid`) here, on the host, with these variables set:

    PF_PROXY_HYBRID_UDS          the backend's uds_path (the VM's vsock, host side)
    PF_PROXY_HYBRID_CID          the guest's CID
    PF_PROXY_HYBRID_AGENT        the agent's directory (tests.hybrid.agent.GuestAgent)
    PF_PROXY_HYBRID_BACKEND_PID  the backend's process, for the test that kills it

Outside the stage the `hybrid` tests skip, or fail with PF_PROXY_REQUIRE_GUEST=1.
"""

from __future__ import annotations

import os

UDS_ENV = "PF_PROXY_HYBRID_UDS"
CID_ENV = "PF_PROXY_HYBRID_CID"
AGENT_ENV = "PF_PROXY_HYBRID_AGENT"
BACKEND_PID_ENV = "PF_PROXY_HYBRID_BACKEND_PID"
SKIP_REASON = "runs in the hybrid stage (make test-hybrid)"


def in_hybrid_stage() -> bool:
    return all(os.environ.get(name) for name in (UDS_ENV, CID_ENV, AGENT_ENV))


def require_hybrid_stage() -> None:
    """Skip the calling test outside the hybrid stage, or fail it with
    PF_PROXY_REQUIRE_GUEST=1."""
    import pytest

    if in_hybrid_stage():
        return
    if os.environ.get("PF_PROXY_REQUIRE_GUEST") == "1":
        pytest.fail(f"PF_PROXY_REQUIRE_GUEST=1 but this test {SKIP_REASON}", pytrace=False)
    pytest.skip(SKIP_REASON)
