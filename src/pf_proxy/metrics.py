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

The listener runs on the event loop and can neither take the proxy down nor be held by idle
connections: see `MetricsListener`. One request per connection, which must arrive whole within
REQUEST_TIMEOUT seconds and MAX_REQUEST bytes; anything else gets an error status or is closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pf_proxy import __version__
from pf_proxy.current import owner, proxy_name
from pf_proxy.endpoints import BindError, IpAddress, IpEndpoint

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("pf_proxy")

# Connections waiting for their request at once: a descriptor each, which runtime keeps out
# of the data path's budget when --metrics is on.
MAX_SCRAPERS = 128
# The least a waiting connection keeps its place when newer ones want it. An honest client's
# request follows its handshake within microseconds to a round trip; this is far longer.
MIN_WAIT = 0.025
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192
ACCEPTS_PER_WAKEUP = 64  # then the loop's other work gets a turn
ACCEPT_BACKOFF = 0.1
SWEEP_EVERY = 0.5  # how often connections past REQUEST_TIMEOUT are looked for
LOG_EVERY = 10.0  # at most one line per this many seconds about unanswered connections

Source = Callable[[], Iterable["Metric"]]

# What /metrics serves besides the process's own figures: each data plane's source, with the
# name of the proxy it serves (None in a single command). Only when somebody scrapes are the
# sources read and prometheus_client imported: a proxy without --metrics never loads it.
_sources: list[tuple[str | None, object | None, Source]] = []


def register(source: Source) -> Callable[[], None]:
    """Add a data plane's metric families to what /metrics serves (collected per scrape),
    labelled with the proxy being served here, if any; returns what takes them out again."""
    entry = (proxy_name(), owner(), source)
    _sources.append(entry)

    def unregister() -> None:
        if entry in _sources:
            _sources.remove(entry)

    return unregister


def forget(start: object) -> None:
    """Take out every source registered under `start` (a proxy's start, `current.owner`)."""
    _sources[:] = [entry for entry in _sources if entry[1] is not start]


def describe_command(command: str) -> Callable[[], None]:
    """pf_proxy_info{command, version} 1: which command this process (or proxy) is."""

    def info() -> Iterable[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "pf_proxy_info", "The command this process runs.", labels=["command", "version"]
        )
        family.add_metric([command, __version__], 1)
        yield family

    return register(info)


def collect() -> Iterable[Metric]:
    """Every source's families, those of one name merged into one family; under `pf-proxy
    run`, each sample labelled `proxy` with the name of the proxy that counted it. Samples of
    one name and labels are summed: a proxy a reload changed drains beside its successor, and
    the two starts count as one proxy (each series is named once, as the format requires).
    An `_info` sample stays 1: it says what a proxy is, not how much it did."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.samples import Sample

    families: dict[str, Metric] = {}
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    for proxy, _, source in list(_sources):
        for family in source():
            if family.name not in families:
                families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                samples[family.name] = {}
            into = samples[family.name]
            for sample in family.samples:
                labels = sample.labels if proxy is None else {**sample.labels, "proxy": proxy}
                key = sample.name, tuple(sorted(labels.items()))
                before = into.get(key)
                if before is None or sample.name.endswith("_info"):
                    value = sample.value
                else:
                    value = before.value + sample.value
                into[key] = Sample(sample.name, labels, value, sample.timestamp, sample.exemplar)
    for name, family in families.items():
        family.samples = list(samples[name].values())
    return families.values()


class _Sources:
    def collect(self) -> Iterable[Metric]:
        return collect()


_registry: Any = None  # a prometheus_client CollectorRegistry, made at the first scrape


def exposition() -> tuple[bytes, str]:
    """The text /metrics serves, and its content type."""
    global _registry
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    if _registry is None:
        _registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=_registry)  # open fds and their limit, memory, CPU time
        _registry.register(_Sources())
    return generate_latest(_registry), CONTENT_TYPE_LATEST


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
        response = _response("200 OK", *exposition())
    if method == b"HEAD":
        response = response.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    return response


class MetricsListener:
    """The /metrics listener's connections, driven by readiness callbacks on the loop.

    A probe or a scrape must be answered however many connections idle against the port (a
    liveness probe left unanswered restarts a healthy proxy). Honest clients send their
    request the moment they connect; the connections that hold the port do not. So:

    - an accepted connection is read at once, and answered in the same turn of the loop if
      its request is there: it needs no place to wait;
    - at most MAX_SCRAPERS connections wait for the rest of a request. When all places are
      taken, a new connection takes the oldest one's, but only once that one has waited
      MIN_WAIT; until then accepting pauses, and new connections wait in the listen backlog,
      where their requests arrive. Pushing out at once would let a flood that reconnects
      whatever is closed churn the places faster than an honest request can arrive; pausing
      bounds the churn (MAX_SCRAPERS per MIN_WAIT) and keeps the queue moving, so a probe
      behind a thousand held connections is accepted, request in hand, within a fraction of
      a second;
    - a request must arrive whole within REQUEST_TIMEOUT seconds and MAX_REQUEST bytes.

    Connections closed without an answer (pushed out, too slow) are logged at most once per
    LOG_EVERY seconds, with their counts.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.waiting: dict[int, _Scraper] = {}  # by descriptor, oldest first
        self.accepting = False
        self.evicted = 0
        self.timed_out = 0
        self._sweeping: asyncio.TimerHandle | None = None
        self._logged_at = -LOG_EVERY

    def start(self) -> None:
        if not self.accepting and self.sock.fileno() >= 0:
            self.accepting = True
            self.loop.add_reader(self.sock.fileno(), self._on_acceptable)

    def _pause(self, seconds: float) -> None:
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(seconds, self.start)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._pause(0)
            self.sock.close()
        for scraper in list(self.waiting.values()):
            self._finish(scraper, b"")
        if self._sweeping is not None:
            self._sweeping.cancel()
        self._logged_at = -LOG_EVERY  # the counts since the last line, whenever that was
        self._log_unanswered()

    def _on_acceptable(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            if len(self.waiting) >= MAX_SCRAPERS:
                oldest = next(iter(self.waiting.values()))
                waited = self.loop.time() - oldest.accepted
                if waited < MIN_WAIT:
                    self._pause(MIN_WAIT - waited)
                    return
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of descriptors, say: try again shortly
                log.warning("metrics listener: accept failed: %s", exc)
                self._pause(ACCEPT_BACKOFF)
                return
            conn.setblocking(False)
            scraper = _Scraper(conn, self.loop.time())
            response = self._read(scraper)
            if response is None:
                self._wait(scraper)
            else:
                self._finish(scraper, response)

    def _wait(self, scraper: _Scraper) -> None:
        """Keep `scraper` until its request is whole, in the oldest one's place if full."""
        if len(self.waiting) >= MAX_SCRAPERS:
            self.evicted += 1
            self._finish(next(iter(self.waiting.values())), b"")
            self._log_unanswered()
        fd = scraper.sock.fileno()
        self.waiting[fd] = scraper
        self.loop.add_reader(fd, self._on_readable, scraper)
        if self._sweeping is None:
            self._sweeping = self.loop.call_later(SWEEP_EVERY, self._sweep)

    def _on_readable(self, scraper: _Scraper) -> None:
        response = self._read(scraper)
        if response is not None:
            self._finish(scraper, response)

    def _read(self, scraper: _Scraper) -> bytes | None:
        """Read what came. The response once the request is whole (b"": close without one,
        the client is gone); None while it is not."""
        try:
            chunk = scraper.sock.recv(MAX_REQUEST - len(scraper.received))
        except BlockingIOError:
            return None
        except OSError:
            return b""
        if not chunk:
            return b""
        searched = max(0, len(scraper.received) - 3)  # the end may span two reads
        scraper.received += chunk
        end = scraper.received.find(b"\r\n\r\n", searched)
        if end >= 0:
            return answer(bytes(scraper.received[: end + 4]))
        if len(scraper.received) >= MAX_REQUEST:
            return _response("431 Request Header Fields Too Large", b"request head too long\n")
        return None

    def _finish(self, scraper: _Scraper, response: bytes) -> None:
        """Stop waiting for `scraper`, send `response` (if any) and close.

        The response fits the socket's send buffer (a scrape's text is tens of KiB); what
        would not is cut, and the client sees a short body rather than a held descriptor."""
        sock = scraper.sock
        if self.waiting.pop(sock.fileno(), None) is not None:
            self.loop.remove_reader(sock.fileno())
        if response:
            try:
                sock.send(response)
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                log.debug("metrics client: %s", exc)
        sock.close()

    def _sweep(self) -> None:
        """Close the connections past their deadline (the oldest come first)."""
        self._sweeping = None
        now = self.loop.time()
        for scraper in list(self.waiting.values()):
            if scraper.accepted + REQUEST_TIMEOUT > now:
                break
            self.timed_out += 1
            self._finish(scraper, b"")
        self._log_unanswered()
        if self.waiting:
            self._sweeping = self.loop.call_later(SWEEP_EVERY, self._sweep)

    def _log_unanswered(self) -> None:
        now = self.loop.time()
        if now - self._logged_at < LOG_EVERY or not (self.evicted or self.timed_out):
            return
        log.warning(
            "metrics listener: closed %d connections without an answer: %d pushed out by newer "
            "ones (at most %d wait for a request), %d with no whole request within %g s",
            self.evicted + self.timed_out,
            self.evicted,
            MAX_SCRAPERS,
            self.timed_out,
            REQUEST_TIMEOUT,
        )
        self.evicted = self.timed_out = 0
        self._logged_at = now


class _Scraper:
    __slots__ = ("accepted", "received", "sock")

    def __init__(self, sock: socket.socket, accepted: float) -> None:
        self.sock = sock
        self.accepted = accepted  # the loop's time
        self.received = bytearray()


def bind(address: IpAddress) -> socket.socket:
    """The listening socket for /metrics at `address`; `BindError` names the address."""
    try:
        return IpEndpoint(address).listen()
    except BindError as exc:
        raise BindError(exc.errno, f"metrics listener: {exc.strerror}") from exc


async def serve(address: IpAddress, sock: socket.socket | None = None) -> MetricsListener:
    """Serve /metrics and /healthz on `address` (on `sock`, already bound there, if given)
    until the listener is closed; `BindError` names the address."""
    if sock is None:
        sock = bind(address)
    listener = MetricsListener(sock)
    listener.start()
    log.info("Metrics on: http://%s/metrics and /healthz", address)
    return listener
