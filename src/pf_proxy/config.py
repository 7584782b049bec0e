"""`pf-proxy run` files: TOML in, validated proxy specs out (pure: no socket, no lookup).

    metrics = "127.0.0.1:9100"        # optional: /metrics and /healthz for the whole process

    [proxy.web]                       # a proxy named "web"
    kind = "ip-to-vsock"              # one of the eleven commands
    ip-addr = "0.0.0.0:8080"          # that command's long flags, without the dashes
    vsock-addr = "88:5000"

A proxy table takes exactly its command's long flags as keys, with their validation and
defaults: the keys are derived from the click command (`option_keys`), so the file and the
flags cannot drift apart. A file may also describe an enclave's network for both sides at once
(`describe`); `pf-proxy run FILE --side enclave|parent` then serves that side's half.

Every error is collected (not only the first) as `FILE:LINE: key: what is wrong`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from pf_proxy.kinds import KINDS, listen_key
from pf_proxy.runner import Spec

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SIDES = ("enclave", "parent")
DESCRIPTION_TABLES = ("enclave", "parent", "ingress", "egress", "dns", "raw")
TOP_LEVEL = ("metrics", "proxy", *DESCRIPTION_TABLES)
PROXY_ONLY_KEYS = ("kind", "side")
PROCESS_KEYS = {"metrics": "metrics_address"}  # a proxy's flag that is the process's in a file


@dataclass(frozen=True)
class ConfigError:
    line: int | None
    key: str
    message: str

    def format(self, path: str) -> str:
        return f"{path}:{self.line if self.line is not None else '?'}: {self.key}: {self.message}"


class ConfigErrors(Exception):
    def __init__(self, path: str, errors: list[ConfigError]) -> None:
        self.path = path
        self.errors = errors
        super().__init__("\n".join(error.format(path) for error in errors))


@dataclass
class RunFile:
    """What a file says to run (for one side, if it describes both)."""

    specs: list[Spec]
    metrics: Any = None  # an endpoints.IpAddress
    rules: list[str] = field(default_factory=list)  # the side's firewall set-up (describe)


# --- keys and lines ---------------------------------------------------------------------------


def option_keys(command: click.Command) -> dict[str, click.Option]:
    """A command's options by file key: each long flag without its dashes (the parameter
    `metrics_address` of `--metrics` is the key `metrics`). -h/-V are not options."""
    keys: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.expose_value:
            long = next(opt for opt in param.opts if opt.startswith("--"))
            keys[long[2:]] = param
    return keys


_HEADER = re.compile(r"\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")
_KEY = re.compile(r"\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*=")


class Lines:
    """Where each table and key of a TOML text is (the standard library's parser keeps no
    positions). Tables as written with headers, keys one per line: what these files use."""

    def __init__(self, text: str) -> None:
        self.where: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        arrays: dict[tuple[str, ...], int] = {}
        for number, line in enumerate(text.splitlines(), 1):
            header = _HEADER.match(line)
            if header and not line.lstrip().startswith("#"):
                table = tuple(_unquote(part) for part in _split_dotted(header.group(2)))
                if header.group(1) == "[[":
                    index = arrays.get(table, -1) + 1
                    arrays[table] = index
                    table = (*table, str(index))
                self.where.setdefault(table, number)
                continue
            key = _KEY.match(line)
            if key:
                self.where.setdefault((*table, _unquote(key.group(1))), number)

    def line(self, *path: str) -> int | None:
        """The line of the key or table at `path`, else of the nearest table around it."""
        while path:
            if path in self.where:
                return self.where[path]
            path = path[:-1]
        return None


def _split_dotted(text: str) -> list[str]:
    return re.findall(r"\"[^\"]*\"|'[^']*'|[^.\s]+", text)


def _unquote(text: str) -> str:
    return text[1:-1] if text[:1] in "\"'" and text[-1:] == text[:1] else text


# --- values -----------------------------------------------------------------------------------

_NUMBER_TYPES = (click.types.IntParamType, click.types.FloatParamType)


def _toml_type_error(param: click.Option, value: Any) -> str | None:
    """Why a TOML value cannot be this option's, or None (click then checks the value)."""
    if param.multiple:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, str):
                return f"expected a string or a list of strings, got {_toml_name(item)}"
        return None
    if param.is_flag:
        return (
            None if isinstance(value, bool) else f"expected true or false, got {_toml_name(value)}"
        )
    if isinstance(param.type, _NUMBER_TYPES):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {_toml_name(value)}"
        return None
    if not isinstance(value, str):
        return f"expected a string, got {_toml_name(value)}"
    return None


def _toml_name(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


def convert_options(
    kind: str,
    values: Mapping[str, Any],
    where: Callable[[str], int | None],
    shown: Callable[[str], str],
) -> tuple[dict[str, Any], list[ConfigError]]:
    """A proxy's options from its table's `values` (file keys), through its command's own
    types: every option, given or defaulted, by parameter name; and what was wrong (`where`
    a key is, and how to name it, say the caller)."""
    command = KINDS[kind].command()
    keys = option_keys(command)
    context = click.Context(command)
    options: dict[str, Any] = {}
    errors: list[ConfigError] = []
    for key, value in values.items():
        if key in PROXY_ONLY_KEYS:
            continue
        param = keys.get(key)
        if param is None:
            known = ", ".join(sorted(keys))
            errors.append(
                ConfigError(
                    where(key), shown(key), f"not an option of {kind} (its options: {known})"
                )
            )
            continue
        problem = _toml_type_error(param, value)
        if problem is None:
            if param.multiple and not isinstance(value, list):
                value = [value]
            try:
                options[param.name or key] = param.process_value(context, value)
            except click.BadParameter as exc:
                problem = exc.message
            except click.UsageError as exc:
                problem = exc.message
        if problem is not None:
            errors.append(ConfigError(where(key), shown(key), problem))
    if not errors:
        errors += _vsock_side_errors(kind, options, keys, where, shown)
    for key, param in keys.items():
        name = param.name or key
        if name in options or key in values:
            continue
        if param.required:
            errors.append(ConfigError(where(""), shown(key), f"missing: {kind} needs it"))
            continue
        default = param.get_default(context)
        options[name] = param.process_value(context, default)
    return options, errors


def _vsock_side_errors(
    kind: str,
    options: dict[str, Any],
    keys: dict[str, click.Option],
    where: Callable[[str], int | None],
    shown: Callable[[str], str],
) -> list[ConfigError]:
    """What the command would refuse about its vsock side as a whole (a CID hybrid vsock
    cannot use, a socket path too long): the options together, not one by one."""
    from pf_proxy.cli.options import VsockSideError, vsock_side_endpoint
    from pf_proxy.endpoints import VsockAddress

    about = KINDS[kind]
    address = options.get(about.vsock_option)
    if address is None or options.get("vsock_uds") is None:
        return []  # a vsock address alone was checked as its flag checks it
    if about.vsock_option == "cid":
        address = VsockAddress(address, 0)
    try:
        vsock_side_endpoint(
            address,
            options.get("vsock_buffer_size", 0),
            options.get("vsock_uds"),
            listening=about.listens_on_vsock,
            param=about.vsock_option,
        )
    except VsockSideError as exc:
        key = next((k for k, p in keys.items() if p.name == exc.param), exc.param)
        return [ConfigError(where(key), shown(key), str(exc))]
    return []


# --- the file ---------------------------------------------------------------------------------


def load(path: Path, side: str | None = None) -> RunFile:
    """Read and check a run file; `ConfigErrors` lists everything wrong, each with its line."""
    shown = str(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigErrors(shown, [ConfigError(None, "(file)", f"cannot be read: {why}")]) from None
    return parse(text, shown, side)


_POSITION = re.compile(r"\s*\(at line (\d+), column \d+\)$")
_DECLARED_TWICE = re.compile(r"Cannot declare \((.*)\) twice")


def parse(text: str, path: str, side: str | None = None) -> RunFile:
    """Check a run file's `text` (named `path` in errors)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigErrors(path, [_syntax_error(str(exc))]) from None
    lines = Lines(text)
    errors: list[ConfigError] = []
    for key in data:
        if key not in TOP_LEVEL:
            errors.append(
                ConfigError(
                    lines.line(key),
                    key,
                    "not a known key or table (known: " + ", ".join(TOP_LEVEL) + ")",
                )
            )
    described = any(key in data for key in DESCRIPTION_TABLES)
    if side is not None and side not in SIDES:
        errors.append(ConfigError(None, "--side", f"must be one of {', '.join(SIDES)}"))
    elif described and side is None:
        errors.append(
            ConfigError(
                lines.line("enclave") or lines.line("ingress"),
                "(file)",
                "it describes both sides of an enclave: run it with --side "
                "enclave or --side parent",
            )
        )
    metrics = _metrics(data, lines, errors)
    specs: list[Spec] = []
    rules: list[str] = []
    listen_lines: dict[str, int | None] = {}  # a described proxy's listener: where it comes from
    proxies = data.get("proxy", {})
    if not isinstance(proxies, dict):
        errors.append(ConfigError(lines.line("proxy"), "proxy", "must be a table of proxies"))
        proxies = {}
    for name, table in proxies.items():
        spec = _proxy(name, table, lines, errors, side)
        if spec is not None:
            specs.append(spec)
    if described and side in SIDES:
        from pf_proxy import describe

        expanded = describe.expand(data, side, lines)
        errors += expanded.errors
        for generated in expanded.proxies:
            options, problems = convert_options(
                generated.kind, generated.values, generated.line, generated.shown
            )
            errors += problems
            if not problems:
                specs.append(Spec(generated.name, generated.kind, options))
                listen_option = option_key(generated.kind, KINDS[generated.kind].listen_option)
                listen_lines[generated.name] = generated.line(listen_option)
        rules = expanded.rules
    for spec in specs:
        given = spec.options.get("metrics_address")
        if given is not None and metrics is not None and given != metrics:
            errors.append(
                ConfigError(
                    lines.line("proxy", spec.name, "metrics"),
                    f"proxy.{spec.name}.metrics",
                    f"{given} differs from the process's metrics address "
                    f"{metrics}: the process serves one /metrics",
                )
            )
        elif given is not None:
            metrics = given
    errors += _collisions(specs, metrics, lines, listen_lines)
    if not specs and not errors:
        for_side = f" for the {side} side" if side else ""
        errors.append(
            ConfigError(
                None,
                "(file)",
                f"no proxies to run{for_side}: declare "
                "[proxy.NAME] tables, or describe the enclave's network",
            )
        )
    # One wrong value of a description can be wrong in both proxies made from it: say it once.
    errors = list({(error.line, error.key): error for error in reversed(errors)}.values())[::-1]
    errors.sort(key=lambda error: (error.line is None, error.line or 0))
    if errors:
        raise ConfigErrors(path, errors)
    return RunFile(specs, metrics, rules)


def _syntax_error(message: str) -> ConfigError:
    position = _POSITION.search(message)
    line = int(position.group(1)) if position else None
    message = _POSITION.sub("", message)
    twice = _DECLARED_TWICE.search(message)
    if twice:
        key = ".".join(part.strip().strip("'\"") for part in twice.group(1).split(","))
        return ConfigError(line, key, "declared twice (a proxy name must be unique)")
    return ConfigError(line, "(syntax)", f"not valid TOML: {message}")


def _metrics(data: dict[str, Any], lines: Lines, errors: list[ConfigError]) -> Any:
    if "metrics" not in data:
        return None
    from pf_proxy.cli.options import IP_LISTEN_ADDRESS

    value = data["metrics"]
    if not isinstance(value, str):
        errors.append(
            ConfigError(
                lines.line("metrics"),
                "metrics",
                f"expected a string IP:PORT, got {_toml_name(value)}",
            )
        )
        return None
    try:
        return IP_LISTEN_ADDRESS.convert(value, None, None)
    except click.BadParameter as exc:
        errors.append(ConfigError(lines.line("metrics"), "metrics", exc.message))
        return None


def _proxy(
    name: str, table: Any, lines: Lines, errors: list[ConfigError], side: str | None
) -> Spec | None:
    where = f"proxy.{name}"
    if not NAME.fullmatch(name):
        errors.append(
            ConfigError(
                lines.line("proxy", name),
                where,
                "a proxy name is 1-64 "
                "letters, digits, '_', '.' or '-', starting with a letter "
                "or digit",
            )
        )
        return None
    if not isinstance(table, dict):
        errors.append(ConfigError(lines.line("proxy", name), where, "must be a table"))
        return None
    kind = table.get("kind")
    if kind is None:
        errors.append(
            ConfigError(
                lines.line("proxy", name), f"{where}.kind", "missing: every proxy needs a kind"
            )
        )
        return None
    if kind not in KINDS:
        errors.append(
            ConfigError(
                lines.line("proxy", name, "kind"),
                f"{where}.kind",
                f"unknown kind {kind!r} (one of: {', '.join(KINDS)})",
            )
        )
        return None
    proxy_side = table.get("side")
    if proxy_side is not None and proxy_side not in SIDES:
        errors.append(
            ConfigError(
                lines.line("proxy", name, "side"),
                f"{where}.side",
                f"must be one of {', '.join(SIDES)}",
            )
        )
    options, problems = convert_options(
        kind, table, lambda key: lines.line("proxy", name, key), lambda key: f"{where}.{key}"
    )
    errors += problems
    if problems or (proxy_side is not None and side is not None and proxy_side != side):
        return None  # wrong (said), or the other side's
    return Spec(name, kind, options)


def option_key(kind: str, name: str) -> str:
    """The file key of `kind`'s parameter `name` (vsock_addr: vsock-addr)."""
    keys = option_keys(KINDS[kind].command())
    return next(key for key, param in keys.items() if param.name == name)


def _collisions(
    specs: list[Spec], metrics: Any, lines: Lines, listen_lines: dict[str, int | None]
) -> list[ConfigError]:
    """Two listeners where only one can listen: the same transport and port, at the same
    address or where either is a wildcard (0.0.0.0, ::, CID -1)."""
    errors = []
    seen: list[tuple[tuple[str, str, str], str]] = []
    keyed = [(listen_key(spec), spec.name) for spec in specs]
    if metrics is not None:
        keyed.append((("tcp", str(metrics)), "(metrics)"))
    for (transport, address), name in keyed:
        host, port = _split(address)
        for (other_transport, other_host, other_port), other in seen:
            if (transport, port) == (other_transport, other_port) and (
                host == other_host or _wildcard(host) or _wildcard(other_host)
            ):
                what = "the metrics listener" if other == "(metrics)" else f"proxy {other!r}"
                where = "metrics" if name == "(metrics)" else f"proxy.{name}"
                line = listen_lines.get(name) or lines.line(*where.split("."))
                errors.append(
                    ConfigError(
                        line,
                        where,
                        f"listens on {transport} {address}, as {what} does: only one can",
                    )
                )
        seen.append(((transport, host, port), name))
    return errors


def _split(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    return (host.strip("[]"), port) if host else (address, "")


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "4294967295")


def describe_specs(specs: Iterable[Spec]) -> list[str]:
    """One line per proxy, for `pf-proxy check`: its name, kind and options as flags."""
    lines = []
    for spec in specs:
        keys = option_keys(KINDS[spec.kind].command())
        flags = []
        for key, param in keys.items():
            value = spec.options.get(param.name or key)
            default = param.get_default(click.Context(KINDS[spec.kind].command()))
            if value in (None, (), False) or (value == default and not param.required):
                continue
            if param.is_flag:
                flags.append(f"--{key}")
            elif param.multiple:
                flags += [f"--{key} {item}" for item in value]
            else:
                flags.append(f"--{key} {value}")
        lines.append(f"{spec.name}: {spec.kind} {' '.join(flags)}".rstrip())
    return lines
