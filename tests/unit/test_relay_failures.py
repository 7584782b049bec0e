"""The relay under a burst of failures: a pump whose write fails drops its chunk at once."""

from __future__ import annotations

import asyncio
import socket
import tracemalloc

from pf_proxy.relay import COPY_CHUNK, Relay

MiB = 1 << 20


async def relay_to_departed_clients(count: int) -> tuple[list[BaseException | None], int]:
    """`count` relays on the copy path whose clients have gone while their upstreams have
    bytes for them, all started at once: every write back fails (EPIPE) in one turn of the
    loop. Returns each relay's outcome and the peak of memory allocated while they ran."""
    relays, keep = [], []
    for _ in range(count):
        inbound, client = socket.socketpair()
        upstream, server = socket.socketpair()
        server.sendall(b"reply" * 200)
        client.close()
        relays.append(Relay(inbound, upstream, "forward done", "backward done", use_splice=False))
        keep.append(server)
    tracemalloc.start()
    try:
        outcomes = await asyncio.gather(*(relay.run() for relay in relays), return_exceptions=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        for sock in keep:
            sock.close()
    return outcomes, peak


def test_failed_writes_do_not_each_hold_a_chunk_buffer() -> None:
    """Found by the hostile-peer test: vsock-to-ip on the copy path went from 26 MiB to
    360 MiB resident when thousands of vsock clients left at once. Each failed pump kept its
    1 MiB buffer until the relay was torn down on a later turn of the loop, so each next
    read found the pool empty and allocated another."""
    count = 32
    outcomes, peak = asyncio.run(relay_to_departed_clients(count))
    assert all(isinstance(outcome, BrokenPipeError) for outcome in outcomes), outcomes
    assert peak < 4 * COPY_CHUNK, f"{peak / MiB:.1f} MiB allocated for {count} failed relays"
