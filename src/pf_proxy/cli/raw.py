"""The four raw-proxy commands: flags in, one forwarder of :mod:`pf_proxy.raw.forward` out."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from pf_proxy import metrics, runtime
from pf_proxy.cli.options import (
    VSOCK_ADDRESS,
    F,
    Seconds,
    WholeNumber,
    command,
    metrics_option,
    stats_interval_counting,
    vsock_buffer,
    vsock_side,
    vsock_uds_option,
)
from pf_proxy.endpoints import IpAddress, VsockAddress
from pf_proxy.raw import forward
from pf_proxy.raw import metrics as raw_metrics
from pf_proxy.raw.addresses import (
    AddressLookupError,
    find_outgoing_interface,
    interface_address,
    read_enclave_address,
)
from pf_proxy.raw.policy import IncomingPolicy, OutgoingPolicy

log = logging.getLogger("pf_proxy")

DEFAULT_IP_FILE = Path("/app/ip.txt")

VSOCK_TARGET = click.option(
    "-v",
    "--vsock-addr",
    required=True,
    type=VSOCK_ADDRESS,
    help="vsock address to forward packets to <cid:port>",
)
VSOCK_LISTEN = click.option(
    "-v",
    "--vsock-addr",
    required=True,
    type=VSOCK_ADDRESS,
    help="vsock address to listen on <cid:port>",
)
QUEUE_NUM = click.option(
    "-q",
    "--queue-num",
    required=True,
    type=WholeNumber(0, 0xFFFF, metavar="NUM"),
    metavar="NUM",
    help="nfqueue number of the listener <num>",
)


def _service_options(func: F) -> F:
    """--stats-interval, --drain-timeout, --vsock-buffer-size, --vsock-uds and --metrics
    (additions with faithful defaults)."""
    func = metrics_option(func)
    func = vsock_uds_option(func)
    func = vsock_buffer(func)
    func = click.option(
        "--drain-timeout",
        type=Seconds(zero=True),
        default=5.0,
        show_default=True,
        metavar="SECONDS",
        help="On SIGTERM/SIGINT, let the packets in hand go out for up to this long.",
    )(func)
    return stats_interval_counting("forwarded and dropped")(func)


def _queue_to_vsock(
    name: str,
    vsock_addr: VsockAddress,
    queue_num: int,
    stats_interval: float,
    drain_timeout: float,
    vsock_buffer_size: int,
    vsock_uds: Path | None,
    metrics_address: IpAddress | None,
) -> None:
    runtime.start_logging()
    link = vsock_side(vsock_addr, vsock_buffer_size, vsock_uds, listening=False)

    async def main() -> int:
        forwarder = forward.QueueToVsock(queue_num, link)
        log.info("Proxying to: %s", forwarder.endpoint)
        return await _serve(forwarder, name, stats_interval, drain_timeout)

    sys.exit(runtime.run(main(), metrics_address))


async def _serve(
    forwarder: forward.QueueToVsock | forward.VsockToDevice,
    name: str,
    stats_interval: float,
    drain_timeout: float,
) -> int:
    metrics.describe_command(name)
    metrics.register(raw_metrics.source(forwarder))
    return await forward.serve(forwarder, name, stats_interval, drain_timeout)


@command(
    "Forward the packets iptables sends to an nfqueue (the host's incoming traffic) to the "
    "enclave over vsock, then drop them from the host's stack."
)
@VSOCK_TARGET
@QUEUE_NUM
@_service_options
def ip_to_vsock_raw_incoming(vsock_addr: VsockAddress, queue_num: int, **service: Any) -> None:
    _queue_to_vsock("ip-to-vsock-raw-incoming", vsock_addr, queue_num, **service)


@command(
    "Forward the packets iptables sends to an nfqueue (the enclave's outgoing traffic) to the "
    "host over vsock, then drop them from the enclave's stack."
)
@VSOCK_TARGET
@QUEUE_NUM
@_service_options
def ip_to_vsock_raw_outgoing(vsock_addr: VsockAddress, queue_num: int, **service: Any) -> None:
    _queue_to_vsock("ip-to-vsock-raw-outgoing", vsock_addr, queue_num, **service)


def _vsock_to_device(
    name: str,
    vsock_addr: VsockAddress,
    device: str,
    policy: IncomingPolicy | OutgoingPolicy,
    stats_interval: float,
    drain_timeout: float,
    vsock_buffer_size: int,
    vsock_uds: Path | None,
    metrics_address: IpAddress | None,
) -> None:
    listen = vsock_side(vsock_addr, vsock_buffer_size, vsock_uds, listening=True)

    async def main() -> int:
        forwarder = forward.VsockToDevice(listen, device, policy.check)
        log.info("Proxying to: device %s", device)
        return await _serve(forwarder, name, stats_interval, drain_timeout)

    sys.exit(runtime.run(main(), metrics_address))


def _fail(exc: Exception) -> NoReturn:
    log.error("%s", exc)
    sys.exit(1)


@command(
    "Write the packets arriving on a vsock listener (the host's incoming traffic) into the "
    "enclave's stack through a raw socket on a device; only packets addressed to the "
    "enclave pass."
)
@VSOCK_LISTEN
@click.option(
    "-d", "--device", required=True, help="network device to forward packets on", metavar="DEVICE"
)
@click.option(
    "--ip-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_IP_FILE,
    show_default=True,
    help="File holding the enclave's IPv4 address; only packets to it are forwarded.",
)
@_service_options
def vsock_to_ip_raw_incoming(
    vsock_addr: VsockAddress, device: str, ip_file: Path, **service: Any
) -> None:
    runtime.start_logging()
    try:
        enclave_address = read_enclave_address(ip_file)
    except AddressLookupError as exc:
        _fail(exc)
    log.info("Enclave address: %s (from %s)", enclave_address, ip_file)
    _vsock_to_device(
        "vsock-to-ip-raw-incoming", vsock_addr, device, IncomingPolicy(enclave_address), **service
    )


@command(
    "Send the packets arriving on a vsock listener (the enclave's outgoing traffic) out of the "
    "host's interface through a raw socket; only TCP from the interface's address and allowed "
    "ports, to addresses outside the reserved ranges, passes."
)
@VSOCK_LISTEN
@click.option(
    "--device",
    default=None,
    metavar="DEVICE",
    help="Interface to send on (its first IPv4 address is the only allowed source). "
    "[default: the first eth*/ens* interface with an IPv4 address]",
)
@_service_options
def vsock_to_ip_raw_outgoing(vsock_addr: VsockAddress, device: str | None, **service: Any) -> None:
    runtime.start_logging()
    try:
        if device is None:
            device, address = find_outgoing_interface()
        else:
            address = interface_address(device)
    except AddressLookupError as exc:
        _fail(exc)
    log.info("Interface: %s, address %s", device, address)
    _vsock_to_device(
        "vsock-to-ip-raw-outgoing", vsock_addr, device, OutgoingPolicy(address), **service
    )
