"""The four raw-proxy commands as processes: flags, start-up failures, and bounded memory when
the vsock peer stops reading. (The whole deployment is in test_raw_e2e.py.)"""

from __future__ import annotations

import random
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import open_fds, rss_kib, run_briefly, wait_until
from tests.integration.namespaced import WAIT, NsProxy, in_netns
from tests.integration.test_nfq import queue_state
from tests.netns import Netns, netns

SO_SNDBUFFORCE = 32  # asm-generic/socket.h: SO_SNDBUF beyond wmem_max (root)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["ip-to-vsock-raw-incoming", "-v", "88-1200", "-q", "0"], "'-v' / '--vsock-addr'"),
        (["ip-to-vsock-raw-incoming", "-v", "88:1200"], "'-q' / '--queue-num'"),
        (["ip-to-vsock-raw-outgoing", "-v", "3:1200", "-q", "65536"], "'-q' / '--queue-num'"),
        (["ip-to-vsock-raw-outgoing", "-v", "3:1200", "-q", "one"], "'-q' / '--queue-num'"),
        (["vsock-to-ip-raw-incoming", "-v", "88:1200"], "'-d' / '--device'"),
        (["vsock-to-ip-raw-incoming", "-v", "88", "-d", "lo"], "'-v' / '--vsock-addr'"),
        (["vsock-to-ip-raw-outgoing"], "'-v' / '--vsock-addr'"),
        (
            ["vsock-to-ip-raw-outgoing", "-v", "3:1200", "--stats-interval", "-1"],
            "'--stats-interval'",
        ),
    ],
)
def test_usage_errors_exit_2_naming_the_flag(args: list[str], flag: str) -> None:
    result = run_briefly(*args)
    assert result.returncode == 2, result
    assert flag in result.stderr


def test_missing_or_bad_ip_file_exits_1_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.txt"
    result = run_briefly("vsock-to-ip-raw-incoming", "-v", "88:1200", "-d", "lo",
                         "--ip-file", str(missing))  # fmt: skip
    assert result.returncode == 1
    assert f"failed to read the enclave address from {missing}" in result.stderr
    bad = tmp_path / "ip.txt"
    bad.write_text("not-an-address\n")
    result = run_briefly("vsock-to-ip-raw-incoming", "-v", "88:1200", "-d", "lo",
                         "--ip-file", str(bad))  # fmt: skip
    assert result.returncode == 1
    assert f"{bad} does not hold an IPv4 address" in result.stderr


@pytest.fixture
def bare() -> Iterator[Netns]:
    """A namespace with only lo (no eth*/ens* interface)."""
    with netns("pfp-rawcmd") as ns:
        yield ns


@pytest.mark.root
def test_outgoing_without_a_matching_interface_exits_1(bare: Netns) -> None:
    bare.run("ip", "link", "add", "eth7", "type", "veth", "peer", "name", "ens8")  # no addresses
    result = bare.run("vsock-to-ip-raw-outgoing", "-v", "3:1200", check=False)
    assert result.returncode == 1
    assert "no matching interface found" in result.stderr
    for device in ("eth7", "nosuch0"):
        result = bare.run(
            "vsock-to-ip-raw-outgoing", "-v", "3:1200", "--device", device, check=False
        )
        assert result.returncode == 1
        assert f"device {device} has no IPv4 address (or does not exist)" in result.stderr


@pytest.mark.root
def test_a_stalled_vsock_peer_stops_the_queue_reads_not_memory(bare: Netns, tmp_path: Path) -> None:
    """The peer accepts but never reads: the proxy fills the stream, then stops reading the
    queue; the kernel queue overflows and drops, the proxy's memory stays flat."""
    bare.run("ip", "link", "set", "lo", "mtu", "9001")
    bare.run("iptables", "-A", "OUTPUT", "-p", "udp", "--dport", "9999",
             "-j", "NFQUEUE", "--queue-num", "3")  # fmt: skip
    vsock_dir = tmp_path / "vs"
    vsock_dir.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
        stalled.bind(str(vsock_dir / "3_1200.sock"))
        stalled.listen()
        proxy = NsProxy(bare, ["ip-to-vsock-raw-outgoing", "-v", "3:1200", "-q", "3"],
                        tmp_path, {"PF_PROXY_VSOCK_DIR": str(vsock_dir)})  # fmt: skip
        try:
            proxy.wait_for("Connected to vsock 3:1200")
            conn, _ = stalled.accept()  # accepted, never read
            start_rss = rss_kib(proxy.process.pid)
            sender = in_netns(bare, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            # Queued packets stay charged to the sender's buffer: make it big enough to fill
            # the kernel queue (1024 packets), and never block on it.
            sender.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 64 << 20)
            sender.setblocking(False)
            with sender, conn:
                for _ in range(20_000):  # 180 MB offered, far beyond every buffer on the way
                    try:
                        sender.sendto(bytes(8972), ("127.0.0.1", 9999))
                    except BlockingIOError:
                        time.sleep(0.001)
                deadline = time.monotonic() + WAIT
                while not overflowed(queue_state(bare, 3)):
                    assert time.monotonic() < deadline, "the kernel queue never overflowed"
                    time.sleep(0.1)
                growth = rss_kib(proxy.process.pid) - start_rss
                assert growth < 32 * 1024, f"RSS grew by {growth} KiB"
                assert proxy.process.poll() is None
        finally:
            assert proxy.stop() == 0


def overflowed(state: dict[str, int]) -> bool:
    """The kernel dropped queued packets: the queue was full (queue_dropped) or the reader's
    socket buffer was (user_dropped)."""
    return state["queue_dropped"] + state["user_dropped"] > 0


# --- hostile peers on the raw proxies' vsock listeners ---------------------------------------

FLOOD = 2000  # connections opened at once, then dropped at once


def ipv4_packet(source: str, destination: str, protocol: int, payload: bytes) -> bytes:
    """An IPv4 packet (header checksum left to the kernel, as a raw socket allows)."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, protocol,
                         0, socket.inet_aton(source), socket.inet_aton(destination))  # fmt: skip
    return header + payload


def forwarded(proxy: NsProxy) -> int:
    counts = re.findall(r": forwarded (\d+) packets", proxy.stdout)
    return int(counts[-1]) if counts else 0


def send_stream(path: Path, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(data)


@pytest.mark.root
@pytest.mark.parametrize("command", ["vsock-to-ip-raw-incoming", "vsock-to-ip-raw-outgoing"])
def test_hostile_peers_on_a_raw_listener(bare: Netns, tmp_path: Path, command: str) -> None:
    """Random bytes, half-written packets, a silent connection and FLOOD connections opened and
    dropped at once: the proxy stays up, releases its descriptors, keeps its memory, and an
    ordinary packet afterwards is forwarded."""
    vsock_dir = tmp_path / "vs"
    vsock_dir.mkdir()
    if command == "vsock-to-ip-raw-incoming":
        (tmp_path / "ip.txt").write_text("127.0.0.1\n")
        args = ["-v", "88:1200", "-d", "lo", "--ip-file", str(tmp_path / "ip.txt")]
        good = ipv4_packet("127.0.0.1", "127.0.0.1", socket.IPPROTO_UDP,
                           struct.pack("!HHHH", 40000, 9999, 12, 0) + b"ping")  # fmt: skip
        path = vsock_dir / "88_1200.sock"
    else:
        bare.run("ip", "link", "add", "eth7", "type", "veth", "peer", "name", "ens8")
        bare.run("ip", "addr", "add", "11.22.33.1/24", "dev", "eth7")
        bare.run("ip", "link", "set", "eth7", "up")
        bare.run("ip", "link", "set", "ens8", "up")
        args = ["-v", "3:1200"]
        syn = struct.pack("!HHIIBBHHH", 40000, 8080, 1, 0, 0x50, 0x02, 65535, 0, 0)
        good = ipv4_packet("11.22.33.1", "11.22.33.2", socket.IPPROTO_TCP, syn)
        path = vsock_dir / "3_1200.sock"
    proxy = NsProxy(bare, [command, *args, "--stats-interval", "0.2"], tmp_path,
                    {"PF_PROXY_VSOCK_DIR": str(vsock_dir)})  # fmt: skip
    try:
        proxy.wait_for("Listening on:")
        pid = proxy.process.pid
        send_stream(path, good)
        wait_until(lambda: forwarded(proxy) == 1, "the warm-up packet", timeout=WAIT)
        rss_before, fds_before = rss_kib(pid), open_fds(pid)

        rng = random.Random(f"hostile {command}")
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(path))  # opens and never sends
        for _ in range(30):
            send_stream(path, rng.randbytes(rng.choice([1, 3, 20, 100, 4096])))
        # (each connection replaces the one before: wait for the proxy to read these two)
        send_stream(path, good[:10])  # a packet cut short
        proxy.wait_for("closed inside a packet (10 bytes of it dropped)", stream="stderr")
        send_stream(path, bytes([0x45, 0, 0, 4]) + bytes(16))  # total length 4
        proxy.wait_for("IPv4 total length 4 is under 20", stream="stderr")
        silent.close()

        flood = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(FLOOD)]
        try:
            for index, sock in enumerate(flood):
                sock.connect(str(path))  # blocking: waits while the backlog is full
                if index % 2:
                    try:
                        sock.send(rng.randbytes(50))
                    except OSError:
                        pass  # already replaced and closed by the proxy
        finally:
            for sock in flood:
                sock.close()

        wait_until(
            lambda: open_fds(pid) <= fds_before + 2,
            "the proxy to release the flood's descriptors",
        )
        growth = rss_kib(pid) - rss_before
        assert growth < 20 * 1024, f"RSS grew by {growth} KiB"
        send_stream(path, good)
        wait_until(
            lambda: forwarded(proxy) == 2,
            "an ordinary packet after the hostile peers",
            timeout=WAIT,
        )
        assert proxy.process.poll() is None
        assert "Traceback" not in proxy.stderr
    finally:
        assert proxy.stop() == 0
