"""vsock-to-ip-proxy, end to end with real parts: the explicit proxy behind the enclave's
ip-to-vsock, HTTP CONNECT and SOCKS5 on one port.

    enclave (lo only)                  host                          internet
    curl, urllib, openssl, git         vsock-to-ip-proxy             s_server :443
      -> ip-to-vsock 127.0.0.1:3128  ==vsock==>  (resolves names)  --veth-->  http.server :80
                                                                          dnsmasq

The world of tests/integration/egress.py without the transparent pair: the enclave has no
DNS and no route anywhere; its clients name the destination in their proxy requests, and the
host resolves it with the dnsmasq only it can reach. Each denial is checked where it counts:
the client's answer (status or SOCKS reply), the proxy's log line, the server's own log (it
saw nothing) and, for names no rule allows, dnsmasq's log (never asked).
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.egress import (
    HOST,
    METADATA,
    NAMES,
    SERVERS,
    Listener,
    Network,
    network,
    wait_listening,
)
from tests.integration.helpers import Proxy, holding_steady, recv_exactly, wait_until
from tests.integration.namespaced import WAIT, NsProxy, proxy, tcp_socket_in
from tests.netns import Netns
from tests.vsocks import Vsock

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

API, API_ADDRESS = "api.example.org", SERVERS[0]
WWW = "www.example.com"
PROXY = "127.0.0.1:3128"  # ip-to-vsock in the enclave
VSOCK_PORT = 1080
UNROUTED = "11.22.50.1"  # the host has no route there
EXTRA_NAMES = {
    "metadata.example.com": METADATA,  # the host's 169.254.169.254, with a listener
    "unrouted.example.com": UNROUTED,
}
POLICY = (
    "--allow-host", f"{API}:443", "--allow-host", f"{API}:8443", "--allow-host", "*.example.com",
    "--deny-private",
)  # fmt: skip
GIT_PORT = 8443
HTTP_CODE = "%{http_code}"


@dataclass
class ProxyWorld:
    net: Network
    vsock: Vsock
    inner: NsProxy  # vsock-to-ip-proxy, in the host
    outer: NsProxy  # ip-to-vsock, in the enclave

    @property
    def enclave(self) -> Netns:
        return self.net.enclave

    def curl(self, proxy_url: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
        """curl in the enclave through the proxy; the status code appended to stdout."""
        return self.enclave.run(
            "curl", "-sS", "--max-time", f"{WAIT:g}", "--cacert", str(self.net.ca),
            "--proxy", proxy_url, "-w", f"\n{HTTP_CODE}", *args, url,
            check=False, timeout=WAIT + 10,
        )  # fmt: skip

    def logged(self, text: str, stream: str = "stdout") -> None:
        self.inner.wait_for(text, stream=stream, timeout=WAIT)

    def refused(self, text: str) -> None:
        """The one ERROR line for an ended request, after "Closing connection from <peer>: "."""
        self.inner.wait_for(f": {text}", stream="stderr", timeout=WAIT)

    def queries(self, name: str) -> int:
        return self.net.dns.log.count(f"query[A] {name} from {HOST}")

    def hits(self, address: str) -> int:
        """Requests the servers at `address` answered (s_server's and http.server's logs)."""
        log = (self.net.log_dir / f"s_server-{address}.log").read_text(errors="replace")
        return log.count("FILE:id.txt") + log.count('"GET /id.txt')


@contextmanager
def proxy_world(vsock: Vsock, log_dir: Path, *flags: str) -> Iterator[ProxyWorld]:
    """The namespaces, servers and dnsmasq, vsock-to-ip-proxy with `flags` in the host and
    ip-to-vsock in the enclave."""
    with ExitStack() as stack:
        net = stack.enter_context(
            network(log_dir, names={**NAMES, **EXTRA_NAMES}, prefix="pfp-xproxy")
        )
        inner = stack.enter_context(
            proxy(
                net.host, "vsock-to-ip-proxy", "-v", vsock.listen_address(VSOCK_PORT), *flags,
                log_dir=log_dir, env=vsock.env,
            )
        )  # fmt: skip
        outer = stack.enter_context(
            proxy(
                net.enclave, "ip-to-vsock", "-i", PROXY, "-v", vsock.address(VSOCK_PORT),
                log_dir=log_dir, env=vsock.env,
            )
        )  # fmt: skip
        yield ProxyWorld(net, vsock, inner, outer)


def socks_reply(result: subprocess.CompletedProcess[str]) -> int | None:
    """The SOCKS5 reply code curl says it got instead of success (curl exits 97 and says
    "Can't complete SOCKS5 connection to HOST. (CODE)"); None if it did not say."""
    if result.returncode != 97 or not result.stderr.rstrip().endswith(")"):
        return None
    return int(result.stderr.rstrip()[:-1].rpartition("(")[2])


def body_and_status(result: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    body, _, status = result.stdout.rpartition("\n")
    return body.removesuffix("\n"), status


# --- clients that honour a proxy setting ----------------------------------------------------


@pytest.mark.vsock
def test_one_curl_over_each_protocol(vsock: Vsock, tmp_path: Path) -> None:
    """The pair over the vsock under test (real AF_VSOCK in the guest stage): curl over HTTP
    CONNECT and over SOCKS5, names resolved on the host."""
    with proxy_world(vsock, tmp_path, *POLICY) as w:
        assert (
            "Destinations: denied by --deny-private: 0.0.0.0/8," in w.inner.stdout
            and f"allowed by name (the name in the request): {API}:443, {API}:8443, "
            "*.example.com; everything else denied" in w.inner.stdout
        ), w.inner.stdout
        result = w.curl(f"http://{PROXY}", f"https://{API}/id.txt")
        assert body_and_status(result) == (f"server {API_ADDRESS}", "200"), result
        w.logged(
            f"Proxying to: {API_ADDRESS}:443 (HTTP CONNECT {API}:443, allowed by "
            f"--allow-host {API}:443)"
        )
        result = w.curl(f"socks5h://{PROXY}", f"https://{WWW}/id.txt")
        assert body_and_status(result) == (f"server {SERVERS[1]}", "200"), result
        w.logged(
            f"Proxying to: {SERVERS[1]}:443 (SOCKS5 {WWW}:443, allowed by --allow-host "
            "*.example.com)"
        )
        assert w.queries(API) >= 1 and w.queries(WWW) >= 1  # resolved by the host
        w.logged(f"vsock to ip IO copy done, from {w.vsock.inbound_name(VSOCK_PORT)}")
    assert "Traceback" not in w.inner.stderr + w.outer.stderr


def _git_server(w: ProxyWorld) -> None:
    """A bare repository with one commit, served over HTTPS ("dumb" HTTP: static files) on
    API_ADDRESS:GIT_PORT in the internet namespace."""
    root = w.net.log_dir / "git"
    work, bare = root / "work", root / "repo.git"
    env = {**os.environ, "HOME": str(root), "GIT_CONFIG_NOSYSTEM": "1"}

    def git(*args: str, cwd: Path = root) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)

    work.mkdir(parents=True)
    git("init", "-q", "-b", "main", str(work))
    (work / "README").write_text("hello\n")
    git("add", "README", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "one", cwd=work)
    git("clone", "-q", "--bare", str(work), str(bare))
    git("update-server-info", cwd=bare)
    server = (
        "import functools, http.server, ssl, sys\n"
        "address, port, cert, key, root = sys.argv[1:]\n"
        "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)\n"
        "httpd = http.server.HTTPServer((address, int(port)), handler)\n"
        "context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
        "context.load_cert_chain(cert, key)\n"
        "httpd.socket = context.wrap_socket(httpd.socket, server_side=True)\n"
        "httpd.serve_forever()\n"
    )
    output = open(w.net.log_dir / "git-server.log", "wb")  # noqa: SIM115
    w.net.internet.popen(
        [sys.executable, "-c", server, API_ADDRESS, str(GIT_PORT), str(w.net.cert),
         str(w.net.key), str(root)],
        stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
    )  # fmt: skip
    output.close()
    wait_listening(w.net.internet, API_ADDRESS, GIT_PORT)


def test_clients_people_use(vsock_link: Vsock, tmp_path: Path) -> None:
    """Python's urllib with HTTPS_PROXY, openssl s_client -proxy, git over HTTPS with a
    proxy, and curl's plain http:// over SOCKS5 (which tunnels it)."""
    with proxy_world(vsock_link, tmp_path, *POLICY) as w:
        fetch = (
            "import ssl, sys, urllib.request\n"
            "context = ssl.create_default_context(cafile=sys.argv[1])\n"
            "print(urllib.request.urlopen(sys.argv[2], context=context, timeout=20)"
            ".read().decode(), end='')\n"
        )
        result = w.enclave.run(
            "env", f"HTTPS_PROXY=http://{PROXY}", sys.executable, "-c", fetch, str(w.net.ca),
            f"https://{API}/id.txt", check=False, timeout=WAIT + 10,
        )  # fmt: skip
        assert (result.returncode, result.stdout) == (0, f"server {API_ADDRESS}\n"), result
        w.logged(f"(HTTP CONNECT {API}:443, allowed by --allow-host {API}:443)")

        done = w.enclave.run(
            "sh", "-c",
            r"printf 'GET /id.txt HTTP/1.0\r\n\r\n' | "
            f"openssl s_client -proxy {PROXY} -connect {WWW}:443 -servername {WWW} "
            f"-CAfile {w.net.ca} -verify_return_error -quiet -ign_eof",
            check=False, timeout=WAIT + 10,
        )  # fmt: skip
        assert f"server {SERVERS[1]}" in done.stdout, done

        result = w.curl(f"socks5h://{PROXY}", f"http://{WWW}/id.txt")
        assert body_and_status(result) == (f"server {SERVERS[1]}", "200"), result
        w.logged(f"Proxying to: {SERVERS[1]}:80 (SOCKS5 {WWW}:80, allowed by --allow-host ")

        _git_server(w)
        home = tmp_path / "git-home"
        home.mkdir()
        listed = w.enclave.run(
            "env", f"HOME={home}", "GIT_CONFIG_NOSYSTEM=1", f"HTTPS_PROXY=http://{PROXY}",
            f"GIT_SSL_CAINFO={w.net.ca}", "git", "ls-remote",
            f"https://{API}:{GIT_PORT}/repo.git", check=False, timeout=WAIT + 10,
        )  # fmt: skip
        assert listed.returncode == 0 and "\trefs/heads/main" in listed.stdout, listed
        w.logged(f"(HTTP CONNECT {API}:{GIT_PORT}, allowed by --allow-host {API}:{GIT_PORT})")
    assert "Traceback" not in w.inner.stderr


# --- what the policy denies, and the answers ------------------------------------------------


def metrics_of(w: ProxyWorld, port: int) -> dict[str, float]:
    text = w.net.host.run("curl", "-sS", f"http://127.0.0.1:{port}/metrics").stdout
    found = {}
    for line in text.splitlines():
        if line.startswith("pf_proxy_tcp_connections_ended_total{"):
            labels, _, value = line.partition(" ")
            found[labels.split('"')[1]] = float(value)
    return found


def test_denials_and_failures_are_answered_logged_and_counted(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    metrics_port = 9464
    flags = (*POLICY, "--connect-timeout", "3", "--metrics", f"127.0.0.1:{metrics_port}")
    with proxy_world(vsock_link, tmp_path, *flags) as w:
        http, socks = f"http://{PROXY}", f"socks5h://{PROXY}"
        metadata = Listener(w.net.host, METADATA, 80)

        # a name no pattern allows: 403 / "not allowed by ruleset", never even resolved
        before = w.hits(SERVERS[0])
        result = w.curl(http, "https://other.example.org/id.txt")
        assert result.returncode == 56 and "CONNECT tunnel failed, response 403" in result.stderr
        w.refused(
            "HTTP CONNECT other.example.org:443 denied by --allow-host: the name matches no "
            "pattern"
        )
        result = w.curl(socks, "https://other.example.org/id.txt")
        assert socks_reply(result) == 2, result  # connection not allowed by ruleset
        w.refused("SOCKS5 other.example.org:443 denied by --allow-host: the name matches no")
        assert w.queries("other.example.org") == 0

        # an allowed name on a port its pattern does not name (http.server listens on 80)
        result = w.curl(http, f"https://{API}:80/id.txt")
        assert "CONNECT tunnel failed, response 403" in result.stderr, result
        w.refused(
            f"HTTP CONNECT {API}:80 denied by --allow-host: the name matches {API}:443, "
            f"{API}:8443, not on port 80"
        )
        assert w.hits(SERVERS[0]) == before

        # an address instead of a name
        result = w.curl(http, f"https://{API_ADDRESS}/id.txt")
        assert "CONNECT tunnel failed, response 403" in result.stderr, result
        w.refused(
            f"HTTP CONNECT {API_ADDRESS}:443 denied by --allow-host: an address was asked for, "
            "not a name, and the address is in no --allow network"
        )
        result = w.curl(socks, f"http://[::ffff:{METADATA}]/latest/")
        assert socks_reply(result) == 2, result
        w.refused("SOCKS5 [::ffff:a9fe:a9fe]:80 denied by --deny-private 169.254.0.0/16\n")

        # a name that resolves to the metadata service
        result = w.curl(http, "http://metadata.example.com/latest/", "--proxytunnel")
        assert "CONNECT tunnel failed, response 403" in result.stderr, result
        assert socks_reply(w.curl(socks, "http://metadata.example.com/latest/")) == 2
        w.refused(
            "HTTP CONNECT metadata.example.com:80 denied by --deny-private 169.254.0.0/16: "
            f"metadata.example.com resolves to {METADATA}"
        )
        w.refused("SOCKS5 metadata.example.com:80 denied by --deny-private 169.254.0.0/16")
        assert not metadata.was_connected()
        metadata.sock.close()

        # no such name: 502 / host unreachable
        result = w.curl(http, "https://nothing.example.com/")
        assert "CONNECT tunnel failed, response 502" in result.stderr, result
        w.refused("HTTP CONNECT nothing.example.com:443: nothing.example.com has no address")
        result = w.curl(socks, "https://nothing.example.com/")
        assert socks_reply(result) == 4, result  # host unreachable

        # nothing listens: 502 / connection refused
        result = w.curl(http, f"https://{WWW}:81/")
        assert "CONNECT tunnel failed, response 502" in result.stderr, result
        w.refused(f"[Errno 111] HTTP CONNECT {WWW}:81: failed to connect to TCP endpoint")
        result = w.curl(socks, f"https://{WWW}:81/")
        assert socks_reply(result) == 5, result  # connection refused

        # no route: 502 / network unreachable
        result = w.curl(socks, "https://unrouted.example.com/")
        assert socks_reply(result) == 3, result  # network unreachable
        w.refused(
            f"[Errno 101] SOCKS5 unrouted.example.com:443: failed to connect to TCP endpoint "
            f"{UNROUTED}:443: Network is unreachable"
        )

        # the SYN is dropped: 504 / TTL expired, once --connect-timeout (3 s) has passed
        w.net.internet.run("iptables", "-I", "INPUT", "-p", "tcp", "--dport", "82", "-j", "DROP")
        started = time.monotonic()
        result = w.curl(http, f"https://{WWW}:82/")
        assert "CONNECT tunnel failed, response 504" in result.stderr, result
        assert 2.5 < time.monotonic() - started < WAIT
        w.refused(f"HTTP CONNECT {WWW}:82: no connection to {WWW}:82 within 3 s")
        result = w.curl(socks, f"https://{WWW}:82/")
        assert socks_reply(result) == 6, result  # TTL expired

        # a plain-HTTP forward request: 501, saying what to use instead
        result = w.curl(http, f"http://{WWW}/id.txt")
        body, status = body_and_status(result)
        assert (result.returncode, status) == (0, "501"), result
        assert "it does not forward plain-HTTP requests" in body
        w.refused(f"proxy request refused: plain-HTTP forward request GET http://{WWW}/id.txt")
        # ... while curl --proxytunnel turns the same URL into a CONNECT
        result = w.curl(http, f"http://{WWW}/id.txt", "--proxytunnel")
        assert body_and_status(result) == (f"server {SERVERS[1]}", "200"), result

        def counted() -> dict[str, float]:
            return metrics_of(w, metrics_port)

        wait_until(lambda: counted().get("closed_at_drain", -1) == 0, "metrics", WAIT)
        ended = counted()
        assert ended["denied"] == 7, ended
        assert ended["name_unresolved"] == 2, ended
        assert ended["upstream_connect_failed"] == 3, ended
        assert ended["connect_timeout"] == 2, ended
        assert ended["unsupported_request"] == 1, ended
        assert ended["completed"] == 1, ended
    assert "Traceback" not in w.inner.stderr


def socks_exchange(w: ProxyWorld, greeting: bytes, request: bytes = b"") -> bytes:
    """Raw SOCKS5 from the enclave: the greeting, then (if given) the request after the
    method reply; everything the proxy sent until it closed."""
    with tcp_socket_in(w.enclave) as sock:
        host, port = PROXY.split(":")
        sock.connect((host, int(port)))
        sock.sendall(greeting)
        answer = recv_exactly(sock, 2)
        if request and answer == b"\x05\x00":
            sock.sendall(request)
        while chunk := sock.recv(100):
            answer += chunk
        return answer


def test_socks5_requests_this_proxy_does_not_serve(vsock_link: Vsock, tmp_path: Path) -> None:
    with proxy_world(vsock_link, tmp_path, *POLICY) as w:
        # username/password only: no acceptable method
        assert socks_exchange(w, b"\x05\x01\x02") == b"\x05\xff"
        w.refused("SOCKS5 client offers no method this proxy takes (offered: username/password")
        # BIND and UDP ASSOCIATE: command not supported
        name = bytes([len(API)]) + API.encode() + (443).to_bytes(2, "big")
        for command in (2, 3):
            answer = socks_exchange(w, b"\x05\x01\x00", bytes([5, command, 0, 3]) + name)
            assert answer == b"\x05\x00" + bytes([5, 7, 0, 1, 0, 0, 0, 0, 0, 0])
        w.refused("proxy request refused: SOCKS5 command BIND is not supported (only CONNECT)")
        w.refused("SOCKS5 command UDP ASSOCIATE is not supported")


# --- hostile heads --------------------------------------------------------------------------


def test_hostile_heads_are_bounded_and_leave_nothing_behind(
    vsock_link: Vsock, tmp_path: Path
) -> None:
    """Straight to the proxy's vsock listener: a head a byte at a time (served), an over-long
    line (414), a head that never ends (408 at --request-timeout), binary junk (closed
    unanswered), twenty slow heads at once; then both proxies hold the sockets they held
    before, and no vsock connection is left."""
    vsock = vsock_link
    with ExitStack() as stack:
        w = stack.enter_context(proxy_world(vsock, tmp_path, *POLICY, "--request-timeout", "2"))
        stack.enter_context(holding_steady(vsock, w.inner, w.outer))

        head = f"CONNECT {WWW}:80 HTTP/1.1\r\nHost: {WWW}:80\r\n\r\n".encode()
        with vsock.client(VSOCK_PORT, timeout=WAIT) as sock:
            for byte in head:
                sock.send(bytes([byte]))
            assert recv_exactly(sock, 39) == b"HTTP/1.1 200 Connection established\r\n\r\n"
            sock.sendall(b"GET /id.txt HTTP/1.0\r\n\r\n")
            response = b""
            while chunk := sock.recv(4096):
                response += chunk
            assert response.endswith(f"server {SERVERS[1]}\n".encode()), response

        with vsock.client(VSOCK_PORT, timeout=WAIT) as sock:
            try:
                sock.sendall(b"CONNECT " + b"a" * 20000)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert _everything(sock).startswith(b"HTTP/1.1 414 URI Too Long\r\n")
        w.refused("proxy request refused: request line longer than 16384 bytes")

        started = time.monotonic()
        with vsock.client(VSOCK_PORT, timeout=WAIT) as sock:
            sock.sendall(b"CONNECT a.example.com:443 HTTP/1.1\r\n")
            while time.monotonic() - started < WAIT:  # a header line every 0.3 s, for ever
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break
                if select.select([sock], [], [], 0.3)[0]:
                    break
            elapsed = time.monotonic() - started
            assert _everything(sock).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert 1.5 < elapsed < WAIT, elapsed
        w.refused("proxy request refused: no complete request within 2 s")

        with vsock.client(VSOCK_PORT, timeout=WAIT) as sock:
            sock.sendall(b"\x16\x03\x01" + os.urandom(500))
            assert _everything(sock) == b""
        w.refused("proxy request refused: neither HTTP nor SOCKS5 (first byte 0x16)")

        slow = [vsock.client(VSOCK_PORT, timeout=WAIT) for _ in range(20)]
        for sock in slow:
            sock.sendall(b"CONNECT a.example.com:443 HTTP/1.1\r\nX:")
        for sock in slow:
            assert _everything(sock).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
            sock.close()
    assert "Traceback" not in w.inner.stderr


def _everything(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# --- flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--allow-host", "api.example.org:0"),
        ("--allow", "2001:db8::/32:443"),
        ("--deny", "10.0.0.0/8:http"),
        ("--request-timeout", "0"),
    ],
)
def test_malformed_flags_exit_2_naming_the_flag(flag: str, value: str, tmp_path: Path) -> None:
    result = Proxy(
        ["vsock-to-ip-proxy", "-v", "3:1080", flag, value],
        tmp_path,
        {"PF_PROXY_VSOCK_DIR": str(tmp_path)},
    )
    assert result.process.wait(20) == 2
    assert f"Invalid value for '{flag}'" in result.stderr
    assert not (tmp_path / "3_1080.sock").exists()


def test_without_a_resolver_it_exits_1(tmp_path: Path) -> None:
    from tests.integration.egress import resolv_conf
    from tests.netns import netns

    with netns("pfp-xproxy-noresolv") as ns, resolv_conf(ns, "# no nameserver\n"):
        result = ns.run(
            "env", f"PF_PROXY_VSOCK_DIR={tmp_path}", "vsock-to-ip-proxy", "-v", "3:1080",
            check=False,
        )  # fmt: skip
    assert result.returncode == 1, result
    assert "requested names are resolved on this host: no resolver in /etc/resolv.conf" in (
        result.stderr
    )
