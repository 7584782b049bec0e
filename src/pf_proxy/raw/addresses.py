"""The addresses the raw proxies' packet checks compare against.

- ``vsock-to-ip-raw-incoming`` lets through only packets addressed to the enclave, whose
  address the tuna images write to ``/app/ip.txt``;
- ``vsock-to-ip-raw-outgoing`` lets through only packets from the host interface's address,
  and by default uses the first interface named ``eth*`` or ``ens*`` that has an IPv4 address
  (in interface index order, as the originals do).
"""

from __future__ import annotations

import fcntl
import socket
import struct
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


SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's (primary) IPv4 address
_IFREQ = struct.Struct("16s16x")  # struct ifreq: the name, then a union (a sockaddr_in here)
_ADDRESS_IN_IFREQ = slice(20, 24)  # the sockaddr_in's address, after ifr_name, family and port


def _ipv4_address(name: str) -> IPv4Address | None:
    """The first IPv4 address of interface `name`, None if it has none (or does not exist).

    One ioctl, as ifconfig asks: pyroute2's netlink client cost about 10 MiB of resident
    memory to import for this, a third of a raw proxy's (benchmarks/memory.py)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            answer = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, _IFREQ.pack(name.encode()))
        except OSError:  # EADDRNOTAVAIL: no IPv4 address; ENODEV: no such interface
            return None
    return IPv4Address(answer[_ADDRESS_IN_IFREQ])


def _interfaces_with_ipv4() -> list[tuple[int, str, IPv4Address]]:
    """(index, name, first IPv4 address) of every interface that has one, by index."""
    found = []
    for index, name in sorted(socket.if_nameindex()):
        address = _ipv4_address(name)
        if address is not None:
            found.append((index, name, address))
    return found


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
    address = _ipv4_address(device) if len(device.encode()) < 16 else None  # IFNAMSIZ
    if address is None:
        raise AddressLookupError(f"device {device} has no IPv4 address (or does not exist)")
    return address
