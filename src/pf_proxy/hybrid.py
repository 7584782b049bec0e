"""Hybrid vsock's host-side handshake, pure: the CONNECT line and the answer to it.

Firecracker and Cloud Hypervisor (and rust-vmm's vhost-device-vsock) show a microVM's vsock
device on the host as a Unix socket, `uds_path`. A host program reaches guest port P by
connecting to it and writing `CONNECT P\\n`; the backend answers `OK <number>\\n` once the
guest has accepted, and from then on the stream is the guest's. What the number is differs
(Firecracker: a host-side port it allocated; vhost-device-vsock: the guest port), so nothing
but its digits is checked. Anything else before `OK`, or no answer at all, is a failure:

    no_listener  the backend closed without a byte: nothing listens on that guest port (yet)
    not_up       a reset before OK (the guest's vsock driver is not up yet), or nothing
                 accepts on uds_path at all (the VMM is not running)
    timed_out    no OK within the connect timeout
    bad_answer   bytes that are not `OK <digits>\\n`

The first two may pass, so a connect is tried again while its connect timeout leaves room
(`endpoints.ConnectRetries`). The I/O is `endpoints.HybridVsock`'s; this module only turns
bytes into answers, and counts the outcomes for /metrics.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

# The handshake's outcomes: the `outcome` label's values and the words of the log lines.
CONNECTED = "connected"
NO_LISTENER = "no_listener"
NOT_UP = "not_up"
TIMED_OUT = "timed_out"
BAD_ANSWER = "bad_answer"
OUTCOMES = (CONNECTED, NO_LISTENER, NOT_UP, TIMED_OUT, BAD_ANSWER)

# The longest answer line read: Firecracker reads a CONNECT line of up to 32 bytes, and
# "OK 4294967295\n" is 14.
MAX_ANSWER = 32
_OK_LINE = re.compile(rb"OK ([0-9]{1,10})\n")
_OK_START = re.compile(rb"O(?:K(?: [0-9]{0,10})?)?")  # what may still become an OK line


def connect_request(port: int) -> bytes:
    """The CONNECT line for guest `port`, to be written in one write (a backend reads it in
    one read: a line split across two is dropped)."""
    return b"CONNECT %d\n" % port


@dataclass(frozen=True)
class Accepted:
    """`OK <number>\\n`: the stream is connected; `size` bytes of it were the answer."""

    number: int
    size: int


@dataclass(frozen=True)
class Refused:
    """Not an OK: `outcome` (one of OUTCOMES) and what the backend answered, in words."""

    outcome: str
    answer: str


class NeedMore:
    """No whole line yet: read on (nothing read so far is anything but the answer line)."""


NEED_MORE = NeedMore()


def read_answer(data: bytes, ended: bool = False) -> Accepted | Refused | NeedMore:
    """Judge the first bytes the backend sent (`data`; `ended`: it closed after them). The
    answer ends at the first newline; nothing after it is the handshake's."""
    line, newline, _ = data.partition(b"\n")
    if newline:
        found = _OK_LINE.fullmatch(line + newline)
        if found and int(found.group(1)) <= 0xFFFFFFFF:
            return Accepted(int(found.group(1)), len(line) + 1)
        return Refused(BAD_ANSWER, f"answered {bytes(line + newline)!r} instead of OK <port>")
    if len(data) >= MAX_ANSWER:
        return Refused(BAD_ANSWER, f"answered {data[:MAX_ANSWER]!r}... instead of OK <port>")
    if ended:
        if not data:
            return Refused(NO_LISTENER, "the backend closed without answering")
        return Refused(BAD_ANSWER, f"answered {data!r} and closed, instead of OK <port>")
    if data and not _OK_START.fullmatch(data):
        return Refused(BAD_ANSWER, f"answered {data!r}... instead of OK <port>")
    return NEED_MORE


@dataclass
class Handshakes:
    """The outcomes of one uds_path's handshakes, counted per try."""

    uds_path: str
    outcomes: Counter[str]

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1


def metrics_source(handshakes: Handshakes) -> Iterable[Metric]:
    """The metric families of `handshakes` (a source for `pf_proxy.metrics.register`, with
    the argument bound)."""
    from prometheus_client.metrics_core import (  # only when scraped
        CounterMetricFamily,
        GaugeMetricFamily,
    )

    info = GaugeMetricFamily(
        "pf_proxy_vsock_hybrid_info",
        "The hybrid vsock socket (a microVM's uds_path) this process connects through.",
        labels=["uds_path"],
    )
    info.add_metric([handshakes.uds_path], 1)
    yield info
    family = CounterMetricFamily(
        "pf_proxy_vsock_hybrid_handshakes",
        "CONNECT/OK handshakes on the hybrid vsock socket, by outcome: connected, no_listener "
        "(closed before OK), not_up (reset before OK, or nothing accepts on the socket), "
        "timed_out, bad_answer. Every try counts, retries included.",
        labels=["outcome"],
    )
    for outcome in OUTCOMES:
        family.add_metric([outcome], handshakes.outcomes[outcome])
    yield family
