"""The five pf-proxy commands: flags in, one call to the engine out."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pf_proxy import metrics, runtime
from pf_proxy.cli.options import (
    CID,
    CIDR,
    HOST_PATTERN,
    IP_LISTEN_ADDRESS,
    IP_TARGET_ADDRESS,
    VSOCK_ADDRESS,
    backlog_option,
    command,
    metrics_option,
    timeouts,
    vsock_buffer,
    vsock_side,
    vsock_uds_option,
    workers_option,
)
from pf_proxy.endpoints import Endpoint, IpAddress, IpEndpoint, VsockAddress
from pf_proxy.tcp import engine, routes
from pf_proxy.tcp.access import AccessPolicy, HostPattern, IpNetwork, ResolveError

log = logging.getLogger("pf_proxy")

VSOCK_LISTEN = click.option(
    "-v",
    "--vsock-addr",
    required=True,
    type=VSOCK_ADDRESS,
    help="vsock address of the listener <cid:port>, e.g. 88:4000",
)
VSOCK_TARGET = click.option(
    "-v",
    "--vsock-addr",
    required=True,
    type=VSOCK_ADDRESS,
    help="vsock address of the upstream target <cid:port>, e.g. 88:5000",
)
IP_LISTEN = click.option(
    "-i",
    "--ip-addr",
    required=True,
    type=IP_LISTEN_ADDRESS,
    help="IP address of the listener <ip:port>, e.g. 127.0.0.1:1200 or [::1]:1200",
)


def _run(
    listen: Endpoint,
    make_route: Callable[[], routes.Route],
    forward: str,
    backward: str,
    connect_timeout: float,
    idle_timeout: float,
    drain_timeout: float,
    metrics_address: IpAddress | None,
    workers: int,
    backlog: int | None,
) -> None:
    runtime.start_logging()
    metrics.describe_command(click.get_current_context().info_name or "pf-proxy")
    settings = engine.Settings(
        forward=forward,
        backward=backward,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout or None,
        drain_timeout=drain_timeout,
        backlog=backlog,
    )
    if workers > 1:
        sys.exit(engine.serve_in_workers(listen, make_route, settings, metrics_address, workers))

    async def main() -> int:
        return await engine.serve(listen, make_route(), settings)

    sys.exit(runtime.run(main(), metrics_address))


@command("Forward connections accepted on a vsock address to a TCP/IP endpoint.")
@VSOCK_LISTEN
@click.option(
    "-i",
    "--ip-addr",
    required=True,
    type=IP_TARGET_ADDRESS,
    help="IP address of the upstream target <ip:port> (or host:port), e.g. 127.0.0.1:8080",
)
@timeouts
@vsock_buffer
@vsock_uds_option
@metrics_option
@workers_option
@backlog_option
def vsock_to_ip(
    vsock_addr: VsockAddress,
    ip_addr: IpAddress,
    vsock_buffer_size: int,
    vsock_uds: Path | None,
    **options: Any,
) -> None:
    upstream = IpEndpoint(ip_addr)
    _run(
        vsock_side(vsock_addr, vsock_buffer_size, vsock_uds, listening=True),
        lambda: routes.fixed(upstream),
        "vsock to ip",
        "ip to vsock",
        **options,
    )


@command("Forward connections accepted on a TCP/IP address to a vsock endpoint.")
@IP_LISTEN
@VSOCK_TARGET
@timeouts
@vsock_buffer
@vsock_uds_option
@metrics_option
@workers_option
@backlog_option
def ip_to_vsock(
    ip_addr: IpAddress,
    vsock_addr: VsockAddress,
    vsock_buffer_size: int,
    vsock_uds: Path | None,
    **options: Any,
) -> None:
    upstream = vsock_side(vsock_addr, vsock_buffer_size, vsock_uds, listening=False)
    _run(
        IpEndpoint(ip_addr), lambda: routes.fixed(upstream), "ip to vsock", "vsock to ip", **options
    )


@command(
    "Transparent proxy from vsock to IP: each vsock stream starts with the destination "
    "header written by ip-to-vsock-transparent; connect there and relay."
)
@click.option(
    "-v",
    "--vsock-addr",
    required=True,
    type=VSOCK_ADDRESS,
    help="vsock address of the listener, open to the transparent proxy sender "
    "<cid:port>, e.g. 3:1200",
)
@click.option(
    "--allow",
    multiple=True,
    type=CIDR,
    metavar="CIDR",
    help="Connect only to destinations in this network (repeatable; with any --allow, "
    "everything else is denied). Default: every destination is allowed.",
)
@click.option(
    "--deny",
    multiple=True,
    type=CIDR,
    metavar="CIDR",
    help="Never connect to destinations in this network (repeatable; deny wins over "
    "--allow), e.g. 169.254.0.0/16 for the instance metadata service.",
)
@click.option(
    "--deny-private",
    is_flag=True,
    help="Deny what an enclave should never reach by accident: loopback, RFC 1918, "
    "link-local (the instance metadata service), CGNAT, multicast, reserved and "
    "documentation ranges, IPv6 ULA, link-local and loopback, and the IPv4-mapped and "
    "NAT64 forms of the IPv4 ones.",
)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    type=HOST_PATTERN,
    metavar="PATTERN",
    help="Allow a stream whose TLS server_name (SNI) or HTTP Host is this name "
    "(api.example.com) or below it (*.example.com), when its destination is an address "
    "the name resolves to on this host (repeatable; with any, everything not allowed is "
    "denied). The stream's first bytes are read (up to 16 KiB, within half the connect "
    "timeout) and sent on first.",
)
@timeouts
@vsock_buffer
@vsock_uds_option
@metrics_option
@workers_option
@backlog_option
def vsock_to_ip_transparent(
    vsock_addr: VsockAddress,
    allow: tuple[IpNetwork, ...],
    deny: tuple[IpNetwork, ...],
    deny_private: bool,
    allow_hosts: tuple[HostPattern, ...],
    vsock_buffer_size: int,
    vsock_uds: Path | None,
    **options: Any,
) -> None:
    policy = AccessPolicy(allow, deny, allow_hosts, deny_private)
    # The client's first bytes, and then the name's lookup, get half the connect timeout
    # each: a client that sends nothing, or a resolver that does not answer, is denied with a
    # line that says so, before the connect timeout would close it with a vaguer one.
    name_timeout = options["connect_timeout"] / 2
    resolver = None
    if policy.needs_names:
        # Imported here: dnspython takes 0.1-0.2 s to import, which no other command needs.
        from pf_proxy.tcp.resolver import ResolverCache

        try:
            resolver = ResolverCache.from_system(name_timeout)
        except ResolveError as exc:
            raise click.ClickException(f"--allow-host needs a resolver: {exc}") from None

    def make_route() -> routes.Route:
        log.info("Destinations: %s", policy.describe())
        if resolver is None:
            return routes.from_destination_header(policy)
        log.info("Names resolved with: %s", ", ".join(resolver.nameservers))
        return routes.from_destination_header(policy, resolver.addresses, name_timeout)

    listen = vsock_side(vsock_addr, vsock_buffer_size, vsock_uds, listening=True)
    _run(listen, make_route, "vsock to ip", "ip to vsock", **options)


@command(
    "Transparent proxy from IP to vsock: read each connection's original destination "
    "(SO_ORIGINAL_DST, after iptables REDIRECT/DNAT), send it as the destination header, "
    "then relay."
)
@IP_LISTEN
@click.option(
    "-v",
    "--vsock-addr",
    required=True,
    type=VSOCK_ADDRESS,
    help="vsock address of the upstream transparent proxy receiver <cid:port>, e.g. 3:1200",
)
@timeouts
@vsock_buffer
@vsock_uds_option
@metrics_option
@workers_option
@backlog_option
def ip_to_vsock_transparent(
    ip_addr: IpAddress,
    vsock_addr: VsockAddress,
    vsock_buffer_size: int,
    vsock_uds: Path | None,
    **options: Any,
) -> None:
    upstream = vsock_side(vsock_addr, vsock_buffer_size, vsock_uds, listening=False)
    _run(
        IpEndpoint(ip_addr),
        lambda: routes.with_destination_header(upstream),
        "ip to vsock",
        "vsock to ip",
        **options,
    )


@command(
    "Transparent proxy to vsock by port: connect each redirected connection to vsock "
    "CID:<original destination port>."
)
@IP_LISTEN
@click.option(
    "-v",
    "--vsock",
    "cid",
    required=True,
    type=CID,
    help="CID of the upstream vsock side (the port is the original one), e.g. 88",
)
@timeouts
@vsock_buffer
@vsock_uds_option
@metrics_option
@workers_option
@backlog_option
def transparent_port_to_vsock(
    ip_addr: IpAddress, cid: int, vsock_buffer_size: int, vsock_uds: Path | None, **options: Any
) -> None:
    template = vsock_side(
        VsockAddress(cid, 0), vsock_buffer_size, vsock_uds, listening=False, param="cid"
    )
    _run(
        IpEndpoint(ip_addr),
        lambda: routes.to_original_port(template),
        "port to vsock",
        "vsock to port",
        **options,
    )
