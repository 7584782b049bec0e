"""The TCP commands (the five pf-proxy ones, and vsock-to-ip-proxy): flags in, one call to the
engine out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from pf_proxy.cli.options import (
    CID,
    HOST_PATTERN,
    IP_LISTEN_ADDRESS,
    IP_TARGET_ADDRESS,
    NETWORK_RULE,
    VSOCK_ADDRESS,
    F,
    Seconds,
    backlog_option,
    command,
    metrics_option,
    proxy_timeouts,
    run_command,
    timeouts,
    vsock_buffer,
    vsock_side,
    vsock_uds_option,
    workers_option,
)
from pf_proxy.endpoints import Endpoint, IpEndpoint, VsockAddress, VsockEndpoint
from pf_proxy.runner import PlanError

if TYPE_CHECKING:
    from pf_proxy.tcp.engine import Plan
    from pf_proxy.tcp.routes import Route

log = logging.getLogger("pf_proxy")

VSOCK_LISTEN = click.option(
    "-v",
    "--vsock-addr",
    required=True,
    type=VSOCK_ADDRESS,
    help="vsock address of the listener <cid:port>, e.g. 88:4000",
)
VSOCK_TARGET = click.option(
    "-v",
    "--vsock-addr",
    required=True,
    type=VSOCK_ADDRESS,
    help="vsock address of the upstream target <cid:port>, e.g. 88:5000",
)
IP_LISTEN = click.option(
    "-i",
    "--ip-addr",
    required=True,
    type=IP_LISTEN_ADDRESS,
    help="IP address of the listener <ip:port>, e.g. 127.0.0.1:1200 or [::1]:1200",
)


Options = dict[str, Any]


def _vsock(options: Options, *, listening: bool) -> VsockEndpoint:
    """The proxy's vsock side: its listener, or its upstream."""
    return vsock_side(
        options["vsock_addr"],
        options["vsock_buffer_size"],
        options["vsock_uds"],
        listening=listening,
    )


def _plan(
    listen: Endpoint,
    make_route: Callable[[], Route],
    forward: str,
    backward: str,
    options: Options,
    *,
    engine_timeout: bool = True,
) -> Plan:
    """A TCP proxy's plan: the listener, the route, and the settings from its options
    (`engine_timeout`: the engine bounds routing and connecting by --connect-timeout; a
    route that answers the client for each step bounds them itself)."""
    from pf_proxy.tcp import engine

    settings = engine.Settings(
        forward=forward,
        backward=backward,
        connect_timeout=options["connect_timeout"] if engine_timeout else None,
        idle_timeout=options["idle_timeout"] or None,
        drain_timeout=options["drain_timeout"],
        backlog=options["backlog"],
    )
    return engine.Plan(listen, make_route, settings)


@command("Forward connections accepted on a vsock address to a TCP/IP endpoint.")
@VSOCK_LISTEN
@click.option(
    "-i",
    "--ip-addr",
    required=True,
    type=IP_TARGET_ADDRESS,
    help="IP address of the upstream target <ip:port> (or host:port), e.g. 127.0.0.1:8080",
)
@timeouts
@vsock_buffer
@vsock_uds_option
@metrics_option
@workers_option
@backlog_option
def vsock_to_ip(**options: Any) -> None:
    run_command("vsock-to-ip", options)


def plan_vsock_to_ip(options: Options) -> Plan:
    from pf_proxy.tcp import routes

    upstream = IpEndpoint(options["ip_addr"])
    listen = _vsock(options, listening=True)
    return _plan(listen, lambda: routes.fixed(upstream), "vsock to ip", "ip to vsock", options)


@command("Forward connections accepted on a TCP/IP address to a vsock endpoint.")
@IP_LISTEN
@VSOCK_TARGET
@timeouts
@vsock_buffer
@vsock_uds_option
@metrics_option
@workers_option
@backlog_option
def ip_to_vsock(**options: Any) -> None:
    run_command("ip-to-vsock", options)


def plan_ip_to_vsock(options: Options) -> Plan:
    from pf_proxy.tcp import routes

    upstream = _vsock(options, listening=False)
    listen = IpEndpoint(options["ip_addr"])
    return _plan(listen, lambda: routes.fixed(upstream), "ip to vsock", "vsock to ip", options)


def policy_options(func: F) -> F:
    """--allow, --deny, --deny-private and --allow-host: the egress policy (tcp/access.py)."""
    options = [
        click.option(
            "--allow",
            multiple=True,
            type=NETWORK_RULE,
            metavar="CIDR[:PORT]",
            help="Connect only to destinations in this network, on this port if one is given "
            "(10.0.0.0/8, 10.0.0.0/8:443, [2001:db8::/32]:443: an IPv6 network takes a port "
            "only in brackets). Repeatable; with any --allow, everything else is denied. "
            "Default: every destination is allowed.",
        ),
        click.option(
            "--deny",
            multiple=True,
            type=NETWORK_RULE,
            metavar="CIDR[:PORT]",
            help="Never connect to destinations in this network, on this port if one is given "
            "(same forms as --allow; repeatable; deny wins over --allow), e.g. 169.254.0.0/16 "
            "for the instance metadata service. It also denies the IPv6 forms that embed a "
            "denied IPv4 address (IPv4-mapped and -compatible, NAT64, 6to4, Teredo ...).",
        ),
        click.option(
            "--deny-private",
            is_flag=True,
            help="Deny what an enclave should never reach by accident: loopback, RFC 1918, "
            "link-local (the instance metadata service), CGNAT, multicast, reserved and "
            "documentation ranges, IPv6 ULA, link-local and loopback, and every IPv6 form "
            "of the IPv4 ones (IPv4-mapped, IPv4-compatible, IPv4-translated, NAT64 "
            "64:ff9b::/96 and 64:ff9b:1::/48, 6to4 2002::/16, Teredo 2001::/32).",
        ),
        click.option(
            "--allow-host",
            "allow_hosts",
            multiple=True,
            type=HOST_PATTERN,
            metavar="PATTERN[:PORT]",
            help="Allow a destination by name: this name (api.example.com) or any below it "
            "(*.example.com), on this port if one is given (api.example.com:443), else on "
            "every port. Repeatable; with any, everything not allowed is denied.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@command(
    "Transparent proxy from vsock to IP: each vsock stream starts with the destination "
    "header written by ip-to-vsock-transparent; connect there and relay. With --allow-host, "
    "a stream is allowed by its TLS server_name (SNI) or HTTP Host when the destination is "
    "an address the name resolves to on this host; its first bytes are read for the name (up "
    "to 16 KiB, within half the connect timeout) and sent on first. The decision is taken "
    "once per connection (docs/security-egress-policy.md)."
)
@click.option(
    "-v",
    "--vsock-addr",
    required=True,
    type=VSOCK_ADDRESS,
    help="vsock address of the listener, open to the transparent proxy sender "
    "<cid:port>, e.g. 3:1200",
)
@policy_options
@timeouts
@vsock_buffer
@vsock_uds_option
@metrics_option
@workers_option
@backlog_option
def vsock_to_ip_transparent(**options: Any) -> None:
    run_command("vsock-to-ip-transparent", options)


def plan_vsock_to_ip_transparent(options: Options) -> Plan:
    from pf_proxy.tcp import egress
    from pf_proxy.tcp.access import AccessPolicy, ResolveError

    policy = AccessPolicy(
        options["allow"], options["deny"], options["allow_hosts"], options["deny_private"]
    )
    # The client's first bytes, and then the name's lookup, get half the connect timeout
    # each: a client that sends nothing, or a resolver that does not answer, is denied with a
    # line that says so, before the connect timeout would close it with a vaguer one.
    name_timeout = options["connect_timeout"] / 2
    resolver = None
    if policy.needs_names:
        # Imported here: dnspython takes 0.1-0.2 s to import, which no other command needs.
        from pf_proxy.tcp.resolver import ResolverCache

        try:
            resolver = ResolverCache.from_system(name_timeout)
        except ResolveError as exc:
            raise PlanError(f"--allow-host needs a resolver: {exc}") from None

    def make_route() -> Route:
        log.info("Destinations: %s", policy.describe())
        if resolver is None:
            return egress.from_destination_header(policy)
        log.info("Names resolved with: %s", ", ".join(resolver.nameservers))
        return egress.from_destination_header(policy, resolver.addresses, name_timeout)

    listen = _vsock(options, listening=True)
    return _plan(listen, make_route, "vsock to ip", "ip to vsock", options)


@command(
    "Explicit proxy from vsock to IP: each vsock stream starts with an HTTP CONNECT or SOCKS5 "
    "request (told apart by its first byte) for a host and port. The name is resolved on this "
    "host; the name, the port and each address it resolves to are checked against the policy "
    "(--allow, --deny, --deny-private, --allow-host), and only allowed addresses are dialled. "
    "The client is answered once the connect is done: 200 or SOCKS5 success; 403 or 'not "
    "allowed by ruleset'; 502 or 'host unreachable' / 'connection refused'; 504 or 'TTL "
    "expired'. Plain-HTTP forward requests (GET http://...) are refused with 501. See "
    "docs/deployments/explicit-proxy.md."
)
@click.option(
    "-v",
    "--vsock-addr",
    required=True,
    type=VSOCK_ADDRESS,
    help="vsock address of the listener, open to the enclave's ip-to-vsock <cid:port>, e.g. 3:1080",
)
@policy_options
@click.option(
    "--request-timeout",
    type=Seconds(zero=False),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Close a connection whose request (the CONNECT head, or SOCKS5's greeting and "
    "request) is not whole within this long; over HTTP it is answered 408.",
)
@proxy_timeouts
@vsock_buffer
@vsock_uds_option
@metrics_option
@workers_option
@backlog_option
def vsock_to_ip_proxy(**options: Any) -> None:
    run_command("vsock-to-ip-proxy", options)


def plan_vsock_to_ip_proxy(options: Options) -> Plan:
    from pf_proxy.tcp import egress
    from pf_proxy.tcp.access import AccessPolicy, ResolveError
    from pf_proxy.tcp.resolver import ResolverCache  # dnspython: imported where needed

    policy = AccessPolicy(
        options["allow"], options["deny"], options["allow_hosts"], options["deny_private"]
    )
    connect_timeout: float = options["connect_timeout"]
    request_timeout: float = options["request_timeout"]
    try:
        resolver = ResolverCache.from_system(connect_timeout / 2)
    except ResolveError as exc:
        raise PlanError(f"requested names are resolved on this host: {exc}") from None

    def make_route() -> Route:
        log.info("Destinations: %s", policy.describe("the name in the request"))
        log.info("Names resolved with: %s", ", ".join(resolver.nameservers))
        return egress.explicit(policy, resolver.addresses, request_timeout, connect_timeout)

    listen = _vsock(options, listening=True)
    # No engine timeout around the route: it bounds the request, the lookup and the connect
    # itself, to answer the client for each.
    return _plan(listen, make_route, "vsock to ip", "ip to vsock", options, engine_timeout=False)


@command(
    "Transparent proxy from IP to vsock: read each connection's original destination "
    "(SO_ORIGINAL_DST, after iptables REDIRECT/DNAT), send it as the destination header, "
    "then relay."
)
@IP_LISTEN
@click.option(
    "-v",
    "--vsock-addr",
    required=True,
    type=VSOCK_ADDRESS,
    help="vsock address of the upstream transparent proxy receiver <cid:port>, e.g. 3:1200",
)
@timeouts
@vsock_buffer
@vsock_uds_option
@metrics_option
@workers_option
@backlog_option
def ip_to_vsock_transparent(**options: Any) -> None:
    run_command("ip-to-vsock-transparent", options)


def plan_ip_to_vsock_transparent(options: Options) -> Plan:
    from pf_proxy.tcp import routes

    upstream = _vsock(options, listening=False)
    return _plan(
        IpEndpoint(options["ip_addr"]),
        lambda: routes.with_destination_header(upstream),
        "ip to vsock",
        "vsock to ip",
        options,
    )


@command(
    "Transparent proxy to vsock by port: connect each redirected connection to vsock "
    "CID:<original destination port>."
)
@IP_LISTEN
@click.option(
    "-v",
    "--vsock",
    "cid",
    required=True,
    type=CID,
    help="CID of the upstream vsock side (the port is the original one), e.g. 88",
)
@timeouts
@vsock_buffer
@vsock_uds_option
@metrics_option
@workers_option
@backlog_option
def transparent_port_to_vsock(**options: Any) -> None:
    run_command("transparent-port-to-vsock", options)


def plan_transparent_port_to_vsock(options: Options) -> Plan:
    from pf_proxy.tcp import routes

    template = vsock_side(
        VsockAddress(options["cid"], 0),
        options["vsock_buffer_size"],
        options["vsock_uds"],
        listening=False,
        param="cid",
    )
    return _plan(
        IpEndpoint(options["ip_addr"]),
        lambda: routes.to_original_port(template),
        "port to vsock",
        "vsock to port",
        options,
    )
