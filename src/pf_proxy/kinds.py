"""The kinds of proxy (the eleven commands and vsock-to-ip-proxy): for each, the click command
that defines its options (for flags and files alike) and the plan function that turns a spec
into something to run.

A kind's module is imported only when a spec of that kind is checked or run, so a process
pays in memory only for the planes it serves.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import click

    from pf_proxy.runner import Plan, Spec


@dataclass(frozen=True)
class Kind:
    name: str  # the command's name
    module: str  # where its command and its plan function are
    plane: str  # tcp, udp or raw
    listens: str  # what its listener is: tcp, udp, vsock (stream) or nfqueue
    listen_option: str  # the parameter naming it
    vsock_option: str = "vsock_addr"  # the parameter naming its vsock side

    @property
    def listens_on_vsock(self) -> bool:
        return self.listens == "vsock"

    @property
    def _function(self) -> str:
        return self.name.replace("-", "_")

    def command(self) -> click.Command:
        command: click.Command = getattr(importlib.import_module(self.module), self._function)
        return command

    def plan(self, spec: Spec) -> Plan:
        build = getattr(importlib.import_module(self.module), f"plan_{self._function}")
        plan: Plan = build(spec.options)
        return plan


_TCP, _UDP, _RAW = "pf_proxy.cli.tcp", "pf_proxy.cli.udp", "pf_proxy.cli.raw"
KINDS = {
    kind.name: kind
    for kind in (
        Kind("vsock-to-ip", _TCP, "tcp", "vsock", "vsock_addr"),
        Kind("ip-to-vsock", _TCP, "tcp", "tcp", "ip_addr"),
        Kind("vsock-to-ip-transparent", _TCP, "tcp", "vsock", "vsock_addr"),
        Kind("ip-to-vsock-transparent", _TCP, "tcp", "tcp", "ip_addr"),
        Kind("transparent-port-to-vsock", _TCP, "tcp", "tcp", "ip_addr", "cid"),
        Kind("vsock-to-ip-proxy", _TCP, "tcp", "vsock", "vsock_addr"),
        Kind("ip-to-vsock-raw-incoming", _RAW, "raw", "nfqueue", "queue_num"),
        Kind("ip-to-vsock-raw-outgoing", _RAW, "raw", "nfqueue", "queue_num"),
        Kind("vsock-to-ip-raw-incoming", _RAW, "raw", "vsock", "vsock_addr"),
        Kind("vsock-to-ip-raw-outgoing", _RAW, "raw", "vsock", "vsock_addr"),
        Kind("udp-to-vsock", _UDP, "udp", "udp", "ip_addr"),
        Kind("vsock-to-udp", _UDP, "udp", "vsock", "vsock_addr"),
    )
}


def plan(spec: Spec) -> Plan:
    return KINDS[spec.kind].plan(spec)


def listen_key(spec: Spec) -> tuple[str, str]:
    """What `spec` listens on, as (transport, address): two proxies with equal keys, or with
    the same port where one address is a wildcard, cannot both listen."""
    kind = KINDS[spec.kind]
    return kind.listens, str(spec.options[kind.listen_option])


def hands_over(old: Spec, new: Spec) -> bool:
    """Whether a reload can give `old`'s listening socket to `new`: two TCP-plane proxies
    listening at the same address the same way (a stream listener can be shared for a moment;
    a datagram socket or a raw proxy's queue cannot)."""
    return (
        KINDS[old.kind].plane == KINDS[new.kind].plane == "tcp"
        and listen_key(old) == listen_key(new)
        and old.options.get("vsock_buffer_size") == new.options.get("vsock_buffer_size")
    )
