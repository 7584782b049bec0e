"""Click parameter types and options shared by every command."""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from pf_proxy import __version__, hybrid, metrics
from pf_proxy.endpoints import (
    AddressError,
    HybridVsock,
    IpAddress,
    VsockAddress,
    VsockEndpoint,
    parse_cid,
    parse_ip_address,
    parse_vsock_address,
    vsock_endpoint,
    vsock_transport,
)

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _AddressType(click.ParamType):  # type: ignore[type-arg]
    """Turns an AddressError into click's usage error (exit 2, naming the flag)."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except AddressError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)


def _network_rule(text: str) -> Any:
    """--allow, --deny: the policy's module is imported when a rule is given, not by every
    command (see tcp/egress.py)."""
    from pf_proxy.tcp.access import CidrError, parse_network_rule

    try:
        return parse_network_rule(text)
    except CidrError as exc:
        raise AddressError(str(exc)) from None


VSOCK_ADDRESS = _AddressType("CID:PORT", parse_vsock_address)
IP_LISTEN_ADDRESS = _AddressType("IP:PORT", parse_ip_address)
IP_TARGET_ADDRESS = _AddressType(
    "HOST:PORT", lambda text: parse_ip_address(text, allow_host_name=True)
)
CID = _AddressType("CID", parse_cid)
NETWORK_RULE = _AddressType("CIDR[:PORT]", _network_rule)

__all__ = [
    "CID",
    "IP_LISTEN_ADDRESS",
    "IP_TARGET_ADDRESS",
    "MAX_SECONDS",
    "MIN_SECONDS",
    "NETWORK_RULE",
    "VSOCK_ADDRESS",
    "IpAddress",
    "Seconds",
    "VsockAddress",
    "WholeNumber",
    "backlog_option",
    "command",
    "metrics_option",
    "timeouts",
    "vsock_buffer",
    "vsock_side",
    "vsock_side_endpoint",
    "vsock_uds_option",
]

# The longest timeout or interval any option takes: 365 days. A NaN delay makes the event
# loop's timer raise (uvloop: "cannot convert float NaN to integer", in the middle of a
# connection), and uvloop silently shortens any delay beyond 100 years (its MAX_SLEEP), inf
# included, so neither is what was asked for. A year is far inside what both uvloop (timers
# in whole milliseconds, 64-bit) and asyncio's own loop schedule exactly, and longer than any
# timeout or interval a proxy needs.
MAX_SECONDS = 365 * 24 * 60 * 60
# The shortest non-zero one: uvloop's timer resolution. It rounds a delay to whole
# milliseconds, so 0.0004 would mean "now": every upstream connect timing out at once, or
# --stats-interval looping without pause.
MIN_SECONDS = 0.001


def _number(value: float) -> str:
    return f"{value:.15g}"  # 31536000, not 3.1536e+07


class Seconds(click.FloatRange):
    """A finite number of seconds the event loop can schedule: MIN_SECONDS to MAX_SECONDS,
    and 0 as well with `zero` (where 0 means off, or not waiting). Every timeout or interval
    option takes this type, so each failure (not a number, NaN or infinity, out of range) is
    a usage error that names the flag and gives the valid range."""

    name = "seconds"

    def __init__(self, *, zero: bool) -> None:
        super().__init__(min=MIN_SECONDS, max=MAX_SECONDS)
        self.zero = zero

    def _describe_range(self) -> str:
        # click shows this in --help ("[default: 10.0; ...]"); the messages below repeat it.
        span = f"{_number(MIN_SECONDS)}<=SECONDS<={_number(MAX_SECONDS)}"
        return f"0 or {span}" if self.zero else span

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        valid = self._describe_range()
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds ({valid})", param, ctx)
        if not math.isfinite(seconds):  # nan, inf, -inf, and 1e400, which float() makes inf
            self.fail(f"{value!r} is not a finite number of seconds ({valid})", param, ctx)
        if seconds == 0 and self.zero:
            return 0.0  # -0.0 too
        if not MIN_SECONDS <= seconds <= MAX_SECONDS:
            self.fail(f"{value!r} is out of range ({valid})", param, ctx)
        return seconds


_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")


class WholeNumber(click.IntRange):
    """An integer from `minimum` to `maximum` in ASCII decimal digits (int() would also take
    an Arabic-Indic '5', '1_0' and ' 7'); failures give the valid range, written with
    `metavar` (the option's), as `Seconds` does."""

    name = "integer"

    def __init__(self, minimum: int, maximum: int, metavar: str) -> None:
        super().__init__(min=minimum, max=maximum)
        self.metavar = metavar

    def _describe_range(self) -> str:
        return f"{self.min}<={self.metavar}<={self.max}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        valid = self._describe_range()
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value):
            number = int(value)
        else:
            self.fail(f"{value!r} is not a whole number ({valid})", param, ctx)
        assert self.min is not None and self.max is not None
        if not self.min <= number <= self.max:
            self.fail(f"{value!r} is out of range ({valid})", param, ctx)
        return number


def run_command(kind: str, options: dict[str, Any]) -> NoReturn:
    """Serve one proxy of `kind` with the options from its flags: a run file with one proxy
    (see :mod:`pf_proxy.runner`), without the name in its log lines. Exits."""
    from pf_proxy import kinds, runner, runtime

    runtime.start_logging()
    spec = runner.Spec("", kind, options)
    sys.exit(runner.run([spec], kinds.plan, options.get("metrics_address")))


def command(help_text: str) -> Callable[[F], F]:
    """A click command with -h/--help and -V/--version, as the originals have."""

    def decorate(func: F) -> F:
        name = func.__name__.replace("_", "-")
        func = click.version_option(__version__, "-V", "--version", prog_name=name)(func)
        decorated = click.command(context_settings=CONTEXT_SETTINGS, help=help_text)(func)
        return decorated  # type: ignore[return-value]

    return decorate


def _timeout_options(
    connect_help: str, idle_default: float, idle_help: str, drain_help: str
) -> Callable[[F], F]:
    """--connect-timeout, --idle-timeout and --drain-timeout, with these defaults and helps."""

    def decorate(func: F) -> F:
        options = [
            click.option(
                "--connect-timeout",
                type=Seconds(zero=False),
                default=10.0,
                show_default=True,
                metavar="SECONDS",
                help=connect_help,
            ),
            click.option(
                "--idle-timeout",
                type=Seconds(zero=True),
                default=idle_default,
                show_default="off" if idle_default == 0 else True,
                metavar="SECONDS",
                help=idle_help,
            ),
            click.option(
                "--drain-timeout",
                type=Seconds(zero=True),
                default=5.0,
                show_default=True,
                metavar="SECONDS",
                help=drain_help,
            ),
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


# The TCP commands' (additions; the defaults are the originals' behaviour).
timeouts = _timeout_options(
    "Give up on an upstream connect (and a transparent header read) after this.",
    0.0,
    "Close a connection with no traffic either way for this long (0: never).",
    "On SIGTERM/SIGINT, let open connections finish for up to this long.",
)
# vsock-to-ip-proxy's: its upstream is named by the client's request, and the name resolved.
proxy_timeouts = _timeout_options(
    "Give up on the upstream (resolving the requested name, at most half of this, and "
    "connecting) after this; the client is answered 504, or SOCKS5's 'TTL expired'.",
    0.0,
    "Close a connection with no traffic either way for this long (0: never).",
    "On SIGTERM/SIGINT, let open connections finish for up to this long.",
)
# The UDP commands', whose flows have no end of their own: idleness ends them.
flow_timeouts = _timeout_options(
    "Give up on a new flow's upstream (a vsock connect, or resolving the host name) after "
    "this; its datagrams are dropped.",
    30.0,
    "End a flow with no datagram either way for this long, freeing its sockets (0: never; "
    "flows then end only at the flow limit).",
    "On SIGTERM/SIGINT, open no new flows and let open ones carry on for up to this long.",
)


# The receive buffer of every vsock socket a command opens (SO_VM_SOCKETS_BUFFER_SIZE; the
# kernel's default is 256 KiB). It caps one vsock connection's bytes in flight: over real vsock
# in the guest stage one stream through the pair carried 1.13x as much at 1 MiB and 1.61x at
# 4 MiB (benchmarks/results-vsock.md, medians of 3). It costs memory only while bytes wait to
# be read (an idle connection: nothing), at most this much per direction of a stalled
# connection: less than a TCP socket may hold by default (net.ipv4.tcp_rmem's 6 MiB).
DEFAULT_VSOCK_BUFFER_SIZE = 4 << 20
MIN_VSOCK_BUFFER_SIZE = 4096
MAX_VSOCK_BUFFER_SIZE = 64 << 20


def vsock_buffer(func: F) -> F:
    """--vsock-buffer-size (an addition)."""
    return click.option(
        "--vsock-buffer-size",
        type=WholeNumber(MIN_VSOCK_BUFFER_SIZE, MAX_VSOCK_BUFFER_SIZE, metavar="BYTES"),
        default=DEFAULT_VSOCK_BUFFER_SIZE,
        show_default="4 MiB",
        metavar="BYTES",
        help="Receive buffer of each vsock socket (SO_VM_SOCKETS_BUFFER_SIZE): it caps the "
        "bytes in flight on one vsock connection, so one stream's throughput. Memory is "
        "used only while bytes wait to be read. No effect on the emulation.",
    )(func)


UNIX_PATH_MAX = 107  # sun_path's 108 bytes, less the terminating NUL


def vsock_uds_option(func: F) -> F:
    """--vsock-uds PATH (an addition, every command): the vsock side is hybrid vsock."""
    return click.option(
        "--vsock-uds",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        metavar="PATH",
        help="Hybrid vsock: the vsock side is one microVM's vsock device, the Unix socket PATH "
        "of its Firecracker or Cloud Hypervisor VMM (its uds_path). An upstream CID:PORT is "
        "the guest's port PORT, reached with the CONNECT/OK handshake on PATH (CID: the "
        "guest's, 3 or more); a listener on CID:PORT is the Unix socket PATH_PORT, where the "
        "guest's connects to the host (CID 2) port PORT arrive (CID: 2). A half-close does "
        "not cross it. Default: AF_VSOCK.",
    )(func)


class VsockSideError(ValueError):
    """A vsock side that cannot be used: `param` names the option at fault."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def vsock_side_endpoint(
    address: VsockAddress,
    buffer_size: int,
    uds_path: Path | None,
    *,
    listening: bool,
    param: str = "vsock_addr",
) -> VsockEndpoint:
    """The vsock endpoint of a proxy's options: over hybrid vsock with --vsock-uds. A CID or a
    path that cannot be used that way is `VsockSideError` naming the option (its parameter
    name) and why."""
    try:
        transport = vsock_transport(uds_path)
    except AddressError as exc:
        raise VsockSideError("vsock_uds", str(exc)) from None
    if isinstance(transport, HybridVsock):
        where = transport.listen_path(address) if listening else transport.uds_path
        if len(os.fsencode(where)) > UNIX_PATH_MAX:
            raise VsockSideError(
                "vsock_uds",
                f"{str(where)!r} is too long for a Unix socket ({UNIX_PATH_MAX} bytes at most)",
            )
    try:
        return vsock_endpoint(address, buffer_size, transport, listening=listening)
    except AddressError as exc:
        shown = str(address.cid) if param == "cid" else str(address)
        raise VsockSideError(param, f"{shown!r}: {exc}") from None


def vsock_side(
    address: VsockAddress,
    buffer_size: int,
    uds_path: Path | None,
    *,
    listening: bool,
    param: str = "vsock_addr",
) -> VsockEndpoint:
    """`vsock_side_endpoint` as a proxy's plan builds it: its hybrid handshakes counted in
    /metrics; what cannot be used is a usage error (exit 2) naming the flag. (A run file's
    proxies were checked by `config` already, with the file's line.)"""
    try:
        endpoint = vsock_side_endpoint(
            address, buffer_size, uds_path, listening=listening, param=param
        )
    except VsockSideError as exc:
        ctx = click.get_current_context()
        found = [p for p in ctx.command.params if p.name == exc.param]
        raise click.BadParameter(str(exc), ctx, found[0] if found else None) from None
    transport = endpoint.transport
    if isinstance(transport, HybridVsock):
        metrics.register(functools.partial(hybrid.metrics_source, transport.handshakes))
    return endpoint


def metrics_option(func: F) -> F:
    """--metrics IP:PORT (an addition; off by default)."""
    return click.option(
        "--metrics",
        "metrics_address",
        type=IP_LISTEN_ADDRESS,
        default=None,
        metavar="IP:PORT",
        help="Serve /metrics (Prometheus text format) and /healthz (200 while serving, 503 "
        "once draining) on this address. Default: off.",
    )(func)


class _HostPatternType(click.ParamType):  # type: ignore[type-arg]
    """--allow-host: a malformed pattern is a usage error (exit 2) naming the flag and why."""

    name = "PATTERN"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        from pf_proxy.tcp.access import HostPatternError, parse_host_pattern

        try:
            return parse_host_pattern(value)
        except HostPatternError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)


HOST_PATTERN = _HostPatternType()


def stats_interval_counting(what: str) -> Callable[[F], F]:
    """--stats-interval (an addition): log the counts of `what` this often when they changed."""
    return click.option(
        "--stats-interval",
        type=Seconds(zero=True),
        default=60.0,
        show_default=True,
        metavar="SECONDS",
        help=f"Log the {what} counts this often when they change (0: only at exit).",
    )


stats_interval = stats_interval_counting("flow and datagram")


MAX_BACKLOG = 2**31 - 1  # listen()'s int


def backlog_option(func: F) -> F:
    """--backlog N (an addition; the commands that accept streams). Default None: the
    largest backlog the kernel allows."""
    return click.option(
        "--backlog",
        type=WholeNumber(1, MAX_BACKLOG, metavar="N"),
        default=None,
        show_default="net.core.somaxconn",
        metavar="N",
        help="Listen backlog: connections the kernel queues until they are accepted. A "
        "vsock connect to a full backlog is refused (and retried within --connect-timeout). "
        "The kernel caps it at net.core.somaxconn.",
    )(func)


MAX_WORKERS = 128


def workers_option(func: F) -> F:
    """--workers N (an addition; the TCP commands)."""
    return click.option(
        "--workers",
        type=WholeNumber(1, MAX_WORKERS, metavar="N"),
        default=1,
        show_default=True,
        metavar="N",
        help="Serve with N processes (at most one per CPU is useful). IP listeners get one "
        "socket per process (SO_REUSEPORT), vsock ones one socket all processes accept on. "
        "SIGTERM drains them all; with --metrics, process K serves it on the port plus K-1.",
    )(func)
