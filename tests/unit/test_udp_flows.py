"""The flow table of the UDP proxies, without sockets: the flow idle the longest makes room at
the limit, one timer ends idle flows, the drain shortens the idle timeout, and each overload
is logged once."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from pf_proxy.udp.flows import (
    FLOW_LIMIT,
    IDLE_TIMEOUT,
    MAX_PENDING,
    SHUTDOWN,
    Flow,
    FlowTable,
)


class Quiet(Flow):
    """A flow with no sockets: only the table's bookkeeping."""

    __slots__ = ()

    def deliver(self, datagram: bytes | memoryview) -> None:
        raise AssertionError("no stream, no datagrams")


def run(coroutine: object) -> None:
    asyncio.run(coroutine)  # type: ignore[arg-type]


def test_at_the_limit_the_flow_idle_the_longest_makes_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        table = FlowTable(3, None, "vsock 3:53", "udp-to-vsock")
        flows = [Quiet(table, n, f"client {n}") for n in range(5)]
        for flow in flows[:3]:
            table.add(flow)
            await asyncio.sleep(0.001)
        table.touch(flows[0])  # now 1 is the idlest
        table.add(flows[3])
        assert flows[1].closed and not flows[0].closed
        table.add(flows[4])
        assert flows[2].closed
        assert list(table.flows) == [0, 3, 4]
        assert table.counters.closed[FLOW_LIMIT] == 2
        assert table.overloaded

    with caplog.at_level(logging.INFO, logger="pf_proxy"):
        run(main())
    assert caplog.text.count("3 flows open, the limit") == 1  # once per overload


def test_the_overload_ends_below_nine_tenths_of_the_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        table = FlowTable(10, None, "vsock 3:53", "udp-to-vsock")
        flows = [Quiet(table, n, str(n)) for n in range(12)]
        for flow in flows:
            table.add(flow)
        for flow in flows[2:5]:
            flow.close("test", SHUTDOWN)
        table.add(Quiet(table, "new", "new"))
        assert not table.overloaded

    with caplog.at_level(logging.INFO, logger="pf_proxy"):
        run(main())
    assert "Below the flow limit again: 7 flows open, 2 were closed to make room" in caplog.text


def test_one_timer_ends_idle_flows_and_spares_active_ones() -> None:
    async def main() -> None:
        table = FlowTable(100, 0.3, "vsock 3:53", "udp-to-vsock")
        idle, active = Quiet(table, "idle", "idle"), Quiet(table, "active", "active")
        table.add(idle)
        table.add(active)
        for _ in range(8):
            await asyncio.sleep(0.05)
            table.touch(active)
        assert idle.closed and not active.closed
        assert table.counters.closed[IDLE_TIMEOUT] == 1
        await asyncio.sleep(0.5)
        assert active.closed and len(table) == 0

    run(main())


def test_the_drain_ends_flows_once_idle_for_a_second_or_at_its_timeout() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        table = FlowTable(100, 30, "vsock 3:53", "udp-to-vsock")
        quiet, busy = Quiet(table, "quiet", "quiet"), Quiet(table, "busy", "busy")
        table.add(quiet)
        table.add(busy)

        def keep_busy() -> None:
            if not busy.closed:
                table.touch(busy)
                loop.call_later(0.1, keep_busy)

        keep_busy()
        started = loop.time()
        await table.drain(2.0)
        assert 1.9 < loop.time() - started < 3
        assert table.counters.closed[IDLE_TIMEOUT] == 1  # quiet: idle for a second
        assert table.counters.closed[SHUTDOWN] == 1  # busy: still going at the drain's end

    run(main())


def test_held_back_frames_are_bounded_per_flow_and_dropped_beyond() -> None:
    async def main() -> None:
        table = FlowTable(10, None, "vsock 3:53", "udp-to-vsock")
        flow = Quiet(table, "c", "c")  # not connected: frames are held back
        table.add(flow)
        frame = memoryview(b"\x10\x00" + b"x" * 4096)
        for _ in range(100):
            flow.send_frame(frame)
        assert flow.pending is not None and len(flow.pending) <= MAX_PENDING
        held = MAX_PENDING // len(frame)
        assert table.counters.datagrams_to_stream == held
        assert flow.dropped == table.counters.dropped_stream_full == 100 - held
        assert table.pending_total == held * len(frame)
        flow.close("test", SHUTDOWN)
        assert table.pending_total == 0

    run(main())


def test_close_closes_the_stream_even_when_the_subclass_fails() -> None:
    class Broken(Quiet):
        __slots__ = ()

        def _close_own(self, clean: bool) -> None:
            raise OSError("the subclass failed")

    async def main() -> None:
        table = FlowTable(10, None, "vsock 3:53", "udp-to-vsock")
        flow = Broken(table, "b", "b")
        table.add(flow)
        ours, theirs = socket.socketpair()
        with theirs:
            ours.setblocking(False)
            flow.attach_stream(ours)
            with pytest.raises(OSError, match="the subclass failed"):
                flow.close("test", SHUTDOWN)
            assert ours.fileno() == -1 and len(table) == 0
            assert theirs.recv(1) == b""

    run(main())
