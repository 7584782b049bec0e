"""The four raw-proxy commands (not implemented yet: see issue 3)."""

from __future__ import annotations

import sys

import click


def _not_yet() -> None:
    click.echo("not implemented yet", err=True)
    sys.exit(1)


ip_to_vsock_raw_incoming = ip_to_vsock_raw_outgoing = _not_yet
vsock_to_ip_raw_incoming = vsock_to_ip_raw_outgoing = _not_yet
