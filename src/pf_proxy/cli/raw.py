"""The four raw-proxy commands: flags in, one forwarder of :mod:`pf_proxy.raw.forward` out."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from pf_proxy import metrics
from pf_proxy.cli.options import (
    VSOCK_ADDRESS,
    F,
    Seconds,
    WholeNumber,
    command,
    metrics_option,
    run_command,
    stats_interval_counting,
    vsock_buffer,
    vsock_side,
    vsock_uds_option,
)
from pf_proxy.runner import PlanError
from pf_proxy.runtime import Ready, Stop

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


Options = dict[str, Any]


@dataclass
class _RawPlan:
    """A raw proxy to run (see :mod:`pf_proxy.runner`): its forwarder opens its own queue or
    listener, retrying with backoff as the originals do, so nothing is bound beforehand."""

    name: str  # the command's, for the counters' lines
    make_forwarder: Callable[[Ready], Any]  # a forward.QueueToVsock or forward.VsockToDevice
    proxying_to: str
    stats_interval: float
    drain_timeout: float

    def bind(self, count: int) -> list[socket.socket]:
        return []

    async def serve(self, sock: socket.socket | None, stop: Stop, ready: Ready) -> int:
        from pf_proxy.raw import forward
        from pf_proxy.raw import metrics as raw_metrics

        forwarder = self.make_forwarder(ready)
        log.info("Proxying to: %s", self.proxying_to)
        unregister = metrics.register(raw_metrics.source(forwarder))
        try:
            return await forward.serve(
                forwarder, self.name, self.stats_interval, self.drain_timeout, stop
            )
        finally:
            unregister()


def _queue_to_vsock(name: str, options: Options) -> _RawPlan:
    from pf_proxy.raw import forward

    link = vsock_side(
        options["vsock_addr"], options["vsock_buffer_size"], options["vsock_uds"], listening=False
    )
    queue_num = options["queue_num"]
    return _RawPlan(
        name,
        lambda ready: forward.QueueToVsock(queue_num, link, ready),
        str(link),
        options["stats_interval"],
        options["drain_timeout"],
    )


def _vsock_to_device(name: str, options: Options, device: str, policy: Any) -> _RawPlan:
    from pf_proxy.raw import forward

    listen = vsock_side(
        options["vsock_addr"], options["vsock_buffer_size"], options["vsock_uds"], listening=True
    )
    return _RawPlan(
        name,
        lambda ready: forward.VsockToDevice(listen, device, policy.check, ready),
        f"device {device}",
        options["stats_interval"],
        options["drain_timeout"],
    )


@command(
    "Forward the packets iptables sends to an nfqueue (the host's incoming traffic) to the "
    "enclave over vsock, then drop them from the host's stack."
)
@VSOCK_TARGET
@QUEUE_NUM
@_service_options
def ip_to_vsock_raw_incoming(**options: Any) -> None:
    run_command("ip-to-vsock-raw-incoming", options)


def plan_ip_to_vsock_raw_incoming(options: Options) -> _RawPlan:
    return _queue_to_vsock("ip-to-vsock-raw-incoming", options)


@command(
    "Forward the packets iptables sends to an nfqueue (the enclave's outgoing traffic) to the "
    "host over vsock, then drop them from the enclave's stack."
)
@VSOCK_TARGET
@QUEUE_NUM
@_service_options
def ip_to_vsock_raw_outgoing(**options: Any) -> None:
    run_command("ip-to-vsock-raw-outgoing", options)


def plan_ip_to_vsock_raw_outgoing(options: Options) -> _RawPlan:
    return _queue_to_vsock("ip-to-vsock-raw-outgoing", options)


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
def vsock_to_ip_raw_incoming(**options: Any) -> None:
    run_command("vsock-to-ip-raw-incoming", options)


def plan_vsock_to_ip_raw_incoming(options: Options) -> _RawPlan:
    from pf_proxy.raw.addresses import AddressLookupError, read_enclave_address
    from pf_proxy.raw.policy import IncomingPolicy

    ip_file: Path = options["ip_file"]
    try:
        enclave_address = read_enclave_address(ip_file)
    except AddressLookupError as exc:
        raise PlanError(str(exc)) from None
    log.info("Enclave address: %s (from %s)", enclave_address, ip_file)
    policy = IncomingPolicy(enclave_address)
    return _vsock_to_device("vsock-to-ip-raw-incoming", options, options["device"], policy)


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
def vsock_to_ip_raw_outgoing(**options: Any) -> None:
    run_command("vsock-to-ip-raw-outgoing", options)


def plan_vsock_to_ip_raw_outgoing(options: Options) -> _RawPlan:
    from pf_proxy.raw.addresses import (
        AddressLookupError,
        find_outgoing_interface,
        interface_address,
    )
    from pf_proxy.raw.policy import OutgoingPolicy

    device: str | None = options["device"]
    try:
        if device is None:
            device, address = find_outgoing_interface()
        else:
            address = interface_address(device)
    except AddressLookupError as exc:
        raise PlanError(str(exc)) from None
    log.info("Interface: %s, address %s", device, address)
    policy = OutgoingPolicy(address)
    return _vsock_to_device("vsock-to-ip-raw-outgoing", options, device, policy)
