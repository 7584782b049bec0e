"""The raw proxies' metric families, built from a forwarder's counters when scraped.

What is counted, and where: packets and bytes forwarded and drops by reason (:class:`Stats`,
per batch on the hot path), the vsock link's state and how often it was (re)established, and
for the two queue readers the kernel's own counters of their nfqueue (read from /proc at
scrape time).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pf_proxy.metrics import Source

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
from pf_proxy.raw.forward import QueueToVsock, VsockToDevice
from pf_proxy.raw.nfq import kernel_queue_stats


def source(forwarder: QueueToVsock | VsockToDevice) -> Source:
    """A metrics source for `forwarder` (see :func:`pf_proxy.metrics.register`)."""

    def collect() -> Iterable[Metric]:
        from prometheus_client.metrics_core import (  # only when scraped
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        stats = forwarder.stats
        yield CounterMetricFamily(
            "pf_proxy_raw_forwarded_packets", "Packets forwarded.", value=stats.packets
        )
        yield CounterMetricFamily(
            "pf_proxy_raw_forwarded_bytes", "Bytes of the packets forwarded.", value=stats.bytes
        )
        drops = CounterMetricFamily(
            "pf_proxy_raw_dropped_packets", "Packets dropped, by reason.", labels=["reason"]
        )
        for reason, count in stats.drops.items():
            drops.add_metric([reason], count)
        yield drops
        yield CounterMetricFamily(
            "pf_proxy_raw_malformed_streams",
            "vsock streams dropped because their bytes were not whole IPv4 packets.",
            value=stats.malformed_streams,
        )
        yield GaugeMetricFamily(
            "pf_proxy_raw_link_up",
            "1 while the vsock link is established, 0 while it is being (re)established.",
            value=1 if forwarder.link_up else 0,
        )
        yield CounterMetricFamily(
            "pf_proxy_raw_link_connects",
            "Times the vsock link was established (reconnects are this less one).",
            value=stats.link_connects,
        )
        if isinstance(forwarder, QueueToVsock):
            yield from _kernel_queue(forwarder.queue_num)

    return collect


def _kernel_queue(queue_num: int) -> Iterable[Metric]:
    stats = kernel_queue_stats(queue_num)
    if stats is None:
        return
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

    yield GaugeMetricFamily(
        "pf_proxy_nfqueue_waiting_packets",
        "Packets in the kernel's nfqueue waiting to be read (/proc/net/netfilter/nfnetlink_queue).",
        value=stats["waiting"],
    )
    dropped = CounterMetricFamily(
        "pf_proxy_nfqueue_dropped_packets",
        "Packets the kernel dropped from the nfqueue: queue_full (the proxy fell behind) or "
        "user (delivery to the proxy failed).",
        labels=["cause"],
    )
    dropped.add_metric(["queue_full"], stats["queue_dropped"])
    dropped.add_metric(["user"], stats["user_dropped"])
    yield dropped
