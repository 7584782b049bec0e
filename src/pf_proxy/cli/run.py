"""`pf-proxy`: every proxy of a file in one process (`run`), a file checked (`check`), and the
firewall commands a side of a described enclave needs (`rules`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from pf_proxy import __version__
from pf_proxy.cli.options import CONTEXT_SETTINGS

log = logging.getLogger("pf_proxy")

FILE = click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
SIDE_HELP = (
    "For a file that describes an enclave's network: serve this side's half (the enclave's "
    "proxies, or the parent instance's)."
)


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="pf-proxy")
def pf_proxy() -> None:
    """Serve many proxies, of any of the eleven kinds, in one process, from one TOML file.

    A proxy in the file is a table [proxy.NAME] with `kind` (a command's name) and that
    command's long flags as keys. The file may also describe an enclave's network once
    (ingress, egress, dns, raw), for both sides: see --side.
    """


def _load(file: Path, side: str | None) -> object:
    from pf_proxy import config

    try:
        return config.load(file, side)
    except config.ConfigErrors as exc:
        for error in exc.errors:
            click.echo(error.format(exc.path), err=True)
        count = len(exc.errors)
        click.echo(f"{file}: {count} error{'s' if count != 1 else ''}", err=True)
        sys.exit(2)


@pf_proxy.command(context_settings=CONTEXT_SETTINGS)
@FILE
@click.option("--side", type=click.Choice(["enclave", "parent"]), help=SIDE_HELP)
def run(file: Path, side: str | None) -> None:
    """Run every proxy FILE declares, in this process, until SIGTERM or SIGINT.

    One READY=1 (systemd) once every proxy listens; one SIGTERM drains them all. SIGHUP reads
    FILE again: added proxies start, removed ones drain, changed ones are restarted the same
    way (a TCP proxy keeping its address hands its listening socket over), unchanged ones are
    left alone; a file with errors changes nothing (the log says why).
    """
    from pf_proxy import config, kinds, runner, runtime

    loaded = _load(file, side)
    assert isinstance(loaded, config.RunFile)
    runtime.start_logging()
    log.info(
        "Serving %d proxies from %s%s",
        len(loaded.specs),
        file,
        f" (the {side} side)" if side else "",
    )

    def reload() -> list[runner.Spec] | None:
        try:
            again = config.load(file, side)
        except config.ConfigErrors as exc:
            for error in exc.errors:
                log.error("Reload: %s", error.format(exc.path))
            log.error("Reload: %s has errors: nothing changed", file)
            return None
        if again.metrics != loaded.metrics:
            log.warning("Reload: the metrics address changes only with a restart")
        return again.specs

    sys.exit(runner.run(loaded.specs, kinds.plan, loaded.metrics, reload))


@pf_proxy.command(context_settings=CONTEXT_SETTINGS)
@FILE
@click.option("--side", type=click.Choice(["enclave", "parent"]), help=SIDE_HELP)
def check(file: Path, side: str | None) -> None:
    """Check FILE without binding anything: print what would run (exit 0), or every error
    as FILE:LINE: key: what is wrong (exit 2)."""
    from pf_proxy import config

    loaded = _load(file, side)
    assert isinstance(loaded, config.RunFile)
    if loaded.metrics is not None:
        click.echo(f"metrics: http://{loaded.metrics}/metrics")
    for line in config.describe_specs(loaded.specs):
        click.echo(line)
    count = len(loaded.specs)
    click.echo(f"{file}: {count} prox{'ies' if count != 1 else 'y'}, no errors")


@pf_proxy.command(context_settings=CONTEXT_SETTINGS)
@FILE
@click.option(
    "--side",
    type=click.Choice(["enclave", "parent"]),
    required=True,
    help="The side whose commands to print.",
)
def rules(file: Path, side: str) -> None:
    """Print the shell commands (ip, ipset, iptables) that SIDE of the enclave FILE describes
    needs before its proxies run, for the image's or the instance's set-up script."""
    from pf_proxy import config

    loaded = _load(file, side)
    assert isinstance(loaded, config.RunFile)
    click.echo(f"# {side} side of {file}: run as root before `pf-proxy run {file} --side {side}`")
    for line in loaded.rules:
        click.echo(line)
