"""The TCP proxies' counters, and their metric families for /metrics.

The engine counts per connection, never per chunk: a connection's outcome, its bytes each way
and how long its upstream took to connect are added once, when it ends (:meth:`TcpStats.end`).
Open connections are the listener's live tasks, read at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pf_proxy.metrics import Source

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

# How a connection ended: the `outcome` label's values.
COMPLETED = "completed"  # both directions reached EOF
UPSTREAM_CONNECT_FAILED = "upstream_connect_failed"  # refused, unreachable, no listener ...
CONNECT_TIMEOUT = "connect_timeout"  # no upstream (or no whole header) within --connect-timeout
NO_ORIGINAL_DESTINATION = "no_original_destination"  # not redirected by NAT
BAD_HEADER = "bad_header"  # a malformed or cut destination header
DENIED = "denied"  # by --allow/--deny (and the host-name policy)
ROUTE_FAILED = "route_failed"  # any other failure before relaying
IDLE_TIMEOUT = "idle_timeout"  # no traffic for --idle-timeout
RELAY_FAILED = "relay_failed"  # a reset, a broken pipe ... while relaying
CLOSED_AT_DRAIN = "closed_at_drain"  # still open when the drain timeout ran out
# vsock-to-ip-proxy's own, each answered to the client (400 ..., 501 ..., 502 / SOCKS codes)
BAD_REQUEST = "bad_request"  # a malformed, cut, over-long or too slow CONNECT or SOCKS5 request
UNSUPPORTED_REQUEST = "unsupported_request"  # a plain-HTTP forward, SOCKS BIND, an auth method
NAME_UNRESOLVED = "name_unresolved"  # the requested name has no address, or lookup failed
OUTCOMES = (
    COMPLETED, UPSTREAM_CONNECT_FAILED, CONNECT_TIMEOUT, NO_ORIGINAL_DESTINATION, BAD_HEADER,
    DENIED, ROUTE_FAILED, IDLE_TIMEOUT, RELAY_FAILED, CLOSED_AT_DRAIN, BAD_REQUEST,
    UNSUPPORTED_REQUEST, NAME_UNRESOLVED,
)  # fmt: skip

# Upper bounds of the upstream connect time's histogram buckets, in seconds.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(frozen=True)
class Ended:
    """What one connection did, counted when it ends."""

    outcome: str
    to_upstream: int = 0  # bytes relayed from the client to the upstream
    to_client: int = 0  # and back
    connect_seconds: float | None = None  # accept to upstream connected, if it got that far
    connect_retries: int = 0  # upstream connects tried again (endpoints.ConnectRetries)


@dataclass
class TcpStats:
    accepted: int = 0
    ended: Counter[str] = field(default_factory=Counter)
    to_upstream: int = 0
    to_client: int = 0
    connect_buckets: list[int] = field(default_factory=lambda: [0] * (len(CONNECT_BUCKETS) + 1))
    connect_sum: float = 0.0
    pauses: Counter[str] = field(default_factory=Counter)  # "connection_limit", "descriptors"
    connect_retries: int = 0

    def end(self, ended: Ended) -> None:
        self.ended[ended.outcome] += 1
        self.to_upstream += ended.to_upstream
        self.to_client += ended.to_client
        self.connect_retries += ended.connect_retries
        if ended.connect_seconds is not None:
            self.connect_buckets[bisect_left(CONNECT_BUCKETS, ended.connect_seconds)] += 1
            self.connect_sum += ended.connect_seconds


def source(
    stats: TcpStats, open_connections: Callable[[], int], paused: Callable[[], bool]
) -> Source:
    """A metrics source for one listener's `stats` (see :func:`pf_proxy.metrics.register`)."""

    def collect() -> Iterable[Metric]:
        from prometheus_client.metrics_core import (  # only when scraped
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        yield CounterMetricFamily(
            "pf_proxy_tcp_connections_accepted", "Connections accepted.", value=stats.accepted
        )
        yield GaugeMetricFamily(
            "pf_proxy_tcp_connections_open", "Connections open now.", value=open_connections()
        )
        ended = CounterMetricFamily(
            "pf_proxy_tcp_connections_ended", "Connections ended, by outcome.", labels=["outcome"]
        )
        for outcome in OUTCOMES:
            ended.add_metric([outcome], stats.ended[outcome])
        yield ended
        relayed = CounterMetricFamily(
            "pf_proxy_tcp_relayed_bytes",
            "Bytes relayed, by direction (counted when a connection ends).",
            labels=["direction"],
        )
        relayed.add_metric(["to_upstream"], stats.to_upstream)
        relayed.add_metric(["to_client"], stats.to_client)
        yield relayed
        cumulative, buckets = 0, []
        bounds = [f"{bound:g}" for bound in CONNECT_BUCKETS] + ["+Inf"]
        for bound, count in zip(bounds, stats.connect_buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "pf_proxy_tcp_upstream_connect_seconds",
            "From accepting a connection to its upstream connected (for the transparent "
            "receiver, reading the destination header included).",
            buckets=buckets,
            sum_value=stats.connect_sum,
        )
        yield CounterMetricFamily(
            "pf_proxy_tcp_upstream_connect_retries",
            "Upstream connects tried again after a failure that may pass (vsock's ECONNRESET: "
            "a full listen backlog, or no listener yet), counted when a connection ends.",
            value=stats.connect_retries,
        )
        pauses = CounterMetricFamily(
            "pf_proxy_tcp_listener_pauses",
            "Times the listener stopped accepting, by reason: the connection limit, or accept() "
            "out of descriptors.",
            labels=["reason"],
        )
        for reason in ("connection_limit", "descriptors"):
            pauses.add_metric([reason], stats.pauses[reason])
        yield pauses
        yield GaugeMetricFamily(
            "pf_proxy_tcp_listener_paused",
            "1 while the listener leaves new connections in the backlog.",
            value=1 if paused() else 0,
        )

    return collect
