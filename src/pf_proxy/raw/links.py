"""The retry rhythm of everything the raw proxies open, and their vsock client link.

Faithful to the originals: a resource that fails to open (the nfqueue, the raw socket, the
listener) is retried after 1, 2, 4 ... 64 seconds; the vsock client reconnects after 1, 2, 4,
4 ... seconds. Each failed attempt is logged once, with what failed and where.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TypeVar

from pf_proxy.endpoints import VsockEndpoint

log = logging.getLogger("pf_proxy")

T = TypeVar("T")

OPEN_BACKOFF_CAP = 64.0
VSOCK_BACKOFF_CAP = 4.0


class Backoff:
    """Delays 1, 2, 4 ... up to `cap` seconds."""

    def __init__(self, cap: float, first: float = 1.0) -> None:
        self.cap = cap
        self.next_delay = first

    def take(self) -> float:
        delay = self.next_delay
        self.next_delay = min(self.next_delay * 2, self.cap)
        return delay


async def open_with_backoff(
    what: str, open_once: Callable[[], T], cap: float = OPEN_BACKOFF_CAP
) -> T:
    """Call `open_once` until it returns; log each OSError and wait 1, 2, 4 ... `cap` s."""
    backoff = Backoff(cap)
    while True:
        try:
            return open_once()
        except OSError as exc:
            delay = backoff.take()
            log.error("Failed to open %s: %s; retrying in %g s", what, exc, delay)
            await asyncio.sleep(delay)


async def connect_with_backoff(endpoint: VsockEndpoint) -> socket.socket:
    """Connect to `endpoint`, retrying after 1, 2, 4, 4 ... s; log each failure once."""
    backoff = Backoff(VSOCK_BACKOFF_CAP)
    while True:
        try:
            sock = await endpoint.connect()
        except OSError as exc:
            delay = backoff.take()
            log.error("%s; retrying in %g s", exc, delay)
            await asyncio.sleep(delay)
            continue
        log.info("Connected to %s", endpoint)
        return sock
