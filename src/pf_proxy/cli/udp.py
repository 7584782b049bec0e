"""The two UDP commands, `udp-to-vsock` and `vsock-to-udp`: flags in, one engine call out."""

from __future__ import annotations

import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from pf_proxy import metrics, runtime
from pf_proxy.cli.options import (
    IP_LISTEN_ADDRESS,
    IP_TARGET_ADDRESS,
    VSOCK_ADDRESS,
    backlog_option,
    command,
    flow_timeouts,
    metrics_option,
    stats_interval,
    vsock_buffer,
    vsock_side,
    vsock_uds_option,
)
from pf_proxy.endpoints import IpAddress, VsockAddress
from pf_proxy.udp import engine


def _start(name: str) -> None:
    runtime.start_logging()
    metrics.describe_command(name)


def _run(main: Coroutine[Any, Any, int], metrics_address: IpAddress | None) -> None:
    sys.exit(runtime.run(main, metrics_address))


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
def udp_to_vsock(
    ip_addr: IpAddress,
    vsock_addr: VsockAddress,
    vsock_buffer_size: int,
    vsock_uds: Path | None,
    metrics_address: IpAddress | None,
    **options: Any,
) -> None:
    _start("udp-to-vsock")
    upstream = vsock_side(vsock_addr, vsock_buffer_size, vsock_uds, listening=False)
    settings = engine.Settings(**options)
    _run(engine.serve_udp_to_vsock(ip_addr, upstream, settings), metrics_address)


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
def vsock_to_udp(
    vsock_addr: VsockAddress,
    ip_addr: IpAddress,
    vsock_buffer_size: int,
    vsock_uds: Path | None,
    metrics_address: IpAddress | None,
    **options: Any,
) -> None:
    _start("vsock-to-udp")
    listen = vsock_side(vsock_addr, vsock_buffer_size, vsock_uds, listening=True)
    settings = engine.Settings(**options)
    _run(engine.serve_vsock_to_udp(listen, ip_addr, settings), metrics_address)
