"""The UDP proxies' metric families for /metrics, read from a `FlowTable`'s plain counters
when somebody scrapes (nothing is done per datagram but adding to an integer)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pf_proxy.metrics import Source

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
from pf_proxy.udp.flows import CLOSE_REASONS, FlowTable


def source(table: FlowTable) -> Source:
    """A metrics source for `table` (see :func:`pf_proxy.metrics.register`)."""

    def collect() -> Iterable[Metric]:
        from prometheus_client.metrics_core import (  # only when scraped
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        counters = table.counters
        yield CounterMetricFamily(
            "pf_proxy_udp_flows_opened", "Flows opened (a flow: one client, one vsock stream).",
            value=counters.flows,
        )  # fmt: skip
        yield GaugeMetricFamily("pf_proxy_udp_flows_open", "Flows open now.", value=len(table))
        yield GaugeMetricFamily(
            "pf_proxy_udp_flow_limit",
            "The most flows open at once (from the open file limit).",
            value=table.limit,
        )
        yield GaugeMetricFamily(
            "pf_proxy_udp_at_flow_limit",
            "1 while new flows close the flow idle the longest to make room.",
            value=1 if table.overloaded else 0,
        )
        closed = CounterMetricFamily(
            "pf_proxy_udp_flows_closed", "Flows closed, by reason.", labels=["reason"]
        )
        for reason in CLOSE_REASONS:
            closed.add_metric([reason], counters.closed[reason])
        yield closed
        datagrams = CounterMetricFamily(
            "pf_proxy_udp_datagrams",
            "Datagrams sent down vsock streams (to_vsock) and received from them (from_vsock).",
            labels=["direction"],
        )
        datagrams.add_metric(["to_vsock"], counters.datagrams_to_stream)
        datagrams.add_metric(["from_vsock"], counters.datagrams_from_stream)
        yield datagrams
        carried = CounterMetricFamily(
            "pf_proxy_udp_stream_bytes",
            "Bytes of frames (each a 2-byte length and a datagram) sent down vsock streams "
            "(to_vsock) and received from them (from_vsock).",
            labels=["direction"],
        )
        carried.add_metric(["to_vsock"], counters.bytes_to_stream)
        carried.add_metric(["from_vsock"], counters.bytes_from_stream)
        yield carried
        dropped = CounterMetricFamily(
            "pf_proxy_udp_dropped_datagrams",
            "Datagrams dropped: vsock_stream_slow (its stream held back too much already), "
            "udp_refused (the UDP socket refused it: full, too large, unreachable).",
            labels=["reason"],
        )
        dropped.add_metric(["vsock_stream_slow"], counters.dropped_stream_full)
        dropped.add_metric(["udp_refused"], counters.dropped_udp)
        yield dropped
        yield CounterMetricFamily(
            "pf_proxy_udp_vsock_connect_retries",
            "New flows' vsock connects tried again after a failure that may pass "
            "(ECONNRESET: a full listen backlog, or no listener yet).",
            value=counters.connect_retries,
        )
        yield GaugeMetricFamily(
            "pf_proxy_udp_held_bytes",
            "Bytes of frames held back for vsock streams that could not take them yet.",
            value=table.pending_total,
        )

    return collect
