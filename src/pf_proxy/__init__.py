"""pf-proxy: TCP and raw-IPv4 proxies between vsock and IP networks."""

__version__ = "0.1.0"
