"""Click parameter types and options shared by every command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from pf_proxy import __version__
from pf_proxy.access import CidrError, parse_cidr
from pf_proxy.endpoints import (
    AddressError,
    IpAddress,
    VsockAddress,
    parse_cid,
    parse_ip_address,
    parse_vsock_address,
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
        except (AddressError, CidrError) as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)


VSOCK_ADDRESS = _AddressType("CID:PORT", parse_vsock_address)
IP_LISTEN_ADDRESS = _AddressType("IP:PORT", parse_ip_address)
IP_TARGET_ADDRESS = _AddressType(
    "HOST:PORT", lambda text: parse_ip_address(text, allow_host_name=True)
)
CID = _AddressType("CID", parse_cid)
CIDR = _AddressType("CIDR", parse_cidr)

__all__ = [
    "CID",
    "CIDR",
    "IP_LISTEN_ADDRESS",
    "IP_TARGET_ADDRESS",
    "VSOCK_ADDRESS",
    "IpAddress",
    "VsockAddress",
    "command",
    "timeouts",
]


def command(help_text: str) -> Callable[[F], F]:
    """A click command with -h/--help and -V/--version, as the originals have."""

    def decorate(func: F) -> F:
        name = func.__name__.replace("_", "-")
        func = click.version_option(__version__, "-V", "--version", prog_name=name)(func)
        decorated = click.command(context_settings=CONTEXT_SETTINGS, help=help_text)(func)
        return decorated  # type: ignore[return-value]

    return decorate


def _seconds(allow_off: bool) -> click.FloatRange:
    return click.FloatRange(min=0, min_open=not allow_off)


def timeouts(func: F) -> F:
    """--connect-timeout, --idle-timeout, --drain-timeout (additions; defaults are faithful)."""
    options = [
        click.option(
            "--connect-timeout",
            type=_seconds(False),
            default=10.0,
            show_default=True,
            metavar="SECONDS",
            help="Give up on an upstream connect (and a transparent header read) after this.",
        ),
        click.option(
            "--idle-timeout",
            type=_seconds(True),
            default=0.0,
            show_default="off",
            metavar="SECONDS",
            help="Close a connection with no traffic either way for this long (0: never).",
        ),
        click.option(
            "--drain-timeout",
            type=_seconds(True),
            default=5.0,
            show_default=True,
            metavar="SECONDS",
            help="On SIGTERM/SIGINT, let open connections finish for up to this long.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func
