"""udp-to-vsock and vsock-to-udp: datagrams over vsock streams, each client flow a stream of
its own, every datagram a frame (2-byte length, as DNS over TCP).

The tests marked `vsock` run over the emulation here and over real AF_VSOCK in the guest
stage. A test stands in for one of the two proxies where it checks the bytes on the stream
itself; the failure tests count each proxy's sockets before and after (`holding_steady`).
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pf_proxy.udp.framing import encode_frame
from tests.integration.helpers import (
    Proxy,
    echo_process,
    free_port,
    holding_steady,
    recv_exactly,
    rss_kib,
    run_briefly,
    running,
    socket_fds,
    steady_proxy,
    wait_until,
)
from tests.vsocks import SLOWDOWN, Vsock, in_guest

pytestmark = pytest.mark.timeout(300)

WAIT = 30.0 * SLOWDOWN
STREAM_PORT = 5300  # the vsock port of the pair (and of the stand-ins)


def free_udp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def ip(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def udp_client(host: str = "127.0.0.1", timeout: float = WAIT) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    return sock


def ask(address: tuple[str, int], payload: bytes, sock: socket.socket | None = None) -> bytes:
    """Send one datagram to `address` and return the answer, which must come from there."""
    own = sock is None
    sock = sock or udp_client(address[0])
    try:
        sock.sendto(payload, address)
        answer, source = sock.recvfrom(1 << 16)
        assert source[:2] == address, source
        return answer
    finally:
        if own:
            sock.close()


def read_frame(stream: socket.socket) -> bytes:
    length = int.from_bytes(recv_exactly(stream, 2), "big")
    return recv_exactly(stream, length) if length else b""


@contextmanager
def udp_echo(host: str = "127.0.0.1", *, log_dir: Path) -> Iterator[tuple[str, int]]:
    """A UDP echo server in a process of its own; yields its address."""
    port = free_udp_port(host)
    with echo_process("udp", host, str(port), log_dir=log_dir):
        yield host, port


@contextmanager
def pair(
    vsock: Vsock, upstream: str, log_dir: Path, *extra: str, listen_host: str = "127.0.0.1"
) -> Iterator[tuple[tuple[str, int], Proxy, Proxy]]:
    """udp-to-vsock on a free UDP port -> vsock STREAM_PORT -> vsock-to-udp -> `upstream`;
    yields (the address clients send to, udp-to-vsock, vsock-to-udp)."""
    port = free_udp_port(listen_host)
    with (
        running(
            "vsock-to-udp", "-v", vsock.listen_address(STREAM_PORT), "-i", upstream, *extra,
            log_dir=log_dir, env=vsock.env,
        ) as inner,
        running(
            "udp-to-vsock", "-i", ip(listen_host, port), "-v", vsock.address(STREAM_PORT),
            *extra, log_dir=log_dir, env=vsock.env,
        ) as outer,
    ):  # fmt: skip
        yield (listen_host, port), outer, inner


# --- datagrams cross intact ---------------------------------------------------------------

SIZES_V4 = [0, 1, 512, 4096, 9000, 65507]  # 65,507: the largest UDP datagram over IPv4


@pytest.mark.vsock
@pytest.mark.parametrize(
    ("host", "sizes"),
    [("127.0.0.1", SIZES_V4), ("::1", [0, 4096, 65527])],  # 65,527 over IPv6
    ids=["ipv4", "ipv6"],
)
def test_datagrams_of_every_size_cross_the_pair(
    host: str, sizes: list[int], vsock_link: Vsock, tmp_path: Path
) -> None:
    with (
        udp_echo(host, log_dir=tmp_path) as (_, echo_port),
        pair(vsock_link, ip(host, echo_port), tmp_path, listen_host=host) as (
            address, outer, inner,
        ),
    ):  # fmt: skip
        with udp_client(host) as client:
            for size in sizes:
                payload = os.urandom(size)
                assert ask(address, payload, client) == payload, size
        inner.wait_for(f"Proxying to: udp {ip(host, echo_port)}")
        outer.wait_for(f"Listening on: udp {ip(host, address[1])}")
        outer.wait_for(f"Proxying to: vsock {vsock_link.address(STREAM_PORT)}")
    for proxy, name in ((outer, "udp-to-vsock"), (inner, "vsock-to-udp")):
        assert proxy.process.returncode == 0
        count = len(sizes)
        counters = f"{name}: 1 flows (0 open), {count} datagrams to vsock, {count} from vsock"
        assert counters in proxy.stdout, proxy.stdout
        assert "ERROR" not in proxy.stderr, proxy.stderr


@pytest.mark.vsock
def test_the_stream_carries_length_prefixed_frames_one_stream_per_client(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    """udp-to-vsock against a stand-in for vsock-to-udp: the bytes on each stream, a stream
    per client address, replies sent to the right client from the listening address."""
    port = free_udp_port()
    address = ("127.0.0.1", port)
    with (
        vsock_link.listener(STREAM_PORT) as listener,
        steady_proxy(
            vsock_link, "udp-to-vsock", "-i", f"127.0.0.1:{port}", "-v",
            vsock_link.address(STREAM_PORT), log_dir=tmp_path,
        ),
        udp_client() as first,
        udp_client() as second,
    ):  # fmt: skip
        first.sendto(b"", address)
        first.sendto(b"hello", address)
        stream_a, _ = listener.accept()
        stream_a.settimeout(WAIT)
        assert recv_exactly(stream_a, 9) == b"\x00\x00" + b"\x00\x05hello"
        second.sendto(b"x" * 4096, address)
        stream_b, _ = listener.accept()
        stream_b.settimeout(WAIT)
        with stream_a, stream_b:
            assert recv_exactly(stream_b, 4098) == b"\x10\x00" + b"x" * 4096
            stream_a.sendall(encode_frame(b"to the first") + encode_frame(b""))
            frame = encode_frame(b"to the second, in pieces")
            for piece in (frame[:1], frame[1:2], frame[2:9], frame[9:]):
                stream_b.sendall(piece)
                time.sleep(0.05)
            assert first.recvfrom(100) == (b"to the first", address)
            assert first.recvfrom(100) == (b"", address)  # a zero-length datagram
            assert second.recvfrom(100) == (b"to the second, in pieces", address)
            first.sendto(b"again", address)  # the same flow: the same stream
            assert recv_exactly(stream_a, 7) == b"\x00\x05again"


@pytest.mark.vsock
def test_vsock_to_udp_frames_replies_and_drops_what_the_upstream_cannot_take(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    """A vsock client speaking frames straight to vsock-to-udp: each frame is a datagram,
    echoed back framed; a frame over IPv4's 65,507 bytes is dropped, logged once, and the
    flow carries on."""
    datagrams = [b"", b"a", os.urandom(1000), b"", os.urandom(65507)]
    with (
        udp_echo(log_dir=tmp_path) as (_, echo_port),
        steady_proxy(
            vsock_link, "vsock-to-udp", "-v", vsock_link.listen_address(STREAM_PORT), "-i",
            f"127.0.0.1:{echo_port}", log_dir=tmp_path,
        ) as proxy,
        vsock_link.client(STREAM_PORT) as stream,
    ):  # fmt: skip
        stream.sendall(b"".join(encode_frame(d) for d in datagrams))
        assert [read_frame(stream) for _ in datagrams] == datagrams
        stream.sendall(encode_frame(b"z" * 65535) + encode_frame(b"z" * 65508))
        stream.sendall(encode_frame(b"after"))
        assert read_frame(stream) == b"after"
        proxy.wait_for(
            f"a datagram of 65535 bytes is too large for 127.0.0.1:{echo_port} (Message too "
            "long): dropped",
            stream="stderr",
        )
    assert proxy.stderr.count("too large") == 1
    assert "dropped 0 (vsock stream slow) and 2 (refused by UDP)" in proxy.stdout


# --- bad input on a stream ------------------------------------------------------------------


@pytest.mark.vsock
@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (b"\x00", "stream ended inside a frame's length (1 of 2 bytes)"),
        (b"\x00\x64" + b"a" * 5, "stream ended inside a frame: 95 of its 100 bytes missing"),
        (b"\xff\xff", "stream ended inside a frame: 65535 of its 65535 bytes missing"),
    ],
    ids=["in-the-length", "in-the-datagram", "a-length-past-the-end"],
)
def test_a_stream_cut_inside_a_frame_drops_that_flow_only(
    tail: bytes, message: str, vsock_link: Vsock, tmp_path: Path
) -> None:
    with (
        udp_echo(log_dir=tmp_path) as (_, echo_port),
        steady_proxy(
            vsock_link, "vsock-to-udp", "-v", vsock_link.listen_address(STREAM_PORT), "-i",
            f"127.0.0.1:{echo_port}", log_dir=tmp_path,
        ) as proxy,
        vsock_link.client(STREAM_PORT) as healthy,
    ):  # fmt: skip
        healthy.sendall(encode_frame(b"before"))
        assert read_frame(healthy) == b"before"
        with vsock_link.client(STREAM_PORT) as cut:
            cut.sendall(encode_frame(b"whole") + tail)
            assert read_frame(cut) == b"whole"
            cut.shutdown(socket.SHUT_WR)
            assert cut.recv(1) == b""  # the proxy dropped the flow
        dropped = f"Dropping flow from {vsock_link.inbound_name(STREAM_PORT)}"
        proxy.wait_for(dropped, stream="stderr")
        proxy.wait_for(f": {message}", stream="stderr")
        healthy.sendall(encode_frame(b"after"))
        assert read_frame(healthy) == b"after"


@pytest.mark.vsock
def test_udp_to_vsock_drops_a_flow_whose_stream_is_cut_inside_a_frame(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    port = free_udp_port()
    address = ("127.0.0.1", port)
    with (
        vsock_link.listener(STREAM_PORT) as listener,
        steady_proxy(
            vsock_link, "udp-to-vsock", "-i", f"127.0.0.1:{port}", "-v",
            vsock_link.address(STREAM_PORT), log_dir=tmp_path,
        ) as proxy,
        udp_client() as victim,
        udp_client() as other,
    ):  # fmt: skip
        victim.sendto(b"1", address)
        cut, _ = listener.accept()
        other.sendto(b"2", address)
        healthy, _ = listener.accept()
        with cut, healthy:
            for stream in (cut, healthy):
                stream.settimeout(WAIT)
                assert len(recv_exactly(stream, 3)) == 3
            cut.sendall(encode_frame(b"answer") + b"\x01\x00partial")
            assert victim.recvfrom(100) == (b"answer", address)
            cut.close()
            proxy.wait_for(
                f"Dropping flow from 127.0.0.1:{victim.getsockname()[1]}: vsock "
                f"{vsock_link.address(STREAM_PORT)}: stream ended inside a frame: 249 of its "
                "256 bytes missing",
                stream="stderr",
            )
            healthy.sendall(encode_frame(b"still here"))
            assert other.recvfrom(100) == (b"still here", address)
            victim.sendto(b"3", address)  # a new flow for the same client
            fresh, _ = listener.accept()
            with fresh:
                fresh.settimeout(WAIT)
                assert recv_exactly(fresh, 3) == b"\x00\x013"


@pytest.mark.vsock
def test_garbage_and_a_crowd_of_dropped_streams_cost_nothing_lasting(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    """Random bytes, then 2,000 streams (200 in the guest) opened and closed at once: each is
    dropped (logged where it was cut inside a frame), a live flow is answered throughout, and
    the proxy ends up with the sockets and about the memory it had."""
    crowd = 200 if in_guest() else 2000
    with (
        udp_echo(log_dir=tmp_path) as (_, echo_port),
        steady_proxy(
            vsock_link, "vsock-to-udp", "-v", vsock_link.listen_address(STREAM_PORT), "-i",
            f"127.0.0.1:{echo_port}", log_dir=tmp_path,
        ) as proxy,
    ):  # fmt: skip
        memory_before = rss_kib(proxy.process.pid)
        sockets_before = socket_fds(proxy.process.pid)
        with vsock_link.client(STREAM_PORT) as live:
            live.sendall(encode_frame(b"ping"))
            assert read_frame(live) == b"ping"
            for _ in range(20):
                with vsock_link.client(STREAM_PORT) as garbage:
                    garbage.sendall(os.urandom(3000))
            streams = []
            try:
                for _ in range(crowd):
                    streams.append(connect_past_a_full_backlog(vsock_link))
            finally:
                for stream in streams:
                    stream.close()
            for number in range(10):
                live.sendall(encode_frame(b"ping %d" % number))
                assert read_frame(live) == b"ping %d" % number
        wait_until(
            lambda: socket_fds(proxy.process.pid) == sockets_before,
            "the crowd's sockets released",
            timeout=WAIT,
        )
        assert rss_kib(proxy.process.pid) - memory_before < 16 * 1024
    assert "stream ended inside a frame" in proxy.stderr  # random bytes: a length past the end
    assert "Traceback" not in proxy.stderr


def connect_past_a_full_backlog(vsock: Vsock) -> socket.socket:
    """A stream to STREAM_PORT; while the listener's backlog is full (EAGAIN over the
    emulation, ECONNRESET over vsock), try again."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            return vsock.client(STREAM_PORT)
        except (BlockingIOError, ConnectionResetError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


# --- peers that fail -----------------------------------------------------------------------


@pytest.mark.vsock
def test_a_stream_closed_under_a_datagram_is_reopened_and_the_datagram_sent_again(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    """vsock-to-udp closes a flow's stream (idle, or at its flow limit) just as the client
    sends again from the same port: udp-to-vsock sends the unanswered datagram again on a new
    stream. A flow that never had a reply is not reopened (no loop against a peer that
    closes every stream at once)."""
    port = free_udp_port()
    address = ("127.0.0.1", port)
    with (
        vsock_link.listener(STREAM_PORT, timeout=2 * SLOWDOWN) as listener,
        steady_proxy(
            vsock_link, "udp-to-vsock", "-i", f"127.0.0.1:{port}", "-v",
            vsock_link.address(STREAM_PORT), log_dir=tmp_path,
        ) as proxy,
        udp_client() as client,
    ):  # fmt: skip
        client.sendto(b"q1", address)
        first, _ = listener.accept()
        with first:
            first.settimeout(WAIT)
            assert recv_exactly(first, 4) == b"\x00\x02q1"
            first.sendall(encode_frame(b"a1"))
            assert client.recvfrom(10) == (b"a1", address)
            client.sendto(b"q2", address)
            assert first.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL) == b"\x00\x02q2"
        second, _ = listener.accept()  # closed with q2 unread: q2 again, on a new stream
        with second:
            second.settimeout(WAIT)
            assert recv_exactly(second, 4) == b"\x00\x02q2"
            second.sendall(encode_frame(b"a2"))
            assert client.recvfrom(10) == (b"a2", address)
        with udp_client() as fresh:
            fresh.sendto(b"never answered", address)
            third, _ = listener.accept()
            with third:
                third.settimeout(WAIT)
                assert len(recv_exactly(third, 16)) == 16
            with pytest.raises(TimeoutError):
                listener.accept()  # no reopening without an earlier reply
    assert "Dropping" not in proxy.stderr
    assert "1 reopened (closed by the peer under a datagram)" in proxy.stdout


@pytest.mark.vsock
def test_icmp_port_unreachable_ends_the_flow_with_a_log_line(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    dead = free_udp_port()
    with steady_proxy(
        vsock_link, "vsock-to-udp", "-v", vsock_link.listen_address(STREAM_PORT), "-i",
        f"127.0.0.1:{dead}", log_dir=tmp_path,
    ) as proxy:  # fmt: skip
        for _ in range(3):
            with vsock_link.client(STREAM_PORT) as stream:
                stream.sendall(encode_frame(b"anyone?"))
                assert stream.recv(10) == b""  # the flow ended: EOF (vsock has no reset)
    proxy.wait_for(
        f"127.0.0.1:{dead} is unreachable: [Errno 111] Connection refused (ICMP port "
        "unreachable)",
        stream="stderr",
    )
    assert proxy.stderr.count("ICMP port unreachable") == 3


@pytest.mark.vsock
def test_an_upstream_name_that_does_not_resolve_drops_each_flow_naming_it(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    with steady_proxy(
        vsock_link, "vsock-to-udp", "-v", vsock_link.listen_address(STREAM_PORT), "-i",
        "nothing.invalid:53", log_dir=tmp_path,
    ) as proxy:  # fmt: skip
        with vsock_link.client(STREAM_PORT) as stream:
            stream.sendall(encode_frame(b"query"))
            assert stream.recv(10) == b""
        proxy.wait_for(
            f"Dropping flow from {vsock_link.inbound_name(STREAM_PORT)}",
            stream="stderr",
        )
        proxy.wait_for("failed to resolve nothing.invalid:53: [Errno -", stream="stderr")
    proxy.wait_for("Proxying to: udp nothing.invalid:53")


@pytest.mark.vsock
def test_silent_peers_and_a_silent_upstream_cost_only_the_idle_timeout(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    """A stream that never sends, and an upstream that never answers: both flows end after
    --idle-timeout, quietly (no failure), and every socket is released."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        hole = black_hole.getsockname()[1]
        with steady_proxy(
            vsock_link, "vsock-to-udp", "-v", vsock_link.listen_address(STREAM_PORT), "-i",
            f"127.0.0.1:{hole}", "--idle-timeout", "1", log_dir=tmp_path,
        ) as proxy:  # fmt: skip
            with vsock_link.client(STREAM_PORT) as silent, vsock_link.client(STREAM_PORT) as asks:
                asks.sendall(encode_frame(b"hello?"))
                started = time.monotonic()
                assert silent.recv(10) == b"" and asks.recv(10) == b""
                assert 0.9 <= time.monotonic() - started < WAIT
            assert black_hole.recv(100) == b"hello?"
    assert "ERROR" not in proxy.stderr, proxy.stderr


@pytest.mark.vsock
def test_no_vsock_listener_drops_the_flow_naming_the_address(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    """ECONNRESET may be a full backlog: the connect is tried again within the connect
    timeout (counted), and the flow is dropped with a line saying so."""
    port, metrics_port = free_udp_port(), free_port()
    with (
        steady_proxy(
            vsock_link, "udp-to-vsock", "-i", f"127.0.0.1:{port}", "-v",
            vsock_link.address(5399), "--connect-timeout", "1",
            "--metrics", f"127.0.0.1:{metrics_port}", log_dir=tmp_path,
        ) as proxy,
        udp_client(timeout=1) as client,
    ):  # fmt: skip
        client.sendto(b"query", ("127.0.0.1", port))
        proxy.wait_for(
            f"Dropping flow from 127.0.0.1:{client.getsockname()[1]}: [Errno 104] failed to "
            f"connect to vsock endpoint {vsock_link.address(5399)}: nobody listens on vsock "
            f"{vsock_link.address(5399)}, or its listen backlog is full (Connection reset by peer)"
            "; retried ",
            stream="stderr",
        )
        with pytest.raises(TimeoutError):
            client.recv(10)
        retries = re.search(
            r"^pf_proxy_udp_vsock_connect_retries_total (\d+)\.0$", scrape(metrics_port)[1], re.M
        )
        assert retries and int(retries.group(1)) > 5, retries


@pytest.mark.vsock
def test_a_stalled_stream_drops_datagrams_not_memory_and_others_carry_on(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    """A stand-in for vsock-to-udp that never reads one flow's stream: udp-to-vsock holds
    back at most a little, drops the rest (counted, logged when the flow ends), and a second
    client's flow keeps working."""
    port = free_udp_port()
    address = ("127.0.0.1", port)
    with (
        vsock_link.listener(STREAM_PORT) as listener,
        running(
            "udp-to-vsock", "-i", f"127.0.0.1:{port}", "-v", vsock_link.address(STREAM_PORT),
            "--drain-timeout", "0", log_dir=tmp_path, env=vsock_link.env,
        ) as proxy,
        udp_client() as flooder,
        udp_client() as other,
    ):  # fmt: skip
        memory_before = rss_kib(proxy.process.pid)
        flooder.sendto(b"first", address)
        stalled, _ = listener.accept()
        with stalled:
            payload = b"f" * 1400
            for _ in range(20_000 if not in_guest() else 4000):  # 28 MB (5.6 in the guest)
                flooder.sendto(payload, address)
            working = first_stream(listener, other, b"hi", address)
            with working:
                working.settimeout(WAIT)
                assert recv_exactly(working, 4) == b"\x00\x02hi"
                working.sendall(encode_frame(b"hello"))
                assert other.recvfrom(100) == (b"hello", address)
            assert rss_kib(proxy.process.pid) - memory_before < 16 * 1024
            assert proxy.stop() == 0
    assert "Dropping" not in proxy.stderr
    assert "datagrams dropped: the vsock stream was slow" in proxy.stderr, proxy.stderr
    assert "(vsock stream slow)" in proxy.stdout and "dropped 0 (vsock" not in proxy.stdout


def first_stream(
    listener: socket.socket, client: socket.socket, datagram: bytes, address: tuple[str, int]
) -> socket.socket:
    """The stream a new flow opens, the client sending its datagram once a second until it
    comes (as a resolver retries): with the proxy's socket buffer full of a flood, the
    kernel drops a datagram before the proxy sees it, which is UDP, not the proxy."""
    deadline = time.monotonic() + WAIT
    listener.settimeout(1.0)
    while True:
        client.sendto(datagram, address)
        try:
            stream, _ = listener.accept()
            return stream
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


# --- flows end: idle, at the cap, at shutdown -------------------------------------------------


@pytest.mark.vsock
def test_idle_flows_are_freed_in_both_proxies(vsock_link: Vsock, tmp_path: Path) -> None:
    with (
        udp_echo(log_dir=tmp_path) as (_, echo_port),
        pair(vsock_link, f"127.0.0.1:{echo_port}", tmp_path, "--idle-timeout", "1") as (
            address, outer, inner,
        ),
        holding_steady(vsock_link, outer, inner),
    ):  # fmt: skip
        clients = [udp_client() for _ in range(20)]
        try:
            for number, client in enumerate(clients):
                assert ask(address, b"q%d" % number, client) == b"q%d" % number
            assert socket_fds(outer.process.pid) >= 20
        finally:
            for client in clients:
                client.close()
    for proxy in (outer, inner):
        assert "ERROR" not in proxy.stderr, proxy.stderr


@pytest.mark.parametrize(
    ("limited", "flows"), [("udp-to-vsock", 36), ("vsock-to-udp", 18)]
)
def test_at_the_flow_limit_the_idlest_flow_makes_room(
    limited: str, flows: int, tmp_path: Path, vsock_link: Vsock
) -> None:
    """With 100 descriptors udp-to-vsock serves 36 flows at once (a socket each) and
    vsock-to-udp 18 (two each). 300 clients through the pair, each from a new port: all
    answered, the limited proxy within its descriptors, the overload logged once."""
    with udp_echo(log_dir=tmp_path) as (_, echo_port):
        port = free_udp_port()
        inner = Proxy(
            [*prlimit(limited == "vsock-to-udp"), "vsock-to-udp", "-v",
             vsock_link.listen_address(STREAM_PORT), "-i", f"127.0.0.1:{echo_port}"],
            tmp_path, vsock_link.env,
        )  # fmt: skip
        outer = Proxy(
            [*prlimit(limited == "udp-to-vsock"), "udp-to-vsock", "-i", f"127.0.0.1:{port}",
             "-v", vsock_link.address(STREAM_PORT)],
            tmp_path, vsock_link.env,
        )  # fmt: skip
        proxy = outer if limited == "udp-to-vsock" else inner
        try:
            for started in (inner, outer):
                started.wait_ready()
            proxy.wait_for(f"Serving up to {flows} flows at once (open file limit 100)")
            for number in range(300):
                assert ask(("127.0.0.1", port), b"%d" % number) == b"%d" % number
                if number % 25 == 0:
                    assert socket_fds(proxy.process.pid) <= 100 - 64 + 10
        finally:
            codes = [started.stop() for started in (outer, inner)]
        assert codes == [0, 0]
    assert proxy.stderr.count("flows open, the limit") == 1, proxy.stderr
    assert "closing the flow idle the longest for each new one" in proxy.stderr
    assert "closed at the flow limit" in proxy.stdout
    assert "Dropping" not in outer.stderr + inner.stderr


def prlimit(limited: bool) -> list[str]:
    return ["prlimit", "--nofile=100:100"] if limited else []


@pytest.mark.vsock
def test_shutdown_opens_no_new_flows_and_lets_open_ones_finish(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    """SIGTERM: a new client gets nothing, the open flow is still answered, and the proxy
    exits 0 as soon as that flow idles out, long before the drain timeout."""
    with (
        udp_echo(log_dir=tmp_path) as (_, echo_port),
        pair(
            vsock_link, f"127.0.0.1:{echo_port}", tmp_path, "--idle-timeout", "2",
            "--drain-timeout", "60",
        ) as (address, outer, _),
        udp_client() as live,
        udp_client(timeout=1) as late,
    ):  # fmt: skip
        assert ask(address, b"before", live) == b"before"
        started = time.monotonic()
        outer.process.send_signal(signal.SIGTERM)
        outer.wait_for(f"Shutting down: no new flows on udp 127.0.0.1:{address[1]}")
        outer.wait_for("Draining 1 flows for up to 60 s")
        late.sendto(b"late", address)
        assert ask(address, b"during", live) == b"during"
        with pytest.raises(TimeoutError):
            late.recv(10)
        assert outer.process.wait(WAIT) == 0
        assert time.monotonic() - started < 30  # ended by the flow's idle timeout
    assert "still open after the drain" not in outer.stderr
    assert "udp-to-vsock: 1 flows (0 open), 2 datagrams to vsock, 2 from vsock" in outer.stdout


def test_a_listener_that_cannot_be_bound_exits_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = run_briefly(
            "udp-to-vsock", "-i", f"127.0.0.1:{port}", "-v", "88:53",
            env={"PF_PROXY_VSOCK_DIR": str(tmp_path)},
        )  # fmt: skip
    assert result.returncode == 1
    assert (
        f"Failed to bind listener to udp 127.0.0.1:{port}: Address already in use" in result.stderr
    )


# --- the glibc pattern: every lookup from a new source port -----------------------------------


def lookups_from_new_ports(
    address: tuple[str, int], rate: int, seconds: float
) -> tuple[int, int, int]:
    """Send `rate` datagrams a second for `seconds`, each from a new socket (a new source
    port), as glibc's stub resolver does; wait for every answer. (sent, answered, max open)."""
    sent = answered = 0
    open_sockets: dict[int, tuple[socket.socket, bytes, float]] = {}
    peak = 0
    started = time.monotonic()
    deadline = started + seconds
    next_send = started
    selector = selectors.DefaultSelector()
    try:
        while time.monotonic() < deadline or open_sockets:
            now = time.monotonic()
            while now >= next_send and now < deadline:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                payload = b"lookup %d" % sent
                sock.sendto(payload, address)
                open_sockets[sock.fileno()] = (sock, payload, now)
                selector.register(sock, selectors.EVENT_READ)
                sent += 1
                next_send += 1 / rate
            peak = max(peak, len(open_sockets))
            for key, _ in selector.select(timeout=0.001):
                sock, payload, _ = open_sockets.pop(key.fd)
                selector.unregister(sock)
                if sock.recv(1 << 16) == payload:
                    answered += 1
                sock.close()
            for fd, (sock, _, when) in list(open_sockets.items()):
                if time.monotonic() - when > 5:  # lost: glibc would retry after 5 s
                    del open_sockets[fd]
                    selector.unregister(sock)
                    sock.close()
    finally:
        for sock, _, _ in open_sockets.values():
            sock.close()
        selector.close()
    return sent, answered, peak


def test_a_thousand_lookups_a_second_from_new_ports_are_all_answered(
    tmp_path: Path, vsock_link: Vsock
) -> None:
    """The glibc pattern for 10 s at 1,000 a second with 3,000 descriptors per proxy (so
    vsock-to-udp reaches its flow limit after 1.5 s, and idle flows make room): every lookup
    answered, descriptors within the limit, memory flat."""
    with udp_echo(log_dir=tmp_path) as (_, echo_port):
        port = free_udp_port()
        limit = ["prlimit", "--nofile=3000:3000"]
        inner = Proxy(
            [*limit, "vsock-to-udp", "-v", vsock_link.listen_address(STREAM_PORT), "-i",
             f"127.0.0.1:{echo_port}"], tmp_path, vsock_link.env,
        )  # fmt: skip
        outer = Proxy(
            [*limit, "udp-to-vsock", "-i", f"127.0.0.1:{port}", "-v",
             vsock_link.address(STREAM_PORT)], tmp_path, vsock_link.env,
        )  # fmt: skip
        peaks = {"inner": 0, "outer": 0}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                for name, proxy in (("inner", inner), ("outer", outer)):
                    try:
                        peaks[name] = max(peaks[name], socket_fds(proxy.process.pid))
                    except OSError:
                        pass
                time.sleep(0.05)

        try:
            for proxy in (inner, outer):
                proxy.wait_ready()
            ask(("127.0.0.1", port), b"warm up")
            memory = [rss_kib(p.process.pid) for p in (inner, outer)]
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            sent, answered, _ = lookups_from_new_ports(("127.0.0.1", port), 1000, 10)
            stop.set()
            watcher.join()
            grown = [
                rss_kib(p.process.pid) - m for p, m in zip((inner, outer), memory, strict=True)
            ]
        finally:
            codes = [proxy.stop() for proxy in (outer, inner)]
    assert codes == [0, 0]
    assert sent >= 9000 and answered == sent, (sent, answered)
    # the flow limits from 3,000 descriptors: 2,936 flows (a socket each), 1,468 (two each)
    assert peaks["outer"] <= 2936 + 10 and peaks["inner"] <= 2 * 1468 + 10, peaks
    assert max(grown) < 16 * 1024, grown
    assert "Dropping" not in outer.stderr + inner.stderr
    assert "closed at the flow limit" in inner.stdout


# --- metrics ---------------------------------------------------------------------------------


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_metrics_count_flows_datagrams_and_drops(vsock_link: Vsock, tmp_path: Path) -> None:
    metrics_port = free_port()
    with (
        udp_echo(log_dir=tmp_path) as (_, echo_port),
        running(
            "vsock-to-udp", "-v", vsock_link.listen_address(5310), "-i", f"127.0.0.1:{echo_port}",
            "--metrics", f"127.0.0.1:{metrics_port}", log_dir=tmp_path, env=vsock_link.env,
        ) as inner,
    ):  # fmt: skip
        with vsock_link.client(5310) as stream:
            stream.sendall(b"".join(encode_frame(d) for d in (b"one", b"two", b"z" * 65535)))
            assert [read_frame(stream), read_frame(stream)] == [b"one", b"two"]
            status, text = scrape(metrics_port)
            assert status == 200
            for line in (
                'pf_proxy_info{command="vsock-to-udp",version="0.1.0"} 1.0',
                "pf_proxy_udp_flows_opened_total 1.0",
                "pf_proxy_udp_flows_open 1.0",
                'pf_proxy_udp_datagrams_total{direction="from_vsock"} 3.0',
                'pf_proxy_udp_datagrams_total{direction="to_vsock"} 2.0',
                'pf_proxy_udp_stream_bytes_total{direction="from_vsock"} 65547.0',  # 3 frames
                'pf_proxy_udp_stream_bytes_total{direction="to_vsock"} 10.0',
                'pf_proxy_udp_dropped_datagrams_total{reason="udp_refused"} 1.0',
                # 20,000 descriptors, less 64 spare and 128 for the metrics listener, 2 a flow
                "pf_proxy_udp_flow_limit 9904.0",
            ):
                assert line in text, (line, text)
            stream.sendall(b"\x00")  # then a cut frame
            stream.shutdown(socket.SHUT_WR)
            assert stream.recv(1) == b""
        wait_until(
            lambda: 'flows_closed_total{reason="failed"} 1.0' in scrape(metrics_port)[1],
            "the failed flow counted",
            timeout=WAIT,
        )
        assert scrape(metrics_port, "/healthz") == (200, "serving\n")
        with vsock_link.client(5310) as open_flow:
            open_flow.sendall(encode_frame(b"three"))
            assert read_frame(open_flow) == b"three"
            inner.process.send_signal(signal.SIGTERM)
            inner.wait_for("Draining 1 flows")
            assert scrape(metrics_port, "/healthz") == (
                503, "SIGTERM or SIGINT received: draining 1 flows\n"
            )
            assert open_flow.recv(1) == b""  # ended once idle for a second
        assert inner.process.wait(WAIT) == 0
