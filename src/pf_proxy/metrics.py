"""What an operator looks at: the process's counters, served on `--metrics IP:PORT`.

    /metrics   the Prometheus text format, written by prometheus_client from this process's
               registry: what the data plane counted, and the process itself (descriptors and
               their limit, resident memory, CPU time)
    /healthz   200 "serving" while the proxy serves; 503 with the reason once SIGTERM or
               SIGINT started the drain, so a load balancer or orchestrator stops sending

The data planes keep plain integer counters on their hot paths (no lock, no call per chunk or
packet) and register a *source*: a function that turns them into metric families, run only
when somebody scrapes. Label values come from small fixed sets (outcomes, drop reasons,
directions), never from addresses: an enclave can dial millions of them.

The listener runs on the event loop and cannot take the proxy down: at most MAX_SCRAPERS
connections at once (more are closed at once), one request each, which must arrive whole
within REQUEST_TIMEOUT seconds and MAX_REQUEST bytes; anything else gets an error status and
the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from pf_proxy import __version__
from pf_proxy.endpoints import BindError, IpAddress, IpEndpoint

log = logging.getLogger("pf_proxy")

MAX_SCRAPERS = 8
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192

REGISTRY = CollectorRegistry(auto_describe=False)
ProcessCollector(registry=REGISTRY)  # process_open_fds, process_max_fds, resident memory, CPU

Source = Callable[[], Iterable[Metric]]


class _SourceCollector:
    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        return self.source()


def register(source: Source) -> None:
    """Add a data plane's metric families to what /metrics serves (collected per scrape)."""
    REGISTRY.register(_SourceCollector(source))


def describe_command(command: str) -> None:
    """pf_proxy_info{command, version} 1: which command this process is."""

    def info() -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "pf_proxy_info", "The command this process runs.", labels=["command", "version"]
        )
        family.add_metric([command, __version__], 1)
        yield family

    register(info)


class Health:
    """Serving, or draining (and why); what /healthz answers."""

    def __init__(self) -> None:
        self.draining: str | None = None

    def drain(self, reason: str) -> None:
        self.draining = reason


HEALTH = Health()


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def answer(request: bytes) -> bytes:
    """The whole HTTP response to one request's head (pure, but for reading the registry)."""
    line = request.split(b"\r\n", 1)[0]
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response("400 Bad Request", b"not an HTTP/1.x request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if target not in (b"/metrics", b"/healthz"):
        return _response("404 Not Found", b"try /metrics or /healthz\n")
    if method not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", b"GET or HEAD\n")
    if target == b"/healthz":
        if HEALTH.draining is None:
            response = _response("200 OK", b"serving\n")
        else:
            response = _response("503 Service Unavailable", f"{HEALTH.draining}\n".encode())
    else:
        response = _response("200 OK", generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
    if method == b"HEAD":
        response = response.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    return response


class _Scrapers:
    """The /metrics listener's connections: bounded in number, time and request size."""

    def __init__(self) -> None:
        self.active = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= MAX_SCRAPERS:
            writer.transport.abort()
            return
        self.active += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await reader.readuntil(b"\r\n\r\n")
                writer.write(answer(request))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # slow, cut short or oversized: closed without an answer
        except OSError as exc:
            log.debug("metrics client: %s", exc)
        finally:
            self.active -= 1
            writer.transport.abort()


def bind(address: IpAddress) -> socket.socket:
    """The listening socket for /metrics at `address`; `BindError` names the address."""
    try:
        return IpEndpoint(address).listen(backlog=MAX_SCRAPERS)
    except BindError as exc:
        raise BindError(exc.errno, f"metrics listener: {exc.strerror}") from exc


async def serve(address: IpAddress, sock: socket.socket | None = None) -> asyncio.Server:
    """Serve /metrics and /healthz on `address` (on `sock`, already bound there, if given);
    `BindError` names the address."""
    if sock is None:
        sock = bind(address)
    scrapers = _Scrapers()
    server = await asyncio.start_server(scrapers.handle, sock=sock, limit=MAX_REQUEST)
    log.info("Metrics on: http://%s/metrics and /healthz", address)
    return server
