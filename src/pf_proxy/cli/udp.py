"""The two UDP commands, `udp-to-vsock` and `vsock-to-udp`: flags in, one engine call out."""

from __future__ import annotations

from typing import Any

import click

from pf_proxy.cli.options import (
    IP_LISTEN_ADDRESS,
    IP_TARGET_ADDRESS,
    VSOCK_ADDRESS,
    backlog_option,
    command,
    flow_timeouts,
    metrics_option,
    run_command,
    stats_interval,
    vsock_buffer,
    vsock_side,
    vsock_uds_option,
)
from pf_proxy.udp.engine import Settings, UdpToVsockPlan, VsockToUdpPlan

Options = dict[str, Any]
_SETTINGS = ("connect_timeout", "idle_timeout", "drain_timeout", "stats_interval", "backlog")


def _settings(options: Options) -> Settings:
    return Settings(**{name: options[name] for name in _SETTINGS if name in options})


@command(
    "Forward UDP datagrams received on an IP address to a vsock endpoint: each client (source "
    "address and port) gets its own vsock stream, each datagram a 2-byte length in front (as "
    "DNS over TCP); datagrams coming back are sent to the client."
)
@click.option(
    "-i",
    "--ip-addr",
    required=True,
    type=IP_LISTEN_ADDRESS,
    help="UDP address to listen on <ip:port>, e.g. 127.0.0.1:53 or [::1]:53",
)
@click.option(
    "-v",
    "--vsock-addr",
    required=True,
    type=VSOCK_ADDRESS,
    help="vsock address of the upstream vsock-to-udp <cid:port>, e.g. 3:53",
)
@flow_timeouts
@stats_interval
@vsock_buffer
@vsock_uds_option
@metrics_option
def udp_to_vsock(**options: Any) -> None:
    run_command("udp-to-vsock", options)


def plan_udp_to_vsock(options: Options) -> UdpToVsockPlan:
    upstream = vsock_side(
        options["vsock_addr"], options["vsock_buffer_size"], options["vsock_uds"], listening=False
    )
    return UdpToVsockPlan(options["ip_addr"], upstream, _settings(options))


@command(
    "Forward datagrams from vsock streams to a UDP endpoint: each accepted stream (2-byte "
    "length, then a datagram, as DNS over TCP) gets its own UDP socket connected to the "
    "upstream; replies come back framed."
)
@click.option(
    "-v",
    "--vsock-addr",
    required=True,
    type=VSOCK_ADDRESS,
    help="vsock address to listen on <cid:port>, e.g. 3:53",
)
@click.option(
    "-i",
    "--ip-addr",
    required=True,
    type=IP_TARGET_ADDRESS,
    help="UDP address of the upstream <ip:port> (or host:port, resolved for each new stream), "
    "e.g. 169.254.169.253:53",
)
@flow_timeouts
@stats_interval
@vsock_buffer
@vsock_uds_option
@metrics_option
@backlog_option
def vsock_to_udp(**options: Any) -> None:
    run_command("vsock-to-udp", options)


def plan_vsock_to_udp(options: Options) -> VsockToUdpPlan:
    listen = vsock_side(
        options["vsock_addr"], options["vsock_buffer_size"], options["vsock_uds"], listening=True
    )
    return VsockToUdpPlan(listen, options["ip_addr"], _settings(options))
