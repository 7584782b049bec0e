"""`pf-proxy run`: a whole enclave network from one file, both sides, with real traffic through
every kind at once; what `pf-proxy rules` prints is what the namespaces are set up with.

    internet (S: servers, dnsmasq)  --veth, MTU 9001--  host (eth0: X)  ==vsock==  enclave (lo: X)
                                                        pf-proxy run --side parent   --side enclave

One description (ingress, transparent egress, DNS over UDP and TCP, the tuna raw path) plus two
proxy tables (transparent-port-to-vsock on the parent, its target in the enclave) make 16
proxies of all eleven kinds in two processes. The enclave namespace is set up only by `pf-proxy
rules FILE --side enclave`, the host's firewall only by `--side parent` (and one REDIRECT rule
of the test's own for transparent-port-to-vsock). Emulated vsock between the two.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import pytest

from tests.integration.dnsserver import dnsmasq
from tests.integration.helpers import (
    BOTH_LOOPS,
    Proxy,
    ThreadedServer,
    exchange,
    free_port,
    listening_socket,
    run_briefly,
    served_on,
    two_free_ports,
    wait_until,
)
from tests.integration.namespaced import (
    WAIT,
    NsProxy,
    Server,
    etc_file,
    in_netns,
    same_bytes,
    tcp_socket_in,
)
from tests.integration.prometheus import prometheus
from tests.netns import Netns, netns, veth
from tests.vsocks import vsock_under_test

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

SHARED = "11.22.33.1"  # X: the host's eth0 and the enclave's lo
SERVER = "11.22.33.2"  # S: the internet namespace
INGRESS_PORT, ENCLAVE_SERVICE = 62443, 7443  # parent's 127.0.0.1:62443 -> enclave's :7443
BY_PORT, BY_PORT_LISTENER = 62080, 62001  # S -> X:62080, REDIRECTed to 62001 on the parent
RAW_OUT_PORT, RAW_IN_PORT = 5000, 5001  # through the raw path, each way
METRICS = 19377

FILE = f"""
metrics = "127.0.0.1:{METRICS}"

[enclave]
cid = 88

[[ingress]]
listen = "127.0.0.1:{INGRESS_PORT}"
target = "127.0.0.1:{ENCLAVE_SERVICE}"
vsock-port = {ENCLAVE_SERVICE}

[egress]
ports = [80]
deny = ["10.0.0.0/8"]

[dns]
upstream = "{SERVER}:53"

[raw]
interface = "eth0"
ip-file = "{{ip_file}}"

[proxy.by-port]
side = "parent"
kind = "transparent-port-to-vsock"
ip-addr = "0.0.0.0:{BY_PORT_LISTENER}"
vsock = "88"

[proxy.by-port-target]
side = "enclave"
kind = "vsock-to-ip"
vsock-addr = "88:{BY_PORT}"
ip-addr = "127.0.0.1:{ENCLAVE_SERVICE}"
"""


@dataclass
class Network:
    enclave: Netns
    host: Netns
    internet: Netns
    file: Path
    sides: dict[str, NsProxy]


def rules(file: Path, side: str) -> str:
    done = run_briefly("pf-proxy", "rules", str(file), "--side", side)
    assert done.returncode == 0, done
    return done.stdout


@contextmanager
def whole_network(tmp_path: Path, loop: dict[str, str]) -> Iterator[Network]:
    with ExitStack() as stack:
        vsock = stack.enter_context(vsock_under_test())
        enclave = stack.enter_context(netns("pfp-run-enclave"))
        host = stack.enter_context(netns("pfp-run-host"))
        internet = stack.enter_context(netns("pfp-run-inet"))
        veth(host, "eth0", internet, "eth0", mtu=9001)
        host.run("ip", "addr", "add", f"{SHARED}/24", "dev", "eth0")
        internet.run("ip", "addr", "add", f"{SERVER}/24", "dev", "eth0")
        ip_file = tmp_path / "ip.txt"
        ip_file.write_text(f"{SHARED}\n")
        file = tmp_path / "enclave.toml"
        file.write_text(FILE.replace("{ip_file}", str(ip_file)))
        # /etc/resolv.conf as the enclave's processes see it (the rules write it)
        resolv = stack.enter_context(etc_file(enclave, "resolv.conf", "# before the rules\n"))
        enclave.run("sh", "-ec", rules(file, "enclave"))
        assert resolv.read_text().startswith("nameserver 127.0.0.1\n")
        host.run("sh", "-ec", rules(file, "parent"))
        host.run("iptables", "-t", "nat", "-A", "PREROUTING", "-i", "eth0", "-p", "tcp",
                 "--dport", str(BY_PORT), "-j", "REDIRECT", "--to-ports",
                 str(BY_PORT_LISTENER))  # fmt: skip
        sides = {}
        for side, ns in (("parent", host), ("enclave", enclave)):
            sides[side] = NsProxy(
                ns, ["pf-proxy", "run", str(file), "--side", side], tmp_path, {**vsock.env, **loop}
            )
        for side, link in (("enclave", "raw-outgoing"), ("parent", "raw-incoming")):
            sides[side].wait_for(f"[{link}] Connected to vsock")
        network = Network(enclave, host, internet, file, sides)
        try:
            yield network
        finally:
            codes = {side: running.stop() for side, running in sides.items()}
            assert codes == {"parent": 0, "enclave": 0}, {
                side: running.stderr for side, running in sides.items()
            }


class Sink(ThreadedServer):
    """Per connection: read a 4-byte length, send back that many bytes of a pattern."""

    def handle(self, conn: socket.socket) -> None:
        size = int.from_bytes(_recv_exactly(conn, 4), "big")
        conn.sendall(_pattern(size))
        conn.shutdown(socket.SHUT_WR)


def _pattern(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _fetch(ns: Netns, address: tuple[str, int], size: int) -> bytes:
    with tcp_socket_in(ns) as client:
        client.connect(address)
        client.sendall(size.to_bytes(4, "big"))
        chunks = []
        while chunk := client.recv(1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)


def _echoed(ns: Netns, address: tuple[str, int], payload: bytes) -> bytes:
    with tcp_socket_in(ns) as client:
        client.connect(address)
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := client.recv(1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)


@BOTH_LOOPS
def test_one_file_serves_a_whole_enclave_network_on_both_sides(
    tmp_path: Path, loop: dict[str, str]
) -> None:
    with whole_network(tmp_path, loop) as net, ExitStack() as servers:
        enclave, host, internet = net.enclave, net.host, net.internet
        make = lambda ns, host_, port: in_netns(ns, lambda: listening_socket(host_, port))  # noqa: E731
        servers.callback(Server(make(enclave, "127.0.0.1", ENCLAVE_SERVICE)).close)
        servers.callback(Server(make(internet, SERVER, 80), greeting=b"web:").close)
        servers.callback(Sink(make(internet, SERVER, RAW_OUT_PORT)).close)
        servers.callback(Sink(make(enclave, SHARED, RAW_IN_PORT)).close)
        dns = servers.enter_context(dnsmasq(internet, SERVER, tmp_path,
                                            hosts={"api.example.com": ["192.0.2.80"]}))  # fmt: skip

        # ingress: the parent's listener -> vsock 88:7443 -> the enclave's service
        payload = os.urandom(1 << 20)
        same_bytes(_echoed(host, ("127.0.0.1", INGRESS_PORT), payload), payload)
        # transparent egress: REDIRECT in the enclave, the destination header, the parent dials
        assert _echoed(enclave, (SERVER, 80), b"hello") == b"web:hello"
        # DNS over UDP and (dig +tcp) over TCP, to dnsmasq beyond the parent
        for transport in ("+notcp", "+tcp"):
            answer = enclave.run("dig", "@127.0.0.1", "api.example.com", "+short", transport,
                                 "+time=5", "+tries=1").stdout  # fmt: skip
            assert answer.split() == ["192.0.2.80"], transport
        assert "api.example.com" in dns.log
        # transparent-port-to-vsock: S -> X:62080 -> REDIRECT -> vsock 88:62080 -> the service
        assert _echoed(internet, (SHARED, BY_PORT), b"by port") == b"by port"
        # the raw path: the enclave's own TCP out (nfqueue -> vsock -> raw socket), 8 MiB
        # jumbo-framed, and a connection from the internet into the enclave's address
        assert _fetch(enclave, (SERVER, RAW_OUT_PORT), 8 << 20) == _pattern(8 << 20)
        assert _fetch(internet, (SHARED, RAW_IN_PORT), 1 << 20) == _pattern(1 << 20)

        # one /metrics per process, every series labelled with its proxy, scraped by Prometheus
        with prometheus(tmp_path, [f"127.0.0.1:{METRICS}"], ns=host) as server:
            completed = 'pf_proxy_tcp_connections_ended_total{outcome="completed",proxy="%s"}'
            server.wait_for(completed % "ingress-7443", 1)
            server.wait_for(completed % "egress", 1)
            server.wait_for(completed % "by-port", 1)
            server.wait_for(completed % "dns-tcp", 1)
            server.wait_for('pf_proxy_udp_flows_opened_total{proxy="dns-udp"}', 1)
            server.wait_for('pf_proxy_raw_link_up{proxy="raw-incoming"}', 1)
            # the 8 MiB (and the 1 MiB's handshake) came in through it
            into_enclave = server.value('pf_proxy_raw_forwarded_bytes_total{proxy="raw-incoming"}')
            assert into_enclave is not None and into_enclave > 8 << 20
            kinds = {labels["command"] for labels, _ in server.query("pf_proxy_info")}
            assert kinds == {"ip-to-vsock", "vsock-to-ip-transparent", "vsock-to-udp",
                             "vsock-to-ip", "ip-to-vsock-raw-incoming",
                             "vsock-to-ip-raw-outgoing", "transparent-port-to-vsock"}  # fmt: skip

    logs = {side: running.stdout for side, running in net.sides.items()}
    assert all(served_on(loop, log) for log in logs.values()), logs
    assert "[egress] Original destination: 11.22.33.2:80" in logs["enclave"]
    assert "[egress] Proxying to: 11.22.33.2:80" in logs["parent"]
    assert "[by-port] Original destination: 11.22.33.1:62080" in logs["parent"]
    assert "[dns-udp] Listening on: udp 127.0.0.1:53" in logs["enclave"]
    for side in ("enclave", "parent"):  # a raw link may come up before its listener: retried
        errors = [line for line in net.sides[side].stderr.splitlines() if "retrying in" not in line]
        assert errors == [], net.sides[side].stderr


# --- start-up failures -------------------------------------------------------------------------


def test_a_proxy_that_cannot_bind_stops_the_start_naming_it(tmp_path: Path) -> None:
    """Exit 1 naming the proxy; nothing was listening, nothing is left running."""
    taken = listening_socket("127.0.0.1")
    first, third = free_port(), free_port()
    file = tmp_path / "run.toml"
    file.write_text(
        f'[proxy.first]\nkind = "ip-to-vsock"\nip-addr = "127.0.0.1:{first}"\n'
        'vsock-addr = "88:1"\n'
        f'[proxy.busy]\nkind = "ip-to-vsock"\nip-addr = "127.0.0.1:{taken.getsockname()[1]}"\n'
        'vsock-addr = "88:2"\n'
        f'[proxy.dns]\nkind = "udp-to-vsock"\nip-addr = "127.0.0.1:{third}"\n'
        'vsock-addr = "3:53"\n'
    )
    with taken, vsock_under_test() as vsock:
        done = run_briefly("pf-proxy", "run", str(file), env=vsock.env)
        assert done.returncode == 1, done
        assert (
            f"ERROR proxy 'busy' (ip-to-vsock): Failed to bind listener to "
            f"127.0.0.1:{taken.getsockname()[1]}: Address already in use"
        ) in done.stderr
        assert "Listening on" not in done.stdout
        assert "Traceback" not in done.stderr
        for port in (first, third):  # free again: what was bound first was closed
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[proxy.a]\nkind = "vsock-to-ip"\n', "run.toml:1: proxy.a.vsock-addr: missing"),
        ("[proxy.a\n", "run.toml:1: (syntax): not valid TOML"),
        ('[proxy.a]\nkind = "x"\n', "run.toml:2: proxy.a.kind: unknown kind 'x'"),
    ],
)
def test_run_and_check_refuse_a_bad_file_with_exit_2(
    tmp_path: Path, text: str, expected: str
) -> None:
    file = tmp_path / "run.toml"
    file.write_text(text)
    os.chdir(tmp_path)  # errors name the file as given
    for command in ("run", "check"):
        done = run_briefly("pf-proxy", command, "run.toml")
        assert done.returncode == 2, done
        assert done.stderr.startswith(expected), done.stderr
        assert "Traceback" not in done.stderr
    done = run_briefly("pf-proxy", "check", str(tmp_path / "missing.toml"))
    assert (done.returncode, done.stderr.splitlines()[0]) == (
        2, f"{tmp_path}/missing.toml:?: (file): cannot be read: No such file or directory"
    )  # fmt: skip


# --- reload under load --------------------------------------------------------------------------

RELOAD_FILE = """
[proxy.front]
kind = "ip-to-vsock"
ip-addr = "127.0.0.1:{front}"
vsock-addr = "88:6000"
connect-timeout = {timeout}

[proxy.back]
kind = "vsock-to-ip"
vsock-addr = "88:6000"
ip-addr = "127.0.0.1:{echo}"
"""
EXTRA = """
[proxy.extra-{n}]
kind = "ip-to-vsock"
ip-addr = "127.0.0.1:{port}"
vsock-addr = "88:6000"
"""


class _Counting:
    """Clients that open connection after connection through `port`, each sending a block and
    reading its echo; every connection and byte counted, every failure kept."""

    def __init__(self, port: int, clients: int = 8) -> None:
        self.port = port
        self.stopping = False
        self.connections = 0
        self.bytes = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        block = os.urandom(64 * 1024)
        while not self.stopping:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
                    sock.sendall(block)
                    sock.shutdown(socket.SHUT_WR)
                    received = _recv_exactly(sock, len(block) + 1)
                if received != block:
                    self.failures.append(f"{len(received)} of {len(block)} bytes came back")
                    continue
                self.connections += 1
                self.bytes += len(block)
            except OSError as exc:
                self.failures.append(repr(exc))

    def stop(self) -> None:
        self.stopping = True
        for thread in self.threads:
            thread.join(WAIT)


@BOTH_LOOPS
def test_a_reload_under_load_refuses_and_drops_nothing(
    tmp_path: Path, loop: dict[str, str]
) -> None:
    """Clients keep connecting through `front` while the file is reloaded again and again:
    `front` itself changed (it hands its listening socket to its successor), proxies added
    and removed beside it, and once a file with an error (nothing changes). Not one
    connection is refused or cut; the other proxies' live connections are untouched."""
    with ExitStack() as stack:
        vsock = stack.enter_context(vsock_under_test())
        echo_server = Server(listening_socket("127.0.0.1"))
        stack.callback(echo_server.close)
        front = free_port()
        file = tmp_path / "run.toml"

        def write(timeout: int, extras: list[int]) -> None:
            text = RELOAD_FILE.format(front=front, echo=echo_server.port, timeout=timeout)
            text += "".join(EXTRA.format(n=n, port=port) for n, port in enumerate(extras))
            file.write_text(text)

        write(10, [])
        running = Proxy(["pf-proxy", "run", str(file)], tmp_path, {**vsock.env, **loop},
                        timeout=WAIT)  # fmt: skip
        stack.callback(running.stop)
        running.wait_for("[back] Listening on:")
        running.wait_for("[front] Listening on:")
        # a long-lived connection through `back`'s neighbour, across every reload
        held = socket.create_connection(("127.0.0.1", front), timeout=WAIT)
        held.sendall(b"before")
        assert _recv_exactly(held, 6) == b"before"
        load = _Counting(front)
        extra_ports = [free_port() for _ in range(3)]
        reloads = [(11, extra_ports[:1]), (12, extra_ports), (12, extra_ports[1:]), (13, [])]
        for count, (timeout, extras) in enumerate(reloads, 1):
            time.sleep(0.5)
            write(timeout, extras)
            os.kill(running.process.pid, signal.SIGHUP)
            wait_until(lambda c=count: running.stdout.count("Reload:") >= c, "the reload")
            for port in extras:
                wait_until(lambda p=port: _accepts(p), f"extra proxy on {port}")
        time.sleep(0.5)
        file.write_text(file.read_text() + "\n[proxy.broken\n")
        os.kill(running.process.pid, signal.SIGHUP)
        running.wait_for("has errors: nothing changed", stream="stderr")
        time.sleep(0.5)
        load.stop()
        held.sendall(b"after")
        held.shutdown(socket.SHUT_WR)
        assert _recv_exactly(held, 6) == b"after"
        held.close()
        assert load.failures == []
        assert load.connections > 50, load.connections
        assert running.stdout.count("[front] Listening on:") == 1 + 3  # one per change of it
        assert served_on(loop, running.stdout)
        assert "started on the listener it had" in running.stdout
        for port in extra_ports:  # all removed again
            assert not _accepts(port)
        assert running.stop() == 0


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_workers_in_a_file(tmp_path: Path) -> None:
    """`workers = 2` on one proxy: two processes; the second serves only that proxy, the first
    both; each worker's /metrics on its own port."""
    with vsock_under_test() as vsock, ExitStack() as stack:
        echo_server = Server(listening_socket("127.0.0.1"))
        stack.callback(echo_server.close)
        front, back_port = free_port(), free_port()
        metrics = two_free_ports()  # worker 1's /metrics, and worker 2's on the next port
        while front in (metrics, metrics + 1):
            metrics = two_free_ports()
        file = tmp_path / "run.toml"
        file.write_text(
            f'metrics = "127.0.0.1:{metrics}"\n'
            f'[proxy.front]\nkind = "ip-to-vsock"\nip-addr = "127.0.0.1:{front}"\n'
            f'vsock-addr = "88:{back_port}"\nworkers = 2\n'
            f'[proxy.back]\nkind = "vsock-to-ip"\nvsock-addr = "88:{back_port}"\n'
            f'ip-addr = "127.0.0.1:{echo_server.port}"\n'
        )
        running = Proxy(["pf-proxy", "run", str(file)], tmp_path, vsock.env, timeout=WAIT)
        try:
            running.wait_for("All 2 workers ready")
            for _ in range(20):  # the kernel spreads them over both workers' sockets
                assert exchange(("127.0.0.1", front), b"via a worker") == b"via a worker"
            for worker, port in ((1, metrics), (2, metrics + 1)):
                with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
                    text = response.read().decode()
                assert 'proxy="front"' in text, worker
                assert ('proxy="back"' in text) == (worker == 1), worker
            assert running.stop() == 0
        finally:
            running.stop()
        assert "[worker 2] [front] Listening on:" in running.stdout
        assert "[worker 2] [back]" not in running.stdout
        assert "[worker 1] [back] Listening on:" in running.stdout


def _samples(port: int) -> list[str]:
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
        text: str = response.read().decode()
    return [line for line in text.splitlines() if line.startswith("pf_proxy_")]


def test_a_changed_proxy_draining_beside_its_successor(tmp_path: Path) -> None:
    """A connection held through `front` while a reload changes it: the old start drains it
    beside the new one. /metrics names each series once (the two starts' figures summed);
    a SIGTERM meanwhile waits for the old start's drain too, and the held connection
    completes. (The vsock side is another process, so only the old start holds it here.)"""
    with vsock_under_test() as vsock, ExitStack() as stack:
        echo_server = Server(listening_socket("127.0.0.1"))
        stack.callback(echo_server.close)
        front, metrics = free_port(), free_port()
        back = Proxy(["vsock-to-ip", "-v", "88:6000", "-i", f"127.0.0.1:{echo_server.port}"],
                     tmp_path, vsock.env, timeout=WAIT)  # fmt: skip
        stack.callback(back.stop)
        back.wait_ready()
        file = tmp_path / "run.toml"

        def write(timeout: int) -> None:
            text = RELOAD_FILE.format(front=front, echo=echo_server.port, timeout=timeout)
            front_only = text.split("[proxy.back]")[0]
            file.write_text(f'metrics = "127.0.0.1:{metrics}"\n{front_only}')

        write(10)
        running = Proxy(["pf-proxy", "run", str(file)], tmp_path, vsock.env, timeout=WAIT)
        stack.callback(running.stop)
        running.wait_for("[front] Listening on:")
        held = socket.create_connection(("127.0.0.1", front), timeout=WAIT)
        held.sendall(b"held")
        assert _recv_exactly(held, 4) == b"held"
        write(11)
        os.kill(running.process.pid, signal.SIGHUP)
        running.wait_for("started on the listener it had")
        during = _samples(metrics)
        assert len(during) == len(set(line.rsplit(" ", 1)[0] for line in during)), during
        assert 'pf_proxy_tcp_connections_open{proxy="front"} 1.0' in during
        info = 'pf_proxy_info{command="ip-to-vsock",proxy="front",version="0.1.0"} 1.0'
        assert info in during, during
        os.kill(running.process.pid, signal.SIGTERM)  # only the old start holds `held`
        time.sleep(0.5)
        assert running.process.poll() is None  # draining it, within its drain timeout
        held.sendall(b"done")
        held.shutdown(socket.SHUT_WR)
        assert _recv_exactly(held, 5) == b"done"
        held.close()
        assert running.process.wait(WAIT) == 0


def test_a_changed_proxy_leaves_no_series_behind(tmp_path: Path) -> None:
    with vsock_under_test() as vsock, ExitStack() as stack:
        echo_server = Server(listening_socket("127.0.0.1"))
        stack.callback(echo_server.close)
        front, metrics = free_port(), free_port()
        file = tmp_path / "run.toml"
        for timeout in (10, 11):
            text = RELOAD_FILE.format(front=front, echo=echo_server.port, timeout=timeout)
            file.write_text(f'metrics = "127.0.0.1:{metrics}"\n{text}')
            if timeout == 10:
                running = Proxy(["pf-proxy", "run", str(file)], tmp_path, vsock.env, timeout=WAIT)
                stack.callback(running.stop)
                running.wait_for("[front] Listening on:")
        os.kill(running.process.pid, signal.SIGHUP)
        running.wait_for("started on the listener it had")
        wait_until(lambda: "Stopped by a reload" in running.stdout, "the old start's end")
        time.sleep(0.3)
        info = [line for line in _samples(metrics) if line.startswith("pf_proxy_info")]
        assert sorted(info) == [
            'pf_proxy_info{command="ip-to-vsock",proxy="front",version="0.1.0"} 1.0',
            'pf_proxy_info{command="vsock-to-ip",proxy="back",version="0.1.0"} 1.0',
        ]


PLAIN_FILE = """
[proxy.front]
kind = "ip-to-vsock"
ip-addr = "127.0.0.1:{front}"
vsock-addr = "88:6300"

[proxy.back]
kind = "vsock-to-ip"
vsock-addr = "88:6300"
ip-addr = "127.0.0.1:{echo}"

[proxy.out]
kind = "ip-to-vsock-transparent"
ip-addr = "127.0.0.1:{out}"
vsock-addr = "3:6301"

[proxy.by-port]
kind = "transparent-port-to-vsock"
ip-addr = "127.0.0.1:{by_port}"
vsock = "88"
"""


def test_the_plain_tcp_kinds_serve_without_the_modules_they_do_not_use(tmp_path: Path) -> None:
    """A process serving the four TCP kinds that judge nothing, a connection relayed through
    two of them, never imports the policy, the sniffer or the explicit proxy's parser
    (tcp/egress.py), nor `random` or the idna codec (endpoints): Python's own import log of
    the real process says what it loaded."""
    with vsock_under_test() as vsock, ExitStack() as stack:
        echo_server = Server(listening_socket("127.0.0.1"))
        stack.callback(echo_server.close)
        front = free_port()
        file = tmp_path / "plain.toml"
        file.write_text(PLAIN_FILE.format(front=front, echo=echo_server.port, out=free_port(),
                                          by_port=free_port()))  # fmt: skip
        command = [sys.executable, "-X", "importtime", shutil.which("pf-proxy") or "pf-proxy"]
        running = Proxy([*command, "run", str(file)], tmp_path, vsock.env, timeout=WAIT)
        stack.callback(running.stop)
        for name in ("front", "back", "out", "by-port"):
            running.wait_for(f"[{name}] Listening on:")
        assert exchange(("127.0.0.1", front), b"plain") == b"plain"
        running.wait_for("[front] ip to vsock IO copy done")
        assert running.stop() == 0
    loaded = {line.rsplit("|", 1)[1].strip() for line in running.stderr.splitlines()
              if line.startswith("import time:")}  # fmt: skip
    assert {"pf_proxy.tcp.routes", "pf_proxy.tcp.engine", "pf_proxy.endpoints"} <= loaded
    unused = {"pf_proxy.tcp.egress", "pf_proxy.tcp.access", "pf_proxy.tcp.sniff",
              "pf_proxy.tcp.explicit", "random", "encodings.idna", "stringprep"}  # fmt: skip
    assert loaded & unused == set()
