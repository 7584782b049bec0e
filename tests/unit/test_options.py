"""The numeric option types: what a timeout, an interval or a queue number takes.

The real console scripts are run with NaN, the infinities and huge values in
tests/integration/test_tcp_proxies.py; here the edges of each range, in-process, on the same
commands (loaded from their entry points) and on the types themselves.
"""

from __future__ import annotations

import math

import click
import pytest
from click.testing import CliRunner

from pf_proxy.cli.options import MAX_SECONDS, MIN_SECONDS, Seconds, WholeNumber
from tests.integration.helpers import proxy_commands

COMMANDS = proxy_commands()


def test_the_range_is_a_year_down_to_a_millisecond() -> None:
    assert MAX_SECONDS == 31_536_000 == 365 * 24 * 3600
    assert MIN_SECONDS == 0.001


def test_every_numeric_option_of_every_command_takes_a_checked_type() -> None:
    """A command added later with click.FLOAT or a bare FloatRange (which take NaN) fails
    here: timeouts and intervals take Seconds, integers WholeNumber."""
    assert len(COMMANDS) == 12, sorted(COMMANDS)  # pf-proxy run's kinds
    numeric = []
    for name, command in COMMANDS.items():
        for param in command.params:
            if isinstance(param.type, click.types.FloatParamType):
                assert isinstance(param.type, Seconds), (name, param.name, param.type)
                numeric.append(param.name)
            elif isinstance(param.type, click.types.IntParamType):
                assert isinstance(param.type, WholeNumber), (name, param.name, param.type)
                numeric.append(param.name)
    # 6 TCP commands x 3 timeouts, and vsock-to-ip-proxy's --request-timeout; 4 raw commands
    # x (stats interval, drain timeout); 2 queues; 2 UDP commands x (3 timeouts, stats
    # interval); a vsock buffer size on all twelve; --workers on the 6 TCP commands;
    # --backlog on them and vsock-to-udp
    assert len(numeric) == 18 + 1 + 8 + 2 + 8 + 12 + 6 + 7


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0.001", 0.001),
        ("10", 10.0),
        ("1e3", 1000.0),
        ("31536000", 31536000.0),
        ("31536000.0", 31536000.0),
    ],
)
def test_seconds_in_range(text: str, seconds: float) -> None:
    for kind in (Seconds(zero=False), Seconds(zero=True)):
        assert kind.convert(text, None, None) == seconds


@pytest.mark.parametrize("text", ["0", "0.0", "-0", "+0e9"])
def test_zero_only_where_it_means_off(text: str) -> None:
    assert Seconds(zero=True).convert(text, None, None) == 0.0
    assert math.copysign(1, Seconds(zero=True).convert(text, None, None)) == 1  # not -0.0
    with pytest.raises(click.BadParameter, match=r"is out of range \(0\.001<=SECONDS<=31536000\)"):
        Seconds(zero=False).convert(text, None, None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("nan", "is not a finite number of seconds"),
        ("NaN", "is not a finite number of seconds"),
        ("-nan", "is not a finite number of seconds"),
        ("inf", "is not a finite number of seconds"),
        ("+Infinity", "is not a finite number of seconds"),
        ("-inf", "is not a finite number of seconds"),
        ("1e400", "is not a finite number of seconds"),
        ("1e300", "is out of range"),
        ("31536000.5", "is out of range"),
        ("31536001", "is out of range"),
        ("0.0009", "is out of range"),  # rounds to 0 ms: "now"
        ("1e-300", "is out of range"),
        ("-1", "is out of range"),
        ("-0.001", "is out of range"),
        ("abc", "is not a number of seconds"),
        ("", "is not a number of seconds"),
        ("0x10", "is not a number of seconds"),
        ("10s", "is not a number of seconds"),
    ],
)
def test_seconds_out_of_range_or_not_a_number(text: str, problem: str) -> None:
    for kind, valid in (
        (Seconds(zero=False), "(0.001<=SECONDS<=31536000)"),
        (Seconds(zero=True), "(0 or 0.001<=SECONDS<=31536000)"),
    ):
        with pytest.raises(click.BadParameter) as info:
            kind.convert(text, None, None)
        assert info.value.message == f"{text!r} {problem} {valid}"


@pytest.mark.parametrize(("text", "number"), [("0", 0), ("65535", 65535), ("+7", 7), ("007", 7)])
def test_whole_numbers_in_range(text: str, number: int) -> None:
    assert WholeNumber(0, 0xFFFF, "NUM").convert(text, None, None) == number


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("nan", "is not a whole number"),
        ("inf", "is not a whole number"),
        ("1e400", "is not a whole number"),
        ("1e3", "is not a whole number"),
        ("5.0", "is not a whole number"),
        ("0x10", "is not a whole number"),
        ("1_0", "is not a whole number"),  # int() takes these three
        (" 7", "is not a whole number"),
        ("\u0665", "is not a whole number"),  # ARABIC-INDIC DIGIT FIVE
        ("", "is not a whole number"),
        ("-1", "is out of range"),
        ("65536", "is out of range"),
        ("99999999999999999999", "is out of range"),
    ],
)
def test_whole_numbers_out_of_range_or_not_whole(text: str, problem: str) -> None:
    with pytest.raises(click.BadParameter) as info:
        WholeNumber(0, 0xFFFF, "NUM").convert(text, None, None)
    assert info.value.message == f"{text!r} {problem} (0<=NUM<=65535)"


def test_defaults_pass_their_own_types() -> None:
    checked = 0
    for command in COMMANDS.values():
        for param in command.params:
            if isinstance(param.type, Seconds | WholeNumber) and isinstance(
                param.default, int | float
            ):
                assert param.type.convert(param.default, None, None) == param.default
                checked += 1
    # every timeout and interval, the vsock buffer size and --workers; the queue numbers
    # are required
    assert checked == 18 + 1 + 8 + 8 + 12 + 6


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        (
            "ip-to-vsock",
            ["--connect-timeout", "0"],
            "Invalid value for '--connect-timeout': '0' is out of range (0.001<=SECONDS<=31536000)",
        ),
        (
            "vsock-to-ip-transparent",
            ["--idle-timeout", "31536001"],
            "Invalid value for '--idle-timeout': '31536001' is out of range "
            "(0 or 0.001<=SECONDS<=31536000)",
        ),
        (
            "transparent-port-to-vsock",
            ["--drain-timeout", "-1"],
            "Invalid value for '--drain-timeout': '-1' is out of range "
            "(0 or 0.001<=SECONDS<=31536000)",
        ),
        (
            "vsock-to-ip-raw-outgoing",
            ["--stats-interval", "0.0004"],
            "Invalid value for '--stats-interval': '0.0004' is out of range "
            "(0 or 0.001<=SECONDS<=31536000)",
        ),
        (
            "ip-to-vsock-raw-outgoing",
            ["-q", "-1"],
            "Invalid value for '-q' / '--queue-num': '-1' is out of range (0<=NUM<=65535)",
        ),
        (
            "vsock-to-udp",
            ["--backlog", "0"],
            "Invalid value for '--backlog': '0' is out of range (1<=N<=2147483647)",
        ),
    ],
)
def test_edges_through_the_commands(command: str, args: list[str], message: str) -> None:
    result = CliRunner().invoke(COMMANDS[command], args)
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("vsock-to-ip", ["--connect-timeout", "0.001", "--idle-timeout", "0"]),
        ("vsock-to-ip", ["--drain-timeout", "31536000", "--idle-timeout", "1e3"]),
        ("ip-to-vsock-raw-incoming", ["--stats-interval", "0", "--drain-timeout", "0", "-q", "0"]),
        ("ip-to-vsock-raw-incoming", ["-q", "65535"]),
        ("ip-to-vsock", ["--backlog", "1", "-i", "127.0.0.1:1"]),
        ("vsock-to-udp", ["--backlog", "2147483647", "-i", "127.0.0.1:1"]),
    ],
)
def test_the_ends_of_the_ranges_get_past_their_flags(command: str, args: list[str]) -> None:
    """The command stops at the missing -v, after taking every value given."""
    result = CliRunner().invoke(COMMANDS[command], args)
    assert result.exit_code == 2, result.output
    assert "Missing option '-v' / '--vsock-addr'" in result.output


def test_help_shows_the_ranges() -> None:
    result = CliRunner().invoke(
        COMMANDS["ip-to-vsock-raw-incoming"], ["--help"], terminal_width=200
    )
    assert result.exit_code == 0
    assert "[0<=NUM<=65535; required]" in result.output
    assert "[default: 60.0; 0 or 0.001<=SECONDS<=31536000]" in result.output
    result = CliRunner().invoke(COMMANDS["vsock-to-ip"], ["--help"], terminal_width=200)
    assert "[default: 10.0; 0.001<=SECONDS<=31536000]" in result.output
    assert "[default: (net.core.somaxconn); 1<=N<=2147483647]" in result.output
