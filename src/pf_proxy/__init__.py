"""pf-proxy: TCP and raw-IPv4 proxies between vsock and IP networks."""

from pf_proxy.loops import import_asyncio_without_ssl

__version__ = "0.1.0"

# Before anything imports asyncio (see pf_proxy.loops): no proxy loads `ssl` for nothing.
import_asyncio_without_ssl()
