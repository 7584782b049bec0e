"""The UDP data plane: `udp-to-vsock` and `vsock-to-udp`, datagrams over vsock streams.

`framing` is pure (2-byte lengths, as DNS over TCP); `flows` keeps one vsock stream per client
flow, with idle expiry, a cap and bounded buffers; `sockets` opens the UDP side (the listener,
the upstream, resolved per stream); `engine` opens the listeners and serves until
SIGTERM/SIGINT; `metrics` turns the counters into /metrics series.
"""
