"""The pure parts of /metrics and /healthz: answers to requests, the TCP counters' histogram,
and the kernel's nfqueue counters read from /proc's text."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pf_proxy import metrics
from pf_proxy.raw.nfq import parse_queue_stats
from pf_proxy.tcp.metrics import (
    COMPLETED,
    CONNECT_BUCKETS,
    IDLE_TIMEOUT,
    OUTCOMES,
    Ended,
    TcpStats,
    source,
)


@pytest.fixture
def serving() -> Iterator[None]:
    metrics.HEALTH.draining = None
    yield
    metrics.HEALTH.draining = None


def status(response: bytes) -> str:
    return response.split(b"\r\n", 1)[0].decode()


def body(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    ("request_head", "expected"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 200 OK"),
        (b"GET /metrics HTTP/1.0\r\n\r\n", "HTTP/1.1 200 OK"),
        (b"GET /metrics?name[]=x HTTP/1.1\r\n\r\n", "HTTP/1.1 200 OK"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
        (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ],
)
def test_answers(request_head: bytes, expected: str, serving: None) -> None:
    assert status(metrics.answer(request_head)) == expected


def test_healthz_turns_503_with_the_reason_when_draining(serving: None) -> None:
    assert body(metrics.answer(b"GET /healthz HTTP/1.1\r\n\r\n")) == b"serving\n"
    metrics.HEALTH.drain("SIGTERM received: draining 3 connections")
    response = metrics.answer(b"GET /healthz HTTP/1.1\r\n\r\n")
    assert status(response) == "HTTP/1.1 503 Service Unavailable"
    assert body(response) == b"SIGTERM received: draining 3 connections\n"


def test_head_has_no_body(serving: None) -> None:
    response = metrics.answer(b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status(response) == "HTTP/1.1 200 OK"
    assert body(response) == b""
    assert b"Content-Length: " in response


def test_metrics_are_the_prometheus_text_format_with_the_process_collector() -> None:
    text = body(metrics.answer(b"GET /metrics HTTP/1.1\r\n\r\n")).decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"process_open_fds", "process_max_fds", "process_resident_memory_bytes"} <= names


def test_tcp_source_counts_outcomes_bytes_and_connect_times() -> None:
    stats = TcpStats(accepted=3)
    stats.end(Ended(COMPLETED, 100, 200, connect_seconds=0.002))
    stats.end(Ended(COMPLETED, 1, 2, connect_seconds=20.0))  # beyond the last bucket
    stats.end(Ended(IDLE_TIMEOUT, 5, 0, connect_seconds=0.0005))  # on a bound: that bucket
    families = {family.name: family for family in source(stats, lambda: 1, lambda: False)()}
    samples = families["pf_proxy_tcp_connections_ended"].samples
    ended = {sample.labels["outcome"]: sample.value for sample in samples}
    assert ended == {**dict.fromkeys(OUTCOMES, 0), COMPLETED: 2, IDLE_TIMEOUT: 1}
    relayed = {
        s.labels["direction"]: s.value for s in families["pf_proxy_tcp_relayed_bytes"].samples
    }
    assert relayed == {"to_upstream": 106, "to_client": 202}
    histogram = families["pf_proxy_tcp_upstream_connect_seconds"].samples
    buckets = {s.labels["le"]: s.value for s in histogram if s.name.endswith("_bucket")}
    assert buckets[f"{CONNECT_BUCKETS[0]:g}"] == 1  # 0.0005
    assert buckets["0.0025"] == 2  # cumulative: 0.0005 and 0.002
    assert buckets["10"] == 2 and buckets["+Inf"] == 3
    assert next(s.value for s in histogram if s.name.endswith("_count")) == 3
    assert next(s.value for s in histogram if s.name.endswith("_sum")) == pytest.approx(20.0025)


QUEUE_FILE = """\
    0  35422     2 2 65535     7     3    10492  1
   12  35999     0 2 65535     0     0        0  1
"""


def test_nfqueue_counters_from_proc() -> None:
    assert parse_queue_stats(QUEUE_FILE, 0) == {"waiting": 2, "queue_dropped": 7, "user_dropped": 3}
    assert parse_queue_stats(QUEUE_FILE, 12) == {
        "waiting": 0,
        "queue_dropped": 0,
        "user_dropped": 0,
    }
    assert parse_queue_stats(QUEUE_FILE, 1) is None
    assert parse_queue_stats("garbage\n0 x y z\n", 0) is None
    assert parse_queue_stats("", 0) is None
