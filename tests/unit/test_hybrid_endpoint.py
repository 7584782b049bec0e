"""The hybrid vsock endpoint against a small fake backend (tests/hybridfake.py): the handshake's
every outcome, retries within the deadline, nothing taken past OK, descriptors counted. The
real backend is the guest stage's (tests/hybrid)."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
import time
from pathlib import Path

import pytest

from pf_proxy.endpoints import (
    AddressError,
    ConnectError,
    ConnectRetries,
    Emulation,
    HybridVsock,
    VsockAddress,
    VsockEndpoint,
    vsock_endpoint,
)
from pf_proxy.hybrid import BAD_ANSWER, CONNECTED, NO_LISTENER, NOT_UP, TIMED_OUT
from tests.hybridfake import GREETING, fake_backend

WAIT = 5.0


def open_descriptors() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def back_to(before: int) -> bool:
    """Whether this process holds `before` descriptors again, within WAIT: the fake backend
    is a thread of this process, and closes its side of a connection in its own time."""
    deadline = time.monotonic() + WAIT
    while open_descriptors() != before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def endpoint_at(tmp_path: Path, port: int = 5000) -> VsockEndpoint:
    return VsockEndpoint(VsockAddress(3, port), HybridVsock(tmp_path / "vm.vsock"))


def connect(endpoint: VsockEndpoint, within: float | None = None) -> socket.socket:
    """`endpoint.connect()`, with retries until `within` seconds from now if given."""

    async def run() -> socket.socket:
        loop = asyncio.get_running_loop()
        retries = None if within is None else ConnectRetries(loop.time() + within)
        return await endpoint.connect(retries)

    return asyncio.run(run())


def failure(endpoint: VsockEndpoint, within: float | None = None) -> ConnectError:
    before = open_descriptors()
    with pytest.raises(ConnectError) as raised:
        connect(endpoint, within)
    assert back_to(before)  # the failed try's socket is closed
    return raised.value


def handshakes(endpoint: VsockEndpoint) -> dict[str, int]:
    transport = endpoint.transport
    assert isinstance(transport, HybridVsock)
    return dict(transport.handshakes.outcomes)


def test_ok_connects_to_the_guest_with_nothing_sent_before_it(tmp_path: Path) -> None:
    with fake_backend(tmp_path, lambda port, attempt: "ok") as fake:
        endpoint = endpoint_at(tmp_path)
        sock = connect(endpoint)
        with sock:
            assert sock.getblocking() is False
            sock.setblocking(True)
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
    assert fake.lines == [b"CONNECT 5000\n"]
    assert fake.early == []
    assert handshakes(endpoint) == {CONNECTED: 1}


def test_the_guests_first_bytes_behind_ok_are_left_for_the_stream(tmp_path: Path) -> None:
    with (
        fake_backend(tmp_path, lambda port, attempt: "ok+data"),
        connect(endpoint_at(tmp_path)) as sock,
    ):
        sock.settimeout(WAIT)
        assert sock.recv(100) == GREETING


def test_no_listener_is_retried_until_one_comes(tmp_path: Path) -> None:
    with fake_backend(tmp_path, lambda port, attempt: "eof" if attempt < 5 else "ok") as fake:
        endpoint = endpoint_at(tmp_path)
        connect(endpoint, within=WAIT).close()
    assert fake.attempts[5000] == 6
    assert handshakes(endpoint) == {NO_LISTENER: 5, CONNECTED: 1}


@pytest.mark.parametrize(
    ("mode", "outcome", "code", "said"),
    [
        (
            "eof",
            NO_LISTENER,
            errno.ECONNREFUSED,
            "no listener: CONNECT 5000: the backend closed without answering (nothing "
            "listens on guest port 5000, or not yet)",
        ),
        (
            "reset",
            NOT_UP,
            errno.ECONNRESET,
            "not up: CONNECT 5000: the backend reset the connection before OK (the guest's "
            "vsock is not up yet)",
        ),
    ],
)
def test_refusals_that_may_pass_are_retried_then_named(
    tmp_path: Path, mode: str, outcome: str, code: int, said: str
) -> None:
    with fake_backend(tmp_path, lambda port, attempt: mode):
        endpoint = endpoint_at(tmp_path)
        error = failure(endpoint, within=0.5)
    assert error.errno == code
    message = str(error)
    assert message.startswith(
        f"[Errno {code}] failed to connect to hybrid vsock 3:5000 ({tmp_path}/vm.vsock): {said}"
        "; retried "
    ), message
    counted = handshakes(endpoint)
    # The deadline may cut the last try's handshake (a loaded machine): that one try is
    # counted as timed out, and the error still names the refusal that was retried.
    assert counted.pop(TIMED_OUT, 0) <= 1, counted
    assert set(counted) == {outcome}
    assert counted[outcome] > 5


def test_a_bad_answer_is_not_retried_and_says_what_came(tmp_path: Path) -> None:
    with fake_backend(tmp_path, lambda port, attempt: "garbage") as fake:
        endpoint = endpoint_at(tmp_path)
        error = failure(endpoint, within=WAIT)
    assert str(error) == (
        f"[Errno {errno.EPROTO}] failed to connect to hybrid vsock 3:5000 ({tmp_path}/vm.vsock): "
        "bad answer: CONNECT 5000: answered b'HTTP/1.1 400 Bad Request\\r\\n' instead of "
        "OK <port>"
    )
    assert fake.attempts[5000] == 1
    assert handshakes(endpoint) == {BAD_ANSWER: 1}


def test_a_silent_backend_times_out_at_the_deadline(tmp_path: Path) -> None:
    with fake_backend(tmp_path, lambda port, attempt: "silent"):
        endpoint = endpoint_at(tmp_path)
        error = failure(endpoint, within=0.3)
    assert error.errno == errno.ETIMEDOUT
    assert "timed out: CONNECT 5000: no answer within 0." in str(error)
    assert handshakes(endpoint) == {TIMED_OUT: 1}


def test_no_vm_at_the_path_is_not_up_and_retried(tmp_path: Path) -> None:
    endpoint = endpoint_at(tmp_path)
    error = failure(endpoint, within=0.3)
    assert error.errno == errno.ENOENT
    assert (
        f"not up: cannot connect to {tmp_path}/vm.vsock: No such file or directory (is the VM "
        "running?)" in str(error)
    )
    assert "; retried " in str(error)


def test_a_drain_while_waiting_for_ok_closes_the_socket(tmp_path: Path) -> None:
    with fake_backend(tmp_path, lambda port, attempt: "silent"):
        endpoint = endpoint_at(tmp_path)

        async def run() -> None:
            before = open_descriptors()
            task = asyncio.ensure_future(endpoint.connect())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert back_to(before)

        asyncio.run(run())


def test_a_listener_is_the_socket_at_uds_path_and_port(tmp_path: Path) -> None:
    endpoint = VsockEndpoint(VsockAddress(2, 1234), HybridVsock(tmp_path / "vm.vsock"))
    with endpoint.listen() as listener:
        assert listener.getsockname() == f"{tmp_path}/vm.vsock_1234"
        with socket.socket(socket.AF_UNIX) as guest:  # what the backend does for the guest
            guest.connect(f"{tmp_path}/vm.vsock_1234")
            accepted, _ = listener.accept()
            accepted.close()
    assert not endpoint.half_close
    assert str(endpoint) == f"hybrid vsock 2:1234 ({tmp_path}/vm.vsock)"


@pytest.mark.parametrize(
    ("address", "listening", "problem"),
    [
        (VsockAddress(3, 80), True, "a listener is the host side of one VM"),
        (VsockAddress(1, 80), True, "a listener is the host side of one VM"),
        (VsockAddress(2, 80), False, "its CID is 3 or more, not 2"),
        (VsockAddress(0xFFFFFFFF, 80), False, "its CID is 3 or more, not 4294967295"),
    ],
)
def test_the_cid_says_which_side_of_the_one_vm(
    tmp_path: Path, address: VsockAddress, listening: bool, problem: str
) -> None:
    transport = HybridVsock(tmp_path / "vm.vsock")
    with pytest.raises(AddressError, match=problem):
        vsock_endpoint(address, transport=transport, listening=listening)
    for fine, side in ((VsockAddress(2, 80), True), (VsockAddress(0xFFFFFFFF, 80), True)):
        vsock_endpoint(fine, transport=transport, listening=side)
    vsock_endpoint(VsockAddress(3, 80), transport=transport, listening=False)


def test_the_two_unix_socket_transports_differ_in_path_and_half_close(tmp_path: Path) -> None:
    address = VsockAddress(88, 4000)
    emulated = VsockEndpoint(address, Emulation(tmp_path))
    hybrid = VsockEndpoint(address, HybridVsock(tmp_path / "vm.vsock"))
    assert emulated.half_close and not hybrid.half_close
    with emulated.listen() as one, hybrid.listen() as other:
        assert one.getsockname() == f"{tmp_path}/88_4000.sock"
        assert other.getsockname() == f"{tmp_path}/vm.vsock_4000"
    with pytest.raises(ConnectError) as refused:  # nobody listens: at once, as vsock
        emulated.start_connect()
    assert refused.value.errno == errno.ECONNRESET and refused.value.retryable
    assert hybrid.start_connect() is None  # the handshake takes a task
