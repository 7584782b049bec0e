"""--vsock-buffer-size over real AF_VSOCK (guest only): the listener's size is set before accept
and inherited by accepted sockets; a connecting socket's is set before connect; sizes above
the kernel's default maximum are not clamped (the maximum is raised first)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pf_proxy.endpoints import (
    AF_VSOCK,
    SO_VM_SOCKETS_BUFFER_MAX_SIZE,
    SO_VM_SOCKETS_BUFFER_SIZE,
    VMADDR_CID_ANY,
    VsockAddress,
    VsockEndpoint,
)

pytestmark = pytest.mark.guest

MiB = 1 << 20


def buffer_size(sock: socket.socket) -> int:
    value: int = sock.getsockopt(socket.AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE)
    return value


def test_listener_accepted_and_connecting_sockets_get_their_sizes() -> None:
    listener = VsockEndpoint(VsockAddress(VMADDR_CID_ANY, 7301), AF_VSOCK, 4 * MiB).listen()
    try:
        assert buffer_size(listener) == 4 * MiB  # above the default maximum of 256 KiB
        assert listener.getsockopt(socket.AF_VSOCK, SO_VM_SOCKETS_BUFFER_MAX_SIZE) == 4 * MiB

        async def connect() -> socket.socket:
            return await VsockEndpoint(VsockAddress(1, 7301), AF_VSOCK, MiB).connect()

        client = asyncio.run(connect())
        with client:
            listener.setblocking(True)
            accepted, _ = listener.accept()
            with accepted:
                assert buffer_size(client) == MiB
                assert buffer_size(accepted) == 4 * MiB  # inherited from the listener
    finally:
        listener.close()


def test_without_a_size_the_kernel_default_stays() -> None:
    listener = VsockEndpoint(VsockAddress(VMADDR_CID_ANY, 7302)).listen()
    with listener:
        assert buffer_size(listener) == 256 * 1024
