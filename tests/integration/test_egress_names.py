"""vsock-to-ip-transparent --allow-host and --deny-private, end to end with real parts.

The world of tests/integration/egress.py: real clients in the enclave (curl, openssl s_client,
a Python TLS client sending its ClientHello in pieces), the real pair over vsock, and in the
"internet" openssl s_server and http.server behind a dnsmasq the host resolves with. Each
denial is checked where it counts: the client's connection ends without an answer, the proxy
logs the name, the address and the rule, and the server never saw a connection (s_server's
and http.server's own logs).
"""

from __future__ import annotations

import ipaddress
import ssl
import time
from pathlib import Path

import pytest

from tests.integration.egress import METADATA, NAMES, SERVERS, Listener, World, world
from tests.integration.helpers import Proxy, wait_until
from tests.integration.namespaced import WAIT, closed_without_data, tcp_socket_in
from tests.vsocks import Vsock

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

API, API_ADDRESS = "api.example.org", SERVERS[0]
POLICY = ("--allow-host", API, "--allow-host", "*.example.com", "--deny-private")


def https(name: str, address: str | None = None) -> tuple[str, str]:
    """The URL and --resolve entry for `name` on port 443, aimed at `address` (default: its
    real one)."""
    return f"https://{name}/id.txt", f"{name}:443:{address or NAMES[name]}"


def allowed(w: World, name: str, address: str, *, port: int = 443) -> None:
    w.inner.wait_for(
        f"Proxying to: {address}:{port} ({name}, allowed by --allow-host ", timeout=WAIT
    )


def denied(w: World, text: str) -> None:
    """The one line the proxy logs for a denied connection (after "Closing connection from
    <the vsock peer>: ")."""
    w.inner.wait_for(f": destination {text}", stream="stderr")


def server_hits(w: World, address: str) -> int:
    """Requests the servers at `address` have answered (s_server logs "FILE:id.txt" for each,
    http.server a "GET /id.txt ..." line)."""
    log = (w.log_dir / f"s_server-{address}.log").read_text(errors="replace")
    return log.count("FILE:id.txt") + log.count('"GET /id.txt')


def assert_curl_denied(result: object, w: World, address: str, before: int) -> None:
    assert getattr(result, "returncode", 0) != 0, result
    assert server_hits(w, address) == before


def header(address: str, port: int) -> bytes:
    """The destination header, written out by hand."""
    parsed = ipaddress.ip_address(address)
    marker, size = (4, 4) if parsed.version == 4 else (6, 16)
    return bytes([marker]) + int(parsed).to_bytes(size, "little") + port.to_bytes(2, "little")


# --- the main end-to-end test (also over real vsock in the guest) ---------------------------


@pytest.mark.vsock
def test_names_decide_and_must_resolve_to_the_destination(vsock: Vsock, tmp_path: Path) -> None:
    with world(vsock, tmp_path, *POLICY) as w:
        text = w.inner.stdout
        assert "Destinations: denied by --deny-private: 0.0.0.0/8, 10.0.0.0/8," in text
        assert (
            "allowed by name (TLS server_name or HTTP Host, where the destination is an "
            "address the name resolves to): api.example.org, *.example.com; "
            "everything else denied" in text
        )
        assert f"Names resolved with: {w.dns.address}" in text

        # curl https://NAME/ with SNI, to the address the name resolves to: through
        url, resolve = https(API)
        result = w.curl(url, resolve)
        assert (result.returncode, result.stdout) == (0, f"server {API_ADDRESS}\n"), result
        allowed(w, API, API_ADDRESS)
        wait_until(lambda: server_hits(w, API_ADDRESS) == 1, "s_server's log line", WAIT)

        # the same allowed name aimed at an address it does not resolve to: denied
        before = server_hits(w, SERVERS[2])
        result = w.curl(*https(API, SERVERS[2]))
        assert_curl_denied(result, w, SERVERS[2], before)
        # what the client sees: its connection ends during the handshake
        assert result.returncode == 35 and "SSL_ERROR_SYSCALL" in result.stderr, result
        denied(
            w,
            f"{SERVERS[2]}:443 for {API} denied by --allow-host {API}: "
            f"{API} resolves to {API_ADDRESS}, not to {SERVERS[2]}",
        )

        # a wildcard match, two levels down
        result = w.curl(*https("a.b.example.com"))
        assert (result.returncode, result.stdout) == (0, f"server {SERVERS[1]}\n"), result
        allowed(w, "a.b.example.com", SERVERS[1])

        # near misses: the wildcard's own name, a suffix trick, a name that only ends alike
        for name in ("example.com", "example.com.evil.net", "notexample.com", "other.example.org"):
            address = NAMES[name]
            before = server_hits(w, address)
            assert_curl_denied(w.curl(*https(name)), w, address, before)
            denied(w, f"{address}:443 for {name} denied by --allow-host: the name matches no")

        # openssl s_client -servername
        done = w.enclave.run(
            "sh", "-c",
            r"printf 'GET /id.txt HTTP/1.0\r\n\r\n' | "
            f"openssl s_client -connect {API_ADDRESS}:443 -servername {API} "
            f"-CAfile {w.ca} -verify_return_error -quiet -ign_eof",
            check=False, timeout=WAIT + 10,
        )  # fmt: skip
        assert f"server {API_ADDRESS}" in done.stdout, done

        # a client with no SNI (curl sends none for an address; s_client -noservername)
        before = server_hits(w, API_ADDRESS)
        assert_curl_denied(w.curl(f"https://{API_ADDRESS}/id.txt"), w, API_ADDRESS, before)
        no_sni = w.enclave.run(
            "openssl", "s_client", "-connect", f"{API_ADDRESS}:443", "-noservername",
            check=False, timeout=WAIT + 10,
        )  # fmt: skip
        assert no_sni.returncode != 0, no_sni
        denied(
            w,
            f"{API_ADDRESS}:443 denied by --allow-host: no host name in the stream "
            "(ClientHello without server_name)",
        )

        # plain HTTP: the Host header
        result = w.curl(f"http://{API}/id.txt", f"{API}:80:{API_ADDRESS}")
        assert (result.returncode, result.stdout) == (0, f"server {API_ADDRESS}\n"), result
        allowed(w, API, API_ADDRESS, port=80)
        result = w.curl("http://other.example.org/id.txt", f"other.example.org:80:{API_ADDRESS}")
        assert result.returncode == 52 and "Empty reply from server" in result.stderr, result
        denied(w, f"{API_ADDRESS}:80 for other.example.org denied by --allow-host: the name")
        result = w.curl(f"http://{API_ADDRESS}/id.txt")  # Host: 11.22.41.10, no name
        assert result.returncode == 52, result
        denied(w, f"{API_ADDRESS}:80 denied by --allow-host: no host name in the stream (Host")

        # --deny-private: the metadata service, as IPv4 and IPv4-mapped
        metadata = Listener(w.host, METADATA, 80)
        for url in (f"http://{METADATA}/latest/", f"http://[::ffff:{METADATA}]/latest/"):
            result = w.curl(url)
            # Denied on the header alone, the host side closes at once. If curl's request had
            # not reached the enclave side by then, writing it fails (EPIPE) and curl is reset
            # (56), as after any failed relay; else it reads EOF (52). Over real vsock, with a
            # connect that no longer waits for a task, both happen. Never an answer (0) or a wait.
            assert result.returncode in (52, 56), result
        denied(w, f"{METADATA}:80 denied by --deny-private 169.254.0.0/16")
        with w.vsock.client(1200) as sock:  # the mapped form in the header itself
            sock.settimeout(WAIT)
            request = header(f"::ffff:{METADATA}", 80) + b"GET / HTTP/1.0\r\n\r\n"
            assert closed_without_data(sock, request)
        mapped = ipaddress.ip_address(f"::ffff:{METADATA}")  # as Python spells it
        denied(w, f"[{mapped}]:80 denied by --deny-private 169.254.0.0/16")
        assert not metadata.was_connected()
        metadata.sock.close()

        # each denial was logged once, and the allowed connections were relayed to the end
        assert w.inner.stderr.count(f"for {API} denied") == 1, w.inner.stderr
        w.inner.wait_for(f"ip to vsock IO copy done, from {API_ADDRESS}:443")
    assert "Traceback" not in w.inner.stderr + w.outer.stderr


# --- a ClientHello over several records and segments ----------------------------------------


def fetch_tls(
    w: World, name: str, address: str, *, record_size: int, pieces: int, alpn: int
) -> bytes:
    """A real TLS client in the enclave whose ClientHello (made large with `alpn` 200-byte
    ALPN names) is cut into TLS records of `record_size` bytes and sent in `pieces` writes
    apart in time; then an ordinary handshake and GET /id.txt. Returns the response (once
    its one-line body is in)."""
    context = ssl.create_default_context(cafile=str(w.ca))
    context.set_alpn_protocols([f"{i:03d}" + "x" * 197 for i in range(alpn)])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    message = hello[5:]  # one record from OpenSSL: re-cut it
    records = b"".join(
        b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part
        for part in (message[i : i + record_size] for i in range(0, len(message), record_size))
    )
    sock = tcp_socket_in(w.enclave)
    with sock:
        sock.connect((address, 443))
        step = -(-len(records) // pieces)
        for start in range(0, len(records), step):
            sock.sendall(records[start : start + step])
            time.sleep(0.1)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                incoming.write(data)
        tls.write(b"GET /id.txt HTTP/1.0\r\n\r\n")
        sock.sendall(outgoing.read())
        response = b""
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                chunk = b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return response
            if chunk:
                response += chunk
                _, _, body = response.partition(b"\r\n\r\n")
                if body.endswith(b"\n"):  # id.txt is one line; s_server keeps the stream open
                    return response
                continue
            data = sock.recv(65536)
            if not data:
                return response
            incoming.write(data)


def test_a_client_hello_over_several_records_and_segments(
    tmp_path: Path, vsock_link: Vsock
) -> None:
    with world(vsock_link, tmp_path, *POLICY) as w:
        for record_size, pieces, alpn in ((512, 4, 10), (100, 3, 30), (16384, 2, 60)):
            response = fetch_tls(
                w, "www.example.com", SERVERS[1], record_size=record_size, pieces=pieces,
                alpn=alpn,
            )  # fmt: skip
            assert response.endswith(f"server {SERVERS[1]}\n".encode()), response
        # the same, aimed at the wrong address: denied after reassembly
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            fetch_tls(w, "www.example.com", SERVERS[2], record_size=300, pieces=3, alpn=20)
        denied(w, f"{SERVERS[2]}:443 for www.example.com denied by --allow-host *.example.com")


# --- DNS: TTLs, the cache, a resolver that fails --------------------------------------------


def test_a_changed_answer_counts_after_its_ttl_and_cached_names_cost_no_query(
    tmp_path: Path, vsock_link: Vsock
) -> None:
    name = "moving.example.com"
    old, new = NAMES[name], SERVERS[2]
    ttl = 3
    with world(vsock_link, tmp_path, *POLICY, ttl=ttl) as w:
        started = time.monotonic()
        for _ in range(3):
            assert w.curl(*https(name, old)).stdout == f"server {old}\n"
        assert w.queries(name) == 1  # the first connection asked; the others used the cache

        w.dns.set_hosts({**{n: [a] for n, a in NAMES.items()}, name: [new]})
        if time.monotonic() - started < ttl - 0.5:  # still within the TTL: the old answer
            assert w.curl(*https(name, new)).returncode != 0
            denied(w, f"{new}:443 for {name} denied by --allow-host *.example.com: {name} "
                   f"resolves to {old}, not to {new}")  # fmt: skip
            assert w.queries(name) == 1
        time.sleep(max(0.0, started + ttl + 0.5 - time.monotonic()))
        result = w.curl(*https(name, new))
        assert (result.returncode, result.stdout) == (0, f"server {new}\n"), result
        assert w.queries(name) == 2
        assert w.curl(*https(name, old)).returncode != 0
        denied(w, f"{old}:443 for {name} denied by --allow-host *.example.com: {name} "
               f"resolves to {new}, not to {old}")  # fmt: skip


def test_a_resolver_that_does_not_answer_fails_closed_within_the_connect_timeout(
    tmp_path: Path, vsock_link: Vsock
) -> None:
    connect_timeout = 2.0
    with world(vsock_link, tmp_path, *POLICY, "--connect-timeout", f"{connect_timeout:g}") as w:
        w.internet.run("iptables", "-I", "INPUT", "-p", "udp", "--dport", "53", "-j", "DROP")
        w.internet.run("iptables", "-I", "INPUT", "-p", "tcp", "--dport", "53", "-j", "DROP")
        before = server_hits(w, API_ADDRESS)
        started = time.monotonic()
        result = w.curl(*https(API))
        elapsed = time.monotonic() - started
        assert result.returncode != 0, result
        assert elapsed < connect_timeout + 1.5, elapsed
        denied(w, f"{API_ADDRESS}:443 for {API} denied by --allow-host {API}: resolving {API} "
               f"failed: no answer within {connect_timeout / 2:g} s")  # fmt: skip
        assert server_hits(w, API_ADDRESS) == before

        # a client that sends nothing is denied once half the connect timeout has passed
        with tcp_socket_in(w.enclave) as sock:
            started = time.monotonic()
            assert closed_without_data(sock, connect_to=(API_ADDRESS, 443))
            assert time.monotonic() - started < connect_timeout + 1.5
        denied(w, f"{API_ADDRESS}:443 denied by --allow-host: no complete TLS ClientHello or "
               f"HTTP request head within {connect_timeout / 2:g} s")  # fmt: skip

        # the resolver back: the next connection asks again (failures are not cached)
        w.internet.run("iptables", "-F", "INPUT")
        assert w.curl(*https(API)).stdout == f"server {API_ADDRESS}\n"


def test_cidr_rules_beside_names(tmp_path: Path, vsock_link: Vsock) -> None:
    """An address allowed by --allow needs no name, and nothing is read ahead for it (a
    client that waits for the server to speak first works); --deny wins over a good name."""
    flags = (*POLICY, "--allow", f"{SERVERS[2]}/32", "--deny", f"{SERVERS[1]}/32")
    with world(vsock_link, tmp_path, *flags) as w:
        result = w.curl(f"https://{SERVERS[2]}/id.txt")
        # curl cannot verify an address against the names' certificate: exit 60 means the
        # TLS handshake reached the server with no SNI at all
        assert result.returncode == 60, result
        w.inner.wait_for(f"Proxying to: {SERVERS[2]}:443")
        assert w.curl(*https("www.example.com")).returncode != 0
        denied(w, f"{SERVERS[1]}:443 denied by --deny {SERVERS[1]}/32")
        # server speaks first: nothing is sent, yet the connection is made
        line = f"Proxying to: {SERVERS[2]}:443"
        before = w.inner.stdout.count(line)
        with tcp_socket_in(w.enclave) as sock:
            sock.connect((SERVERS[2], 443))
            wait_until(lambda: w.inner.stdout.count(line) > before, "the connect", WAIT)


# --- ports in the rules ---------------------------------------------------------------------


def test_rules_with_a_port_allow_that_port_only(tmp_path: Path, vsock_link: Vsock) -> None:
    """An allowed name on a port its pattern does not name is denied (issue 21 section 3: an
    enclave reached api.example.org:2222 with api.example.org allowed); a pattern without a
    port allows every port; --allow and --deny take a port the same way."""
    flags = (
        "--allow-host", f"{API}:443", "--allow-host", "*.example.com",
        "--allow", f"{SERVERS[2]}/32:443", "--deny", f"{SERVERS[1]}/32:80", "--deny-private",
    )  # fmt: skip
    with world(vsock_link, tmp_path, *flags) as w:
        assert (
            f"denied: {SERVERS[1]}/32:80; allowed: {SERVERS[2]}/32:443; allowed by name (TLS "
            "server_name or HTTP Host, where the destination is an address the name resolves "
            f"to): {API}:443, *.example.com; everything else denied" in w.inner.stdout
        )
        # the name on its port: through
        result = w.curl(*https(API))
        assert (result.returncode, result.stdout) == (0, f"server {API_ADDRESS}\n"), result
        allowed(w, API, API_ADDRESS)
        # the same name, resolving to the same address, on port 80 (http.server listens)
        before = server_hits(w, API_ADDRESS)
        result = w.curl(f"http://{API}/id.txt", f"{API}:80:{API_ADDRESS}")
        assert result.returncode == 52 and "Empty reply from server" in result.stderr, result
        denied(w, f"{API_ADDRESS}:80 for {API} denied by --allow-host: the name matches "
               f"{API}:443, not on port 80")  # fmt: skip
        assert server_hits(w, API_ADDRESS) == before

        # a pattern without a port: every port, unless a --deny with a port says otherwise
        result = w.curl(*https("www.example.com"))
        assert (result.returncode, result.stdout) == (0, f"server {SERVERS[1]}\n"), result
        before = server_hits(w, SERVERS[1])
        result = w.curl("http://www.example.com/id.txt", f"www.example.com:80:{SERVERS[1]}")
        assert result.returncode in (52, 56), result  # denied on the header: EOF or reset
        denied(w, f"{SERVERS[1]}:80 denied by --deny {SERVERS[1]}/32:80")
        assert server_hits(w, SERVERS[1]) == before
        result = w.curl("http://a.b.example.com:80/id.txt", f"a.b.example.com:80:{SERVERS[1]}")
        assert result.returncode != 0, result

        # --allow with a port: the address on 443 with no name at all, but not on 80
        result = w.curl(f"https://{SERVERS[2]}/id.txt")
        assert result.returncode == 60, result  # the handshake reached the server (no SNI)
        w.inner.wait_for(f"Proxying to: {SERVERS[2]}:443")
        before = server_hits(w, SERVERS[2])
        result = w.curl(f"http://{SERVERS[2]}/id.txt")
        assert result.returncode == 52, result
        denied(w, f"{SERVERS[2]}:80 denied by --allow-host: no host name in the stream "
               f"(Host '{SERVERS[2]}' is not a host name), and the address is allowed on other "
               f"ports only ({SERVERS[2]}/32:443), not 80")  # fmt: skip
        assert server_hits(w, SERVERS[2]) == before
    assert "Traceback" not in w.inner.stderr


def test_a_port_no_rule_allows_is_denied_without_reading_the_stream(
    tmp_path: Path, vsock_link: Vsock
) -> None:
    """With every pattern on port 443, a connection to port 80 is denied on its header
    alone: no name needs to be read, so a client that sends nothing is closed at once."""
    with world(vsock_link, tmp_path, "--allow-host", f"{API}:443") as w:
        with tcp_socket_in(w.enclave) as sock:
            started = time.monotonic()
            assert closed_without_data(sock, connect_to=(API_ADDRESS, 80))
            assert time.monotonic() - started < WAIT / 2
        denied(w, f"{API_ADDRESS}:80 denied by --allow-host: no pattern allows port 80, and "
               "the address is in no --allow network")  # fmt: skip


# --- flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "*", "a*.example.com", "api.*.example.com", "192.0.2.1", "exa mple.com", "",
        "api.example.org:0", "api.example.org:65536", "api.example.org:https", "[::1]:443",
    ],
)  # fmt: skip
def test_malformed_allow_host_exits_2_naming_the_flag(pattern: str, tmp_path: Path) -> None:
    result = Proxy(
        ["vsock-to-ip-transparent", "-v", "3:1200", "--allow-host", pattern],
        tmp_path,
        {"PF_PROXY_VSOCK_DIR": str(tmp_path)},
    )
    assert result.process.wait(20) == 2
    assert "Invalid value for '--allow-host'" in result.stderr
    assert not (tmp_path / "3_1200.sock").exists()


def test_allow_host_without_a_resolver_exits_1(tmp_path: Path) -> None:
    """A host whose resolv.conf names no server cannot check names: it says so at start."""
    from tests.integration.egress import resolv_conf
    from tests.netns import netns

    with netns("pfp-egress-noresolv") as ns, resolv_conf(ns, "# no nameserver\n"):
        result = ns.run(
            "env", f"PF_PROXY_VSOCK_DIR={tmp_path}",
            "vsock-to-ip-transparent", "-v", "3:1200", "--allow-host", "api.example.org",
            check=False,
        )  # fmt: skip
    assert result.returncode == 1, result
    assert "--allow-host needs a resolver: no resolver in /etc/resolv.conf" in result.stderr
