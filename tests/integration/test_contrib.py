"""contrib/: the systemd units and the supervisord example start real commands with valid flags.

Each command line is parsed by the command itself (click's own parser and types, without
running it), so a renamed flag, a bad address or a malformed CIDR in an example fails here.
`systemd-analyze verify` checks the units where it is installed.
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest

from pf_proxy import config
from pf_proxy.endpoints import HybridVsock, vsock_endpoint
from pf_proxy.runner import Spec
from pf_proxy.tcp.access import AccessPolicy, parse_cidr
from tests.integration.helpers import console_scripts

CONTRIB = Path(__file__).parents[2] / "contrib"
UNITS = sorted((CONTRIB / "systemd").glob("*.service"))
# The host side of microVMs: their vsock is hybrid vsock, a Unix socket (uds_path).
MICROVM_UNITS = [unit for unit in UNITS if "--vsock-uds" in unit.read_text()]
INSTALLED_BIN = "/opt/pf-proxy/bin/"
RAW_CAPABILITIES = {"CAP_NET_ADMIN", "CAP_NET_RAW"}


def commands() -> dict[str, click.Command]:
    """The project's console scripts, loaded."""
    found = console_scripts()
    assert {"vsock-to-ip", "udp-to-vsock", "pf-proxy"} <= set(found), sorted(found)
    return found


COMMANDS = commands()
RUN_FILES = sorted((CONTRIB / "pf-proxy").glob("*.toml"))


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> values (a key may repeat); `\\` continues."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, equals, value = line.partition("=")
        assert equals and current is not None, f"{path.name}: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    assert not pending, f"{path.name}: ends inside a continued line"
    return sections


def parse_command_line(line: str) -> tuple[str, click.Context]:
    """Split a command line and let the command parse it (types and all, nothing run)."""
    program, *args = shlex.split(line)
    assert program.startswith(INSTALLED_BIN), program
    name = program.removeprefix(INSTALLED_BIN)
    assert name in COMMANDS, f"{name} is not one of the project's commands"
    return name, COMMANDS[name].make_context(name, args)


def run_file_specs(line: str) -> list[Spec]:
    """`pf-proxy run FILE --side S`: the proxies of that side of FILE, taken from contrib/."""
    program, subcommand, *args = shlex.split(line)
    group = COMMANDS[program.removeprefix(INSTALLED_BIN)]
    assert isinstance(group, click.Group) and subcommand == "run", line
    params = group.commands["run"].make_context("run", args).params
    path = Path(params["file"])
    assert path.parent == Path("/etc/pf-proxy"), path
    return config.load(CONTRIB / "pf-proxy" / path.name, params["side"]).specs


def listening_ports(line: str) -> tuple[str, list[int | None], float]:
    """What a unit's or program's command runs: (the command, the TCP or UDP port of each
    proxy it serves, the longest drain timeout)."""
    name, ctx = parse_command_line(line)
    if name != "pf-proxy":
        return name, [listening_port(name, ctx.params)], ctx.params["drain_timeout"]
    specs = run_file_specs(line)
    drain = max(spec.options["drain_timeout"] for spec in specs)
    return name, [listening_port(spec.kind, spec.options) for spec in specs], drain


def raw_kinds(line: str) -> bool:
    name, _ = parse_command_line(line)
    kinds = [spec.kind for spec in run_file_specs(line)] if name == "pf-proxy" else [name]
    return any("-raw-" in kind for kind in kinds)


def listening_port(name: str, params: dict[str, Any]) -> int | None:
    """The TCP or UDP port a command listens on (None when it listens on vsock or nfqueue)."""
    if name in (
        "ip-to-vsock", "ip-to-vsock-transparent", "transparent-port-to-vsock", "udp-to-vsock"
    ):  # fmt: skip
        port: int = params["ip_addr"].port
        return port
    return None


def runs(name: str, command: str) -> bool:
    """A unit or program is named after the command it runs, or (a second instance of a
    command, e.g. ip-to-vsock-dns) after the command and a suffix."""
    return name == command or (name.startswith(f"{command}-") and name not in COMMANDS)


def test_one_unit_per_command() -> None:
    assert set(COMMANDS) <= {unit.stem for unit in UNITS}


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.stem)
def test_unit_starts_its_command_with_valid_flags(unit: Path) -> None:
    service = parse_unit(unit)["Service"]
    (exec_start,) = service["ExecStart"]
    name, _, drain_timeout = listening_ports(exec_start)
    assert runs(unit.stem, name)
    assert service["Type"] == ["notify"]  # every command sends READY=1 once listening
    assert service["Restart"] == ["always"]
    assert service["NoNewPrivileges"] == ["yes"]
    # systemd's stop timeout must outlast the proxy's own drain
    assert float(service["TimeoutStopSec"][0]) > drain_timeout


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.stem)
def test_unit_capabilities_are_only_those_needed(unit: Path) -> None:
    service = parse_unit(unit)["Service"]
    exec_start = service["ExecStart"][0]
    bounding = set(" ".join(service["CapabilityBoundingSet"]).split())
    ambient = set(" ".join(service["AmbientCapabilities"]).split())
    expected = set(RAW_CAPABILITIES) if raw_kinds(exec_start) else set()
    _, ports, _ = listening_ports(exec_start)
    if any(port is not None and port < 1024 for port in ports):
        expected.add("CAP_NET_BIND_SERVICE")
    assert bounding == expected
    assert ambient == expected


def test_the_run_file_unit_checks_its_file_and_reloads_with_sighup() -> None:
    service = parse_unit(CONTRIB / "systemd" / "pf-proxy.service")["Service"]
    (check,) = service["ExecStartPre"]
    assert check == service["ExecStart"][0].replace(" run ", " check ")
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda path: path.name)
def test_example_run_files_pass_pf_proxy_check(path: Path) -> None:
    """Each example as a user would check it: with each side, if it describes both."""
    sides = ["enclave", "parent"] if "[enclave]" in path.read_text() else [None]
    for side in sides:
        args = ["pf-proxy", "check", str(path)] + (["--side", side] if side else [])
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1].endswith(" no errors"), done.stdout


def test_there_is_a_unit_for_the_host_side_of_a_microvm() -> None:
    assert MICROVM_UNITS


@pytest.mark.parametrize("unit", MICROVM_UNITS, ids=lambda unit: unit.stem)
def test_a_microvm_unit_can_make_and_reach_its_hybrid_vsock_sockets(unit: Path) -> None:
    """Its address fits hybrid vsock (a listener is the host, CID 2; an upstream the guest);
    the VMM's directory is writable (a listener on port P is the socket uds_path_P, made
    there), and the unit runs as a user of its own that the VMM can share sockets with, not
    a dynamic one."""
    service = parse_unit(unit)["Service"]
    name, ctx = parse_command_line(service["ExecStart"][0])
    uds = ctx.params["vsock_uds"]
    vsock_endpoint(
        ctx.params["vsock_addr"], transport=HybridVsock(uds), listening=name.startswith("vsock-to-")
    )
    assert str(uds.parent) in " ".join(service["ReadWritePaths"]).split()
    families = " ".join(service["RestrictAddressFamilies"]).split()
    assert "AF_UNIX" in families
    assert "AF_VSOCK" not in families  # the host side of a microVM has no AF_VSOCK
    assert service.get("DynamicUser", ["no"]) == ["no"]
    assert service["User"] and service["Group"]


def unit_policy(unit: str) -> AccessPolicy:
    """The egress policy a unit's command line sets up; it must have --deny-private."""
    service = parse_unit(CONTRIB / "systemd" / unit)["Service"]
    _, ctx = parse_command_line(service["ExecStart"][0])
    params = ctx.params
    assert params["deny_private"]
    return AccessPolicy(
        params["allow"], params["deny"], params["allow_hosts"], params["deny_private"]
    )


def test_transparent_unit_denies_the_metadata_service() -> None:
    policy = unit_policy("vsock-to-ip-transparent.service")
    for denied in (
        "169.254.169.254",
        "fd00:ec2::254",
        "::ffff:169.254.169.254",
        "127.0.0.1",
        "0.0.0.0",
        "::1",
        "::",
        "10.0.0.2",
        "172.31.0.2",
    ):
        assert not policy.permits(parse_cidr(denied).network_address, 443), denied
    assert policy.permits(parse_cidr("93.184.216.34").network_address, 443)


def test_explicit_proxy_unit_denies_the_metadata_service_and_allows_names_on_443() -> None:
    policy = unit_policy("vsock-to-ip-proxy.service")
    for denied in ("169.254.169.254", "fd00:ec2::254", "2002:a9fe:a9fe::", "10.0.0.2"):
        assert not policy.permits(parse_cidr(denied).network_address, 443), denied
    assert policy.pattern_for("kms.us-east-1.amazonaws.com", 443) is not None
    assert policy.pattern_for("bucket.s3.us-east-1.amazonaws.com", 443) is not None
    assert policy.pattern_for("bucket.s3.us-east-1.amazonaws.com", 80) is None


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """The units as systemd reads them, with the console scripts where this test finds them."""
    bin_dir = Path(shutil.which("vsock-to-ip") or "").parent
    assert bin_dir.name, "the console scripts are not on PATH"
    copies = []
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(INSTALLED_BIN, f"{bin_dir}/"))
        copies.append(str(copy))
    result = subprocess.run(
        ["systemd-analyze", "verify", *copies],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    ours = [line for line in output.splitlines() if any(u.stem in line for u in UNITS)]
    assert not ours, "\n".join(ours)  # "Unknown key", bad values, missing executables


def supervisord_programs() -> dict[str, configparser.SectionProxy]:
    parser = configparser.RawConfigParser(inline_comment_prefixes=None)
    parser.read(CONTRIB / "supervisord.conf")
    return {
        section.removeprefix("program:"): parser[section]
        for section in parser.sections()
        if section.startswith("program:")
    }


def test_supervisord_runs_every_command_with_valid_flags() -> None:
    programs = supervisord_programs()
    assert set(COMMANDS) <= set(programs)
    for program, section in programs.items():
        name, _, drain_timeout = listening_ports(section["command"])
        assert runs(program, name)
        assert section["autorestart"] == "true"
        assert section["stopsignal"] == "TERM"
        assert float(section["stopwaitsecs"]) > drain_timeout


def test_supervisord_transparent_host_side_denies_private_ranges() -> None:
    _, ctx = parse_command_line(supervisord_programs()["vsock-to-ip-transparent"]["command"])
    assert ctx.params["deny_private"]


def test_supervisord_explicit_proxy_pair() -> None:
    """The enclave's ip-to-vsock for the explicit proxy reaches the host's vsock-to-ip-proxy."""
    programs = supervisord_programs()
    _, enclave = parse_command_line(programs["ip-to-vsock-proxy"]["command"])
    _, host = parse_command_line(programs["vsock-to-ip-proxy"]["command"])
    assert str(enclave.params["ip_addr"]) == "127.0.0.1:3128"
    assert enclave.params["vsock_addr"] == host.params["vsock_addr"]
    assert host.params["deny_private"]
