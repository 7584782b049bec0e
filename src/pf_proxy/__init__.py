"""pf-proxy: TCP and raw-IPv4 proxies between vsock and IP networks."""

import os
import sys

__version__ = "0.1.0"

# Which event loop serves: "uvloop" (the default: the least CPU per connection) or "asyncio"
# (the standard library's loop, for memory-bound enclaves: about 7 MiB less per process; see
# docs/operations/memory.md). Read here, before anything imports asyncio: uvloop imports `ssl`
# unconditionally, and asyncio does too unless it is absent, as in a Python built without it.
LOOP_ENV = "PF_PROXY_LOOP"
LOOPS = ("uvloop", "asyncio")


def _asyncio_without_ssl() -> None:
    """Import asyncio as if `ssl` were absent (its TLS support off: no proxy here speaks TLS
    itself), then make `ssl` importable again for whoever needs it later (prometheus_client,
    when /metrics is first scraped)."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return  # too late: an importer of pf_proxy loaded them already
    sys.modules["ssl"] = None  # type: ignore[assignment]  # "import ssl" raises ImportError
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


if os.environ.get(LOOP_ENV) == "asyncio":
    _asyncio_without_ssl()
