"""DNS through udp-to-vsock and vsock-to-udp, against the same DNS server directly and
through the socat pair people use today, in one run.

    python -m benchmarks.udppath [--quick] [--output FILE]
    python -m benchmarks --only udp          (the same figures in the main table)

Pairs, each in front of one dnsmasq on 127.0.0.1 answering from its own records:

    direct     the DNS server itself
    pf-proxy   udp-to-vsock -> emulated vsock (a Unix socket) -> vsock-to-udp
    socat      socat -T 30 UDP-LISTEN:P,fork UNIX-CONNECT:S -> socat -T 30 UNIX-LISTEN:S,fork
               UDP:dns (no framing: a datagram is whatever one read of the stream returns)
    mux prototype  benchmarks/muxpair.py: the same path in lean Python (one stream for all
               flows, nothing but the relaying); in the full-speed, latency and new-port parts

Figures:

- dnsperf at full speed (8 clients, 100 queries outstanding): queries per second and lost
  queries; then at 500 and 2,000 queries a second from one client, each query's latency
  (dnsperf -v): p50, p99, p99.9, and lost queries; and the p99 of all queries sent, a lost
  one counting as slower than any answer.
- Lookups from a new source port each (glibc's stub resolver does this; every lookup is a new
  flow, so a new vsock stream): lookups per second with 32 in flight; and 1,000 a second for a
  minute (20 s with --quick): answered, and each proxy's descriptors and memory.
- Memory per open flow: 5,000 clients (500 for socat, which forks two processes per flow)
  each send a lookup and keep their socket; resident memory of each proxy process after minus
  before, per flow (socat: PSS of all its processes per side).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from benchmarks.processes import (
    LIFETIME,
    VSOCK_CID,
    process,
    rss_kib,
    tree_pss_kib,
    wait_until,
)

KINDS = ("direct", "pf-proxy", "socat")
# The multiplexing prototype (benchmarks/muxpair.py): one stream for every flow.
PROTOTYPE = "mux prototype"
# With the prototype, which is built like the real pair but has nothing else (no flow table,
# expiry or failure handling): how much of the pair's latency and rate is Python itself.
LEAN = (*KINDS, PROTOTYPE)
NAMES = ["api.example.com", "www.example.com", "mail.example.com", "db.example.com"]
RECORDS = {name: [f"192.0.2.{n + 10}", f"2001:db8::{n + 10}"] for n, name in enumerate(NAMES)}
IDLE_TIMEOUT = 30  # seconds: ours (the default) and socat's -T


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- DNS messages (just enough to ask and to check an answer) ---------------------------------


def query(name: str, qtype: int = 1) -> tuple[int, bytes]:
    """A recursive query for `name` (A by default): (its id, its bytes)."""
    ident = secrets.randbelow(1 << 16)
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return ident, struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack(
        "!HH", qtype, 1
    )


def answers(message: bytes, ident: int) -> bool:
    """Whether `message` is a NOERROR response to query `ident` with at least one answer."""
    if len(message) < 12:
        return False
    got, flags, _, count = struct.unpack_from("!HHHH", message)
    return got == ident and flags & 0x8000 != 0 and flags & 0x000F == 0 and count > 0


# --- the DNS server and the pairs ------------------------------------------------------------


@dataclass
class Through:
    kind: str
    port: int
    pids: dict[str, int] = field(default_factory=dict)


@contextmanager
def dns_server(workdir: Path) -> Iterator[int]:
    """dnsmasq on 127.0.0.1, answering RECORDS (NXDOMAIN for anything else); a port taken
    meanwhile by somebody else is tried again with another."""
    for attempt in range(3):
        with ExitStack() as stack:
            try:
                port = stack.enter_context(_dns_server(workdir))
            except RuntimeError:
                if attempt == 2:
                    raise
                continue
            yield port
            return


@contextmanager
def _dns_server(workdir: Path) -> Iterator[int]:
    port = free_udp_port()
    hosts = workdir / f"hosts-{port}"
    hosts.write_text("".join(f"{a} {name}\n" for name, addrs in RECORDS.items() for a in addrs))
    args = [
        "dnsmasq", "--keep-in-foreground", "--no-daemon", "--conf-file=/dev/null",
        "--no-resolv", "--no-hosts", "--no-poll", f"--addn-hosts={hosts}", "--local=/#/",
        "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}", "--pid-file=",
        "--cache-size=10000", "--dns-forward-max=10000",
    ]  # fmt: skip
    if os.geteuid() == 0:
        args.append("--user=root")
    with process(args, workdir) as started:
        try:
            wait_until(lambda: _answers_at(port), "dnsmasq", timeout=5)
        except RuntimeError:
            errors = started.stdout.with_suffix(".err").read_text()[-500:]
            raise RuntimeError(f"dnsmasq on port {port} does not answer: {errors}") from None
        yield port


def _answers_at(port: int) -> bool:
    ident, message = query(NAMES[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.sendto(message, ("127.0.0.1", port))
        try:
            return answers(sock.recv(4096), ident)
        except OSError:
            return False


@contextmanager
def pair(kind: str, dns_port: int, workdir: Path) -> Iterator[Through]:
    if kind == "direct":
        yield Through(kind, dns_port)
        return
    port, vsock_port = free_udp_port(), free_udp_port()
    if kind == "pf-proxy":
        env = {"PF_PROXY_VSOCK_DIR": str(workdir)}
        address = f"{VSOCK_CID}:{vsock_port}"
        inner = ["vsock-to-udp", "-v", address, "-i", f"127.0.0.1:{dns_port}"]
        outer = ["udp-to-vsock", "-i", f"127.0.0.1:{port}", "-v", address]
        with process(inner, workdir, env) as inner_proc, process(outer, workdir, env) as outer:
            for started in (inner_proc, outer):
                wait_until(lambda s=started: s.said("Listening on:"), f"{started.proc.args}")
            pids = {"udp-to-vsock": outer.command_pid(), "vsock-to-udp": inner_proc.command_pid()}
            yield Through(kind, port, pids)
        return
    if kind == PROTOTYPE:
        path = workdir / f"mux-{port}.sock"
        module = [sys.executable, "-m", "benchmarks.muxpair"]
        inner = [*module, "inner", "--stream", str(path), "--upstream", str(dns_port)]
        outer = [*module, "outer", "--listen", str(port), "--stream", str(path)]
        with process(inner, workdir) as inner_proc:
            wait_until(lambda: inner_proc.said("ready"), "the prototype's inner side")
            with process(outer, workdir) as outer_proc:
                wait_until(lambda: outer_proc.said("ready"), "the prototype's outer side")
                pids = {"outer": outer_proc.command_pid(), "inner": inner_proc.command_pid()}
                yield Through(kind, port, pids)
        return
    assert kind == "socat", kind
    path = workdir / f"socat-{port}.sock"
    timeout = ["-T", str(IDLE_TIMEOUT)]
    inner = [
        "socat", *timeout, f"UNIX-LISTEN:{path},fork,backlog=1024", f"UDP:127.0.0.1:{dns_port}"
    ]  # fmt: skip
    outer = [
        "socat", *timeout, f"UDP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
        f"UNIX-CONNECT:{path}",
    ]  # fmt: skip
    with process(inner, workdir) as inner_proc:
        wait_until(path.exists, "socat UNIX-LISTEN")
        with process(outer, workdir) as outer_proc:
            pids = {"socat udp": outer_proc.command_pid(), "socat unix": inner_proc.command_pid()}
            try:
                wait_until(lambda: _answers_at(port), "the socat pair")
                yield Through(kind, port, pids)
            finally:
                for pid in pids.values():  # socat's forked children outlive their parent
                    _kill_children(pid)


def _kill_children(pid: int) -> None:
    """SIGKILL every descendant of `pid` (a process this benchmark started), by pid."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return
    for child in map(int, children):
        _kill_children(child)
        try:
            os.kill(child, 9)
        except ProcessLookupError:
            pass


# --- dnsperf ---------------------------------------------------------------------------------


def dnsperf(
    port: int, workdir: Path, seconds: float, *, rate: int | None = None, clients: int = 8
) -> dict[str, float]:
    """Run dnsperf against 127.0.0.1:`port`; queries per second and lost, and with `rate`
    (queries a second), every query's latency: p50, p99, p99.9 in microseconds."""
    queries = workdir / "queries.txt"
    queries.write_text("".join(f"{name} {kind}\n" for name in NAMES for kind in ("A", "AAAA")))
    args = [
        "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", f"{seconds:g}",
        "-c", str(clients), "-q", "100", "-t", "2",
    ]  # fmt: skip
    if rate is not None:
        args += ["-Q", str(rate), "-v"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    out = done.stdout
    figures = {
        "queries/s": float(_field(out, r"Queries per second:\s+([\d.]+)")),
        "lost": float(_field(out, r"Queries lost:\s+(\d+)")),
        "sent": float(_field(out, r"Queries sent:\s+(\d+)")),
    }
    if rate is not None:
        latencies = sorted(
            float(words[-1])
            for line in out.splitlines()
            if line[:2] == "> " and re.fullmatch(r"[\d.]+", (words := line.split())[-1])
        )  # "> NOERROR name A 0.000123"; a lost query's line has no latency
        for name, share in (("p50 us", 0.5), ("p99 us", 0.99), ("p99.9 us", 0.999)):
            figures[name] = latencies[min(len(latencies) - 1, int(share * len(latencies)))] * 1e6
        # The p99 of every query sent, a lost one counting as slower than any answer (its
        # client waits out a resolver timeout of seconds): inf when more than 1% were lost.
        at = int(0.99 * figures["sent"])
        figures["p99 of sent us"] = latencies[at] * 1e6 if at < len(latencies) else float("inf")
    return figures


def _field(text: str, pattern: str) -> str:
    found = re.search(pattern, text)
    if found is None:
        raise RuntimeError(f"dnsperf printed no {pattern!r}:\n{text[-2000:]}")
    return found.group(1)


# --- lookups from a new source port each -----------------------------------------------------


@dataclass
class Lookups:
    sent: int = 0
    answered: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0


def lookups_from_new_ports(
    port: int,
    seconds: float,
    *,
    in_flight: int | None = None,
    rate: float | None = None,
    timeout: float = 2.0,
    on_tick: Callable[[], None] | None = None,
) -> Lookups:
    """Lookups, each from a new UDP socket (so a new source port), as glibc's resolver makes
    them: `in_flight` at once as fast as they are answered, or `rate` a second. A lookup not
    answered within `timeout` seconds is lost. `on_tick` runs about every 0.1 s."""
    selector = selectors.DefaultSelector()
    pending: dict[int, tuple[socket.socket, int, float]] = {}
    result = Lookups()
    started = time.monotonic()
    deadline = started + seconds
    next_send, next_tick = started, started
    number = 0

    def send() -> None:
        nonlocal number
        ident, message = query(NAMES[number % len(NAMES)], 1 if number % 2 else 28)
        number += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.sendto(message, ("127.0.0.1", port))
        pending[sock.fileno()] = (sock, ident, time.monotonic())
        selector.register(sock, selectors.EVENT_READ)
        result.sent += 1

    def forget(fd: int) -> tuple[socket.socket, int, float]:
        entry = pending.pop(fd)
        selector.unregister(entry[0])
        entry[0].close()
        return entry

    try:
        while True:
            now = time.monotonic()
            if now < deadline:
                if in_flight is not None:
                    while len(pending) < in_flight:
                        send()
                else:
                    assert rate is not None
                    while next_send <= now:
                        send()
                        next_send += 1 / rate
            elif not pending:
                break
            for key, _ in selector.select(timeout=0.001):
                sock, ident, _ = pending[key.fd]
                try:
                    message = sock.recv(4096)
                except OSError:
                    message = b""
                forget(key.fd)
                result.answered += answers(message, ident)
            if now >= next_tick:
                next_tick = now + 0.1
                for fd, (_, _, when) in list(pending.items()):
                    if now - when > timeout:
                        forget(fd)
                if on_tick is not None:
                    on_tick()
        result.seconds = min(time.monotonic(), deadline) - started
    finally:
        for fd in list(pending):
            forget(fd)
        selector.close()
    return result


def lookups_on_the_same_ports(port: int, seconds: float, sockets: int = 32) -> Lookups:
    """Lookups from `sockets` sockets, each asking again once answered: the flows stay open,
    so this is the cost of a lookup without that of opening a flow."""
    selector = selectors.DefaultSelector()
    asked: dict[int, tuple[socket.socket, int, float]] = {}
    result = Lookups()
    started = time.monotonic()
    deadline = started + seconds

    def ask(sock: socket.socket) -> None:
        ident, message = query(NAMES[result.sent % len(NAMES)], 1 if result.sent % 2 else 28)
        sock.sendto(message, ("127.0.0.1", port))
        asked[sock.fileno()] = (sock, ident, time.monotonic())
        result.sent += 1

    own = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(sockets)]
    try:
        for sock in own:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            ask(sock)
        while time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.01):
                sock, ident, _ = asked[key.fd]
                try:
                    result.answered += answers(sock.recv(4096), ident)
                except OSError:
                    pass
                ask(sock)
            now = time.monotonic()
            for sock, _, when in list(asked.values()):
                if now - when > 2.0:  # lost: ask again
                    ask(sock)
        result.seconds = time.monotonic() - started
    finally:
        for sock in own:
            sock.close()
        selector.close()
    return result


def lookups(port: int, seconds: float, *, new_ports: bool) -> Lookups:
    """32 lookups in flight, from a new port each or from 32 ports reused."""
    if new_ports:
        return lookups_from_new_ports(port, seconds, in_flight=32)
    return lookups_on_the_same_ports(port, seconds)


def socket_count(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def sustained(port: int, through: Through, seconds: float, rate: int) -> dict[str, float]:
    """`rate` lookups a second from new ports for `seconds`: answered share, and each proxy
    process's peak sockets and memory growth (KiB)."""
    peaks = {name: 0 for name in through.pids}
    before = {name: rss_kib(pid) for name, pid in through.pids.items()}
    high = dict(before)

    def watch() -> None:
        for name, pid in through.pids.items():
            peaks[name] = max(peaks[name], socket_count(pid))
            high[name] = max(high[name], rss_kib(pid))

    done = lookups_from_new_ports(port, seconds, rate=rate, timeout=5.0, on_tick=watch)
    figures = {"sent": float(done.sent), "answered": float(done.answered)}
    for name in through.pids:
        figures[f"{name} peak sockets"] = float(peaks[name])
        figures[f"{name} memory growth KiB"] = float(high[name] - before[name])
    return figures


# --- memory per open flow ----------------------------------------------------------------------


def memory_per_flow(port: int, through: Through, flows: int) -> dict[str, float]:
    """Open `flows` flows (a client socket each, one answered lookup) and keep them; memory
    per flow of each proxy process (socat: PSS of the process and its children)."""
    measure = rss_kib if through.kind == "pf-proxy" else tree_pss_kib
    before = {name: measure(pid) for name, pid in through.pids.items()}
    sockets = []
    answered = 0
    try:
        for number in range(flows):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(5)
            sockets.append(sock)
            ident, message = query(NAMES[number % len(NAMES)])
            sock.sendto(message, ("127.0.0.1", port))
            try:
                answered += answers(sock.recv(4096), ident)
            except OSError:
                pass
        time.sleep(1.0)
        after = {name: measure(pid) for name, pid in through.pids.items()}
    finally:
        for sock in sockets:
            sock.close()
    figures = {"answered": float(answered)}
    for name in through.pids:
        figures[f"{name} KiB per flow"] = (after[name] - before[name]) / flows
    return figures


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    runs: int = 3
    seconds: float = 5.0
    sustained_seconds: float = 60.0
    memory_flows: int = 5000
    socat_memory_flows: int = 500


Results = dict[str, dict[str, float]]


def sample(
    settings: Settings,
    workdir: Path,
    name: str,
    measure: Callable[[Through], dict[str, float]],
    kinds: tuple[str, ...] = KINDS,
) -> Results:
    """Medians over the runs, each run measuring every pair in turn."""
    samples: dict[str, dict[str, list[float]]] = {kind: {} for kind in kinds}
    for run in range(settings.runs):
        for kind in kinds:
            with dns_server(workdir) as dns, pair(kind, dns, workdir) as through:
                figures = measure(through)
            for figure, value in figures.items():
                samples[kind].setdefault(figure, []).append(value)
            shown = ", ".join(f"{figure} {value:.4g}" for figure, value in figures.items())
            _progress(f"udp {name} run {run + 1} {kind}: {shown}")
    return {
        kind: {figure: median(values) for figure, values in by.items()}
        for kind, by in samples.items()
    }


LATENCY_RATES = (500, 2000)  # queries a second, one dnsperf client: what a host's resolver sees
PARTS = ("full", "latency", "ports", "sustained", "memory")


def measure_all(
    settings: Settings, workdir: Path, parts: tuple[str, ...] = PARTS
) -> dict[str, Results]:
    seconds = settings.seconds
    results: dict[str, Results] = {}
    if "full" in parts:
        results["full speed"] = sample(
            settings, workdir, "dnsperf", lambda t: dnsperf(t.port, workdir, seconds), LEAN
        )
    for rate in LATENCY_RATES if "latency" in parts else ():
        results[f"{rate} queries/s"] = sample(
            settings, workdir, f"latency {rate}/s",
            lambda t, rate=rate: dnsperf(t.port, workdir, 2 * seconds, rate=rate, clients=1),
            LEAN,
        )  # fmt: skip
    if "ports" in parts:
        results["32 in flight: a new port each, or 32 ports reused"] = sample(
            settings, workdir, "new ports",
            lambda t: {
                "new ports, lookups/s": lookups(t.port, seconds, new_ports=True).per_second,
                "same ports, lookups/s": lookups(t.port, seconds, new_ports=False).per_second,
            },
            LEAN,
        )  # fmt: skip
    if "sustained" in parts:
        with dns_server(workdir) as dns, pair("pf-proxy", dns, workdir) as through:
            results["1,000/s from new ports"] = {
                "pf-proxy": sustained(through.port, through, settings.sustained_seconds, 1000)
            }
        _progress(f"udp sustained: {results['1,000/s from new ports']}")
    if "memory" in parts:
        memory: Results = {}
        sizes = (("pf-proxy", settings.memory_flows), ("socat", settings.socat_memory_flows))
        for kind, flows in sizes:
            with dns_server(workdir) as dns, pair(kind, dns, workdir) as through:
                memory[kind] = memory_per_flow(through.port, through, flows)
            _progress(f"udp memory {kind}: {memory[kind]}")
        results["memory per open flow"] = memory
    return results


def report(results: dict[str, Results]) -> str:
    lines = []
    for title, by_kind in results.items():
        figures = list(dict.fromkeys(f for values in by_kind.values() for f in values))
        lines += [f"**{title}**", "", "| pair | " + " | ".join(figures) + " |"]
        lines.append("|---" * (len(figures) + 1) + "|")
        for kind, values in by_kind.items():
            cells = " | ".join(_number(values.get(figure)) for figure in figures)
            lines.append(f"| {kind} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "over 1% lost"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short run of each")
    parser.add_argument("--output", type=Path, help="also write the tables (markdown) here")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    args = parser.parse_args(argv)
    settings = (
        Settings(runs=1, seconds=3, sustained_seconds=20, memory_flows=2000, socat_memory_flows=200)
        if args.quick
        else Settings()
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pfp-bench-udp-") as name:
        results = measure_all(settings, Path(name), tuple(args.parts.split(",")))
    text = report(results)
    print(text)
    if args.output:
        args.output.write_text(
            f"Medians of {settings.runs}; {time.monotonic() - started:.0f} s "
            f"({time.strftime('%Y-%m-%d %H:%M')}).\n\n{text}"
        )
    return 0


assert LIFETIME > 60  # every process of a run outlives its longest measurement

if __name__ == "__main__":
    raise SystemExit(main())
