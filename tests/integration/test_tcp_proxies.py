"""vsock-to-ip and ip-to-vsock as real processes: over the emulation, and (the tests marked
`vsock`) over real AF_VSOCK in the guest stage."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import http.server
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from pf_proxy.cli.options import Seconds, WholeNumber
from tests.integration.helpers import (
    RAW_COMMANDS,
    EchoServer,
    Proxy,
    exchange,
    free_port,
    proxy_commands,
    run_all_briefly,
    run_briefly,
    running,
)
from tests.vsocks import Vsock, vsock_under_test

MiB = 1 << 20


@pytest.fixture
def pair(vsock: Vsock, echo: EchoServer, tmp_path: Path) -> Iterator[tuple[int, Proxy, Proxy]]:
    """client -> ip-to-vsock -> vsock :4000 -> vsock-to-ip -> echo server."""
    port = free_port()
    with (
        running(
            "vsock-to-ip", "-v", vsock.listen_address(4000), "-i", f"127.0.0.1:{echo.port}",
            log_dir=tmp_path, env=vsock.env,
        ) as inner,
        running(
            "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", vsock.address(4000),
            log_dir=tmp_path, env=vsock.env,
        ) as outer,
    ):  # fmt: skip
        yield port, outer, inner


@pytest.mark.vsock
def test_256_mib_both_ways_with_half_close(
    vsock: Vsock, pair: tuple[int, Proxy, Proxy]
) -> None:
    port, outer, inner = pair
    payload = os.urandom(256 * MiB)
    received = exchange(("127.0.0.1", port), payload, timeout=120)
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    outer.wait_for("ip to vsock IO copy done, from 127.0.0.1:")
    outer.wait_for(f"vsock to ip IO copy done, from vsock {vsock.address(4000)} to 127.0.0.1:")
    inner.wait_for(f"vsock to ip IO copy done, from {vsock.inbound_name(4000)}")


@pytest.mark.vsock
def test_half_close_keeps_other_direction_open(pair: tuple[int, Proxy, Proxy]) -> None:
    """After the client's EOF the server can still send; the client sees all, then EOF."""
    port, _, _ = pair
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"first")
        assert sock.recv(5) == b"first"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""  # the echo server half-closes after our EOF


@pytest.mark.vsock
def test_200_concurrent_connections(pair: tuple[int, Proxy, Proxy]) -> None:
    port, outer, _ = pair

    async def one(index: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = index.to_bytes(4, "big") * 4096
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        received = await reader.read()
        writer.close()
        return received == payload

    async def all_of_them() -> list[bool]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 120)

    results = asyncio.run(all_of_them())
    assert results.count(True) == 200
    assert outer.process.poll() is None


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet


@pytest.mark.vsock
def test_http_fetch_with_curl(vsock: Vsock, tmp_path: Path) -> None:
    """curl -> ip-to-vsock -> vsock :4006 -> vsock-to-ip -> an HTTP server: byte-exact."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "blob").write_bytes(os.urandom(8 * MiB))
    handler = functools.partial(_Files, directory=str(served))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = free_port()
        try:
            with (
                running(
                    "vsock-to-ip", "-v", vsock.listen_address(4006),
                    "-i", f"127.0.0.1:{server.server_address[1]}",
                    log_dir=tmp_path, env=vsock.env,
                ),
                running(
                    "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", vsock.address(4006),
                    log_dir=tmp_path, env=vsock.env,
                ),
            ):  # fmt: skip
                fetched = tmp_path / "fetched"
                result = subprocess.run(
                    ["curl", "--silent", "--show-error", "--fail", "--max-time", "60",
                     "--output", str(fetched), f"http://127.0.0.1:{port}/blob"],
                    capture_output=True, text=True, timeout=90,
                )  # fmt: skip
                assert result.returncode == 0, result.stderr
                assert fetched.read_bytes() == (served / "blob").read_bytes()
        finally:
            server.shutdown()


def test_upstream_refused_then_recovers(env: dict[str, str], tmp_path: Path) -> None:
    dead_port = free_port()
    with running(
        "vsock-to-ip", "-v", "88:4001", "-i", f"127.0.0.1:{dead_port}", log_dir=tmp_path, env=env
    ) as proxy:
        path = str(Path(env["PF_PROXY_VSOCK_DIR"]) / "88_4001.sock")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b"hello")
            try:
                assert sock.recv(10) == b""
            except ConnectionResetError:
                pass  # reset is as good as EOF: the inbound connection was closed
        proxy.wait_for(f"failed to connect to TCP endpoint 127.0.0.1:{dead_port}", stream="stderr")
        # The upstream appears on the same port: the proxy still serves.
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", dead_port))
        server.listen()
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(path)
                conn, _ = server.accept()
                sock.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
                assert sock.recv(4) == b"pong"
                conn.close()
        finally:
            server.close()
        assert proxy.process.poll() is None


def test_host_name_upstream(env: dict[str, str], echo: EchoServer, tmp_path: Path) -> None:
    with running(
        "vsock-to-ip", "-v", "88:4002", "-i", f"localhost:{echo.port}", log_dir=tmp_path, env=env
    ) as proxy:
        path = str(Path(env["PF_PROXY_VSOCK_DIR"]) / "88_4002.sock")
        assert exchange(path, b"by name" * 1000, family=socket.AF_UNIX) == b"by name" * 1000
        proxy.wait_for(f"Proxying to: localhost:{echo.port}")


def test_emulation_announced_and_cid_any_listener(
    env: dict[str, str], echo: EchoServer, tmp_path: Path
) -> None:
    """A listener on VMADDR_CID_ANY (4294967295) takes connections for any CID."""
    port = free_port()
    with (
        running(
            "vsock-to-ip",
            "-v",
            "4294967295:4003",
            "-i",
            f"127.0.0.1:{echo.port}",
            log_dir=tmp_path,
            env=env,
        ) as inner,
        running(
            "ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", "88:4003", log_dir=tmp_path, env=env
        ),
    ):
        assert "vsock emulation on" in inner.stdout
        assert exchange(("127.0.0.1", port), b"any cid") == b"any cid"


# --- start-up failures ----------------------------------------------------------------------


def test_bind_failure_on_ip_address_in_use(env: dict[str, str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_briefly("ip-to-vsock", "-i", f"127.0.0.1:{port}", "-v", "88:1", env=env)
    assert result.returncode == 1
    assert f"Failed to bind listener to 127.0.0.1:{port}" in result.stderr
    assert "Address already in use" in result.stderr


def test_bind_failure_on_real_vsock() -> None:
    """No usable AF_VSOCK here: binding fails cleanly (nothing is ever connected)."""
    env = {k: v for k, v in os.environ.items() if k != "PF_PROXY_VSOCK_DIR"}
    result = subprocess.run(
        ["vsock-to-ip", "-v", "88:4000", "-i", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
    )
    assert result.returncode == 1
    assert "Failed to bind listener to vsock 88:4000" in result.stderr


def test_live_emulated_listener_is_address_in_use(env: dict[str, str], tmp_path: Path) -> None:
    with running("vsock-to-ip", "-v", "88:4004", "-i", "127.0.0.1:1", log_dir=tmp_path, env=env):
        result = run_briefly("vsock-to-ip", "-v", "88:4004", "-i", "127.0.0.1:1", env=env)
    assert result.returncode == 1
    assert "Failed to bind listener to vsock 88:4004" in result.stderr
    assert "address in use" in result.stderr


def test_stale_emulated_socket_is_replaced(
    env: dict[str, str], echo: EchoServer, tmp_path: Path
) -> None:
    path = Path(env["PF_PROXY_VSOCK_DIR"]) / "88_4005.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody accepts on it
    assert path.exists()
    with running(
        "vsock-to-ip", "-v", "88:4005", "-i", f"127.0.0.1:{echo.port}", log_dir=tmp_path, env=env
    ):
        assert exchange(str(path), b"fresh", family=socket.AF_UNIX) == b"fresh"


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["vsock-to-ip", "-v", "88-4000", "-i", "127.0.0.1:80"], "'-v' / '--vsock-addr'"),
        (["vsock-to-ip", "-v", "88:4000", "-i", "bad_host:80"], "'-i' / '--ip-addr'"),
        (["vsock-to-ip", "-v", "88:4000"], "'-i' / '--ip-addr'"),
        (["ip-to-vsock", "-i", "localhost:3000", "-v", "88:5000"], "'-i' / '--ip-addr'"),
        (["ip-to-vsock", "-i", "0.0.0.0:3000", "-v", "88:5000:1"], "'-v' / '--vsock-addr'"),
        (["vsock-to-ip-transparent", "-v", ":1200"], "'-v' / '--vsock-addr'"),
        (["ip-to-vsock-transparent", "-i", "127.0.0.1:1200", "-v", "3"], "'-v' / '--vsock-addr'"),
        (["ip-to-vsock-transparent", "-i", "127.0.0.1", "-v", "3:1200"], "'-i' / '--ip-addr'"),
        (["transparent-port-to-vsock", "-i", "127.0.0.1:1200", "-v", "88:1"], "'-v' / '--vsock'"),
        (["transparent-port-to-vsock", "-i", "127.0.0.1:1200", "-v", "x"], "'-v' / '--vsock'"),
        (
            ["ip-to-vsock", "-i", "0.0.0.0:3000", "-v", "88:1", "--connect-timeout", "0"],
            "'--connect-timeout'",
        ),
        (["ip-to-vsock", "-i", "0.0.0.0:3000", "-v", "88:1", "--bogus"], "--bogus"),
    ],
)
def test_usage_errors_exit_2_naming_the_flag(args: list[str], flag: str) -> None:
    result = run_briefly(*args)
    assert result.returncode == 2, result
    assert flag in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        "vsock-to-ip",
        "ip-to-vsock",
        "vsock-to-ip-transparent",
        "ip-to-vsock-transparent",
        "transparent-port-to-vsock",
        *RAW_COMMANDS,
        "udp-to-vsock",
        "vsock-to-udp",
        "vsock-to-ip-proxy",
    ],
)
def test_help_and_version(command: str) -> None:
    """Every one of the twelve commands (the raw and UDP ones too)."""
    for flag in ("-h", "--help"):
        result = run_briefly(command, flag)
        assert result.returncode == 0
        assert "Usage:" in result.stdout
    for flag in ("-V", "--version"):
        result = run_briefly(command, flag)
        assert result.returncode == 0
        assert result.stdout.startswith(f"{command}, version ")


# --- values that cannot work: usage errors, not a proxy that starts and fails later ---------

# A valid command line for each console script, by long flag name; a test below replaces one
# flag's value with a bad one. A command added later needs a line here, and then each of its
# numeric options is tested like the others.
VALID_FLAGS = {
    "vsock-to-ip": {"--vsock-addr": "88:4000", "--ip-addr": "127.0.0.1:8080"},
    "ip-to-vsock": {"--ip-addr": "127.0.0.1:3000", "--vsock-addr": "88:5000"},
    "vsock-to-ip-transparent": {"--vsock-addr": "3:1200"},
    "ip-to-vsock-transparent": {"--ip-addr": "127.0.0.1:1200", "--vsock-addr": "3:1200"},
    "transparent-port-to-vsock": {"--ip-addr": "127.0.0.1:1200", "--vsock": "88"},
    "ip-to-vsock-raw-incoming": {"--vsock-addr": "88:1200", "--queue-num": "0"},
    "ip-to-vsock-raw-outgoing": {"--vsock-addr": "3:1200", "--queue-num": "0"},
    "vsock-to-ip-raw-incoming": {"--vsock-addr": "88:1200", "--device": "lo"},
    "vsock-to-ip-raw-outgoing": {"--vsock-addr": "3:1200"},
    "udp-to-vsock": {"--ip-addr": "127.0.0.1:5353", "--vsock-addr": "3:53"},
    "vsock-to-udp": {"--vsock-addr": "3:53", "--ip-addr": "127.0.0.1:53"},
    "vsock-to-ip-proxy": {"--vsock-addr": "3:3128"},
}
# NaN, the infinities (1e400 is one too, to float()) and a huge number; the other edges of
# the ranges are tested in-process in tests/unit/test_options.py, on the same commands.
BAD_SECONDS = ["nan", "inf", "-inf", "1e400", "1e300"]
BAD_WHOLE_NUMBERS = ["nan", "inf", "-inf", "1e400"]  # and one above the option's maximum


def numeric_options() -> list[tuple[str, click.Option]]:
    """(command, option) for every option of every proxy's command that takes a number."""
    found = []
    for name, command in sorted(proxy_commands().items()):
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(
                param.type, click.types.FloatParamType | click.types.IntParamType
            ):
                found.append((name, param))
    return found


def test_every_command_has_a_valid_command_line() -> None:
    assert sorted(VALID_FLAGS) == sorted(proxy_commands())


def expected_range(kind: click.ParamType) -> str:
    if isinstance(kind, Seconds):
        return "(0 or 0.001<=SECONDS<=31536000)" if kind.zero else "(0.001<=SECONDS<=31536000)"
    assert isinstance(kind, WholeNumber), f"{kind!r}: numeric options take Seconds or WholeNumber"
    return f"({kind.min}<={kind.metavar}<={kind.max})"


@pytest.mark.parametrize(
    ("command", "option"),
    numeric_options(),
    ids=[f"{command} {option.opts[-1]}" for command, option in numeric_options()],
)
def test_numeric_options_reject_what_no_timer_or_queue_takes(
    command: str, option: click.Option, tmp_path: Path
) -> None:
    """Each bad value exits 2 at once, naming the flag and giving the valid range; the
    command lines run concurrently to keep this quick. (Emulated vsock in an empty directory:
    a command that wrongly started would not touch real vsock.)"""
    flag = max(option.opts, key=len)
    if isinstance(option.type, Seconds):
        bad_values = BAD_SECONDS
    else:
        assert isinstance(option.type, WholeNumber) and option.type.max is not None
        bad_values = [*BAD_WHOLE_NUMBERS, str(option.type.max + 1)]
    lines = []
    for value in bad_values:
        flags = {**VALID_FLAGS[command], flag: value}
        lines.append([command, *(word for pair in flags.items() for word in pair)])
    named = " / ".join(f"'{name}'" for name in option.opts)
    valid = expected_range(option.type)
    for value, result in zip(
        bad_values,
        run_all_briefly(lines, env={"PF_PROXY_VSOCK_DIR": str(tmp_path)}),
        strict=True,
    ):
        assert result.returncode == 2, result
        assert f"Invalid value for {named}: {value!r} " in result.stderr, result.stderr
        assert valid in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["vsock-to-ip", "ip-to-vsock"])
@pytest.mark.parametrize("host", ["300.1.1.1", "1.2.3.4.5", "127.1", "1.2.3.4.", "0x7f.1"])
def test_dotted_numbers_that_are_not_ipv4_are_usage_errors(command: str, host: str) -> None:
    """For the upstream of vsock-to-ip (host names allowed) as for a listener: a name whose
    last label is all digits is a malformed IPv4 address, not a name to look up."""
    result = run_briefly(command, "-v", "88:4000", "-i", f"{host}:80")
    assert result.returncode == 2, result
    assert (
        f"Invalid value for '-i' / '--ip-addr': '{host}:80': invalid IPv4 address '{host}'"
        in result.stderr
    ), result.stderr


def listen_backlog(path: str) -> int:
    """The backlog of the Unix listener at `path` (ss shows it as a listener's Send-Q)."""
    for line in subprocess.run(
        ["ss", "-xlH"], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        fields = line.split()
        if fields[4] == path:
            return int(fields[3])
    raise AssertionError(f"no listener at {path}")


def test_the_listen_backlog_is_the_kernels_largest_unless_set(
    echo: EchoServer, tmp_path: Path
) -> None:
    """A vsock connect to a full backlog is refused: listeners take net.core.somaxconn, the
    most the kernel allows, or --backlog N."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    with vsock_under_test() as vsock:
        for args, expected in (([], somaxconn), (["--backlog", "16"], 16)):
            with running(
                "vsock-to-ip", "-v", "88:4000", "-i", f"127.0.0.1:{echo.port}", *args,
                log_dir=tmp_path, env=vsock.env,
            ) as proxy:  # fmt: skip
                assert listen_backlog(vsock.path("88:4000")) == expected
                assert f"listen backlog {expected})" in proxy.stdout
