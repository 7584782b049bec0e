"""The addresses the raw proxies' packet checks compare against.

- ``vsock-to-ip-raw-incoming`` lets through only packets addressed to the enclave, whose
  address the tuna images write to ``/app/ip.txt``;
- ``vsock-to-ip-raw-outgoing`` lets through only packets from the host interface's address,
  and by default uses the first interface named ``eth*`` or ``ens*`` that has an IPv4 address
  (found with pyroute2, in interface index order, as the originals do).
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address
from pathlib import Path

OUTGOING_INTERFACE_PREFIXES = ("eth", "ens")


class AddressLookupError(Exception):
    """An address the proxy needs could not be found; the message says where it looked."""


def read_enclave_address(path: Path) -> IPv4Address:
    """The IPv4 address written in ``path`` (surrounding white space ignored)."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise AddressLookupError(
            f"failed to read the enclave address from {path}: {exc.strerror}"
        ) from exc
    try:
        return IPv4Address(text)
    except ValueError:
        raise AddressLookupError(
            f"{path} does not hold an IPv4 address (it holds {text[:40]!r})"
        ) from None


def _interfaces_with_ipv4() -> list[tuple[int, str, IPv4Address]]:
    """(index, name, first IPv4 address) of every interface that has one, by index."""
    # Imported here, not at the top: pyroute2 takes about 0.15 s to import, which every raw
    # command would otherwise spend on --help and usage errors too.
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        first_address: dict[int, IPv4Address] = {}
        for message in ipr.get_addr(family=socket.AF_INET):
            first_address.setdefault(message["index"], IPv4Address(message.get_attr("IFA_ADDRESS")))
    return sorted(
        (index, names[index], address) for index, address in first_address.items() if index in names
    )


def find_outgoing_interface() -> tuple[str, IPv4Address]:
    """The first ``eth*``/``ens*`` interface with an IPv4 address, and that address."""
    for _, name, address in _interfaces_with_ipv4():
        if name.startswith(OUTGOING_INTERFACE_PREFIXES):
            return name, address
    raise AddressLookupError(
        "no matching interface found (an eth* or ens* interface with an IPv4 address); "
        "name one with --device"
    )


def interface_address(device: str) -> IPv4Address:
    """The first IPv4 address of ``device``."""
    interfaces = _interfaces_with_ipv4()
    for _, name, address in interfaces:
        if name == device:
            return address
    raise AddressLookupError(f"device {device} has no IPv4 address (or does not exist)")
