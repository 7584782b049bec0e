"""One description of an enclave's network, expanded into the proxies (and firewall commands)
of either side (pure).

    [enclave]
    cid = 88                     # the enclave's CID
    [parent]
    cid = 3                      # the parent instance's (3 on Nitro: the default)

    [[ingress]]                  # a service in the enclave, reachable on the parent
    port = 443                   # the parent listens on 0.0.0.0:443, the service is at
                                 # 127.0.0.1:443 in the enclave; vsock port 443 between them
    # listen = "0.0.0.0:8443"; target = "127.0.0.1:8443"; vsock-port = 5443; name = "web"

    [egress]                     # the enclave's outgoing TCP, checked on the parent
    mode = "transparent"         # iptables REDIRECT in the enclave, the destination header;
                                 # or "proxy": HTTPS_PROXY / ALL_PROXY=socks5h:// to
                                 # 127.0.0.1:1080, vsock-to-ip-proxy on the parent
    ports = [80, 443]            # which destination ports are redirected (transparent)
    allow = ["*.amazonaws.com:443", { address = "api.example.com", port = 443 }, "10.1.0.0/16"]
    deny = ["10.1.2.0/24"]
    deny-private = true          # the default: never the metadata service, loopback, RFC 1918

    [dns]                        # DNS over UDP and TCP for the enclave
    upstream = "169.254.169.253:53"  # the parent's resolver (the default: the VPC's)

    [raw]                        # the tuna raw path: every port of the enclave's address
    interface = "ens5"           # the parent's interface (its INPUT rules)

Each part becomes a pair of proxies whose vsock ports come from this one place, so the two
sides cannot disagree: the enclave's half listens where the parent's half connects, and the
other way round. Words as the field uses them: enclaver's `ingress`, `egress`, `allow` and
`deny`, and AWS vsock-proxy's allowlist entries of `address` and `port`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pf_proxy.config import ConfigError, Lines

ENCLAVE, PARENT = "enclave", "parent"
Origins = dict[str, tuple[str, ...]]  # a proxy's value's key -> the description's key
_REQUIRED = object()


@dataclass
class Generated:
    """A proxy a description makes: its values as a proxy table would have them."""

    name: str
    kind: str
    values: dict[str, Any]
    origin: str  # where in the description, for errors: "ingress[0]"
    side: str
    lines: Origins  # a value's key -> the description key it came from
    find: Lines

    def line(self, key: str) -> int | None:
        return self.find.line(*self.lines.get(key, ()))

    def shown(self, key: str) -> str:
        """The description's key a value of this proxy came from, to name it in errors."""
        path = self.lines.get(key)
        if path is None:
            return f"{self.origin}: {key}"
        named = path[0] + "".join(
            f"[{part}]" if part.isdigit() else f".{part}" for part in path[1:]
        )
        return named


@dataclass
class Expanded:
    proxies: list[Generated] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    errors: list[ConfigError] = field(default_factory=list)


# Each table's keys: the types a value may have, and its default (_REQUIRED: none).
_SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "enclave": {"cid": ((int,), _REQUIRED)},
    "parent": {"cid": ((int,), 3)},
    "ingress": {
        "port": ((int,), None),
        "listen": ((str,), None),
        "target": ((str,), None),
        "vsock-port": ((int,), None),
        "name": ((str,), None),
    },
    "egress": {
        "mode": ((str,), "transparent"),
        "listen": ((str,), None),  # by mode: see EGRESS_LISTEN
        "vsock-port": ((int,), 1201),  # raw's is 1200, as the tuna images have it
        "ports": ((list,), [80, 443]),
        "allow": ((list,), []),
        "deny": ((list,), []),
        "deny-private": ((bool,), True),
    },
    "dns": {
        "listen": ((str,), "127.0.0.1:53"),
        "upstream": ((str,), "169.254.169.253:53"),
        "vsock-port": ((int,), 53),
        "tcp-vsock-port": ((int,), 5353),
    },
    "raw": {
        "vsock-port": ((int,), 1200),
        "queue": ((int,), 0),
        "interface": ((str,), "ens5"),
        "ip-file": ((str,), "/app/ip.txt"),
    },
}
# transparent: iptables REDIRECT and the destination header; proxy: the enclave's programs
# name their destination to an HTTP CONNECT / SOCKS5 proxy (HTTPS_PROXY, ALL_PROXY).
EGRESS_LISTEN = {"transparent": "127.0.0.1:1200", "proxy": "127.0.0.1:1080"}
EGRESS_MODES = tuple(EGRESS_LISTEN)


class _Reader:
    """A description table's values, checked against its schema (errors collected)."""

    def __init__(self, expanded: Expanded, lines: Lines, path: tuple[str, ...]) -> None:
        self.expanded, self.lines, self.path = expanded, lines, path
        self.key = ".".join(path[:1]) + "".join(f"[{part}]" for part in path[1:])

    def table(self, data: Any, schema: str) -> dict[str, Any]:
        from pf_proxy.config import ConfigError

        if not isinstance(data, dict):
            self.expanded.errors.append(
                ConfigError(self.lines.line(*self.path), self.key, "must be a table")
            )
            return {}
        values = {}
        for key, (types, default) in _SCHEMAS[schema].items():
            if key in data:
                value = data[key]
                if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                    wanted = " or ".join(_TYPE_NAMES[kind] for kind in types)
                    self.error(key, f"expected {wanted}")
                    value = default if default is not _REQUIRED else None
                values[key] = value
            elif default is _REQUIRED:
                self.error("", f"missing: {key}")
                values[key] = None
            else:
                values[key] = default
        for key in data:
            if key not in _SCHEMAS[schema]:
                known = ", ".join(_SCHEMAS[schema])
                self.error(key, f"not a key of [{schema}] (its keys: {known})")
        return values

    def error(self, key: str, message: str) -> None:
        from pf_proxy.config import ConfigError

        where = (*self.path, key) if key else self.path
        shown = f"{self.key}.{key}" if key else self.key
        self.expanded.errors.append(ConfigError(self.lines.line(*where), shown, message))


_TYPE_NAMES = {int: "an integer", str: "a string", list: "an array", bool: "true or false"}


def expand(data: dict[str, Any], side: str, lines: Lines) -> Expanded:
    """The proxies and firewall commands of `side` (enclave or parent) from the description in
    `data` (a parsed run file)."""
    expanded = Expanded()
    enclave = _Reader(expanded, lines, ("enclave",)).table(data.get("enclave", {}), "enclave")
    parent = _Reader(expanded, lines, ("parent",)).table(data.get("parent", {}), "parent")
    # A CID in error was said: go on with a stand-in, to find the rest of what is wrong.
    enclave_cid, parent_cid = enclave["cid"] or 0, parent["cid"] or 0

    def add(
        name: str,
        kind: str,
        values: dict[str, Any],
        origin: str,
        from_keys: Origins,
    ) -> None:
        expanded.proxies.append(Generated(name, kind, values, origin, side, from_keys, lines))

    enclave_rules = ["ip link set lo up"]
    parent_rules: list[str] = []
    ingress = data.get("ingress", [])
    if not isinstance(ingress, list):
        _Reader(expanded, lines, ("ingress",)).error("", "must be an array of tables: [[ingress]]")
        ingress = []
    for index, item in enumerate(ingress):
        path = ("ingress", str(index))
        reader = _Reader(expanded, lines, path)
        entry = reader.table(item, "ingress")
        port = entry["port"]
        if port is None and (entry["listen"] is None or entry["target"] is None):
            reader.error("", "needs port, or both listen and target")
            continue
        listen = entry["listen"] or f"0.0.0.0:{port}"
        target = entry["target"] or f"127.0.0.1:{port}"
        vsock_port = entry["vsock-port"] or port or _port_of(listen)
        name = entry["name"] or f"ingress-{vsock_port}"
        keys: Origins = {
            "ip-addr": (*path, "listen" if entry["listen"] else "port"),
            "vsock-addr": (*path, "vsock-port" if entry["vsock-port"] else "port"),
        }
        if side == PARENT:
            add(
                name,
                "ip-to-vsock",
                {"ip-addr": listen, "vsock-addr": f"{enclave_cid}:{vsock_port}"},
                f"ingress[{index}]",
                keys,
            )
        else:
            keys["ip-addr"] = (*path, "target" if entry["target"] else "port")
            add(
                name,
                "vsock-to-ip",
                {"vsock-addr": f"{enclave_cid}:{vsock_port}", "ip-addr": target},
                f"ingress[{index}]",
                keys,
            )
    raw = "raw" in data
    if "egress" in data:
        reader = _Reader(expanded, lines, ("egress",))
        egress = reader.table(data["egress"], "egress")
        if egress["mode"] not in EGRESS_MODES:
            reader.error("mode", f"must be one of: {', '.join(EGRESS_MODES)}")
        else:
            mode = egress["mode"]
            listen = egress["listen"] or EGRESS_LISTEN[mode]
            vsock = f"{parent_cid}:{egress['vsock-port']}"
            keys = {
                "ip-addr": ("egress", "listen"),
                "vsock-addr": ("egress", "vsock-port"),
            }
            ports = _ports(egress["ports"], reader)
            if side == ENCLAVE and mode == "proxy":
                add(
                    "egress",
                    "ip-to-vsock",
                    {"ip-addr": listen, "vsock-addr": vsock},
                    "egress",
                    keys,
                )
            elif side == ENCLAVE:
                add(
                    "egress",
                    "ip-to-vsock-transparent",
                    {"ip-addr": listen, "vsock-addr": vsock},
                    "egress",
                    keys,
                )
                if not raw:
                    enclave_rules.append("ip route add default dev lo src 127.0.0.1")
                enclave_rules.append(
                    f"iptables -t nat -A OUTPUT -p tcp -m multiport --dports {ports} "
                    f"-j REDIRECT --to-ports {_port_of(listen)}"
                )
            else:
                values: dict[str, Any] = {
                    "vsock-addr": vsock,
                    "deny-private": egress["deny-private"],
                }
                hosts, networks = _allow(egress["allow"], reader)
                if hosts:
                    values["allow-host"] = hosts
                if networks:
                    values["allow"] = networks
                if egress["deny"]:
                    values["deny"] = egress["deny"]
                keys.update(
                    {
                        "allow-host": ("egress", "allow"),
                        "allow": ("egress", "allow"),
                        "deny": ("egress", "deny"),
                        "deny-private": ("egress", "deny-private"),
                    }
                )
                kind = "vsock-to-ip-proxy" if mode == "proxy" else "vsock-to-ip-transparent"
                add("egress", kind, values, "egress", keys)
    if "dns" in data:
        dns = _Reader(expanded, lines, ("dns",)).table(data["dns"], "dns")
        udp_vsock = f"{parent_cid}:{dns['vsock-port']}"
        keys = {
            "ip-addr": ("dns", "listen" if side == ENCLAVE else "upstream"),
            "vsock-addr": ("dns", "vsock-port"),
        }
        tcp_keys: Origins = {**keys, "vsock-addr": ("dns", "tcp-vsock-port")}
        tcp_vsock = f"{parent_cid}:{dns['tcp-vsock-port']}" if dns["tcp-vsock-port"] else None
        if side == ENCLAVE:
            add(
                "dns-udp",
                "udp-to-vsock",
                {"ip-addr": dns["listen"], "vsock-addr": udp_vsock},
                "dns",
                keys,
            )
            if tcp_vsock:
                add(
                    "dns-tcp",
                    "ip-to-vsock",
                    {"ip-addr": dns["listen"], "vsock-addr": tcp_vsock},
                    "dns",
                    tcp_keys,
                )
            host = dns["listen"].rpartition(":")[0].strip("[]")
            enclave_rules.append(
                f"printf 'nameserver {host}\\noptions timeout:2 attempts:3\\n' > /etc/resolv.conf"
            )
            if not raw:  # AI_ADDRCONFIG wants an address on lo besides 127.0.0.1
                enclave_rules.append("ip addr add 10.88.0.1/32 dev lo")
        else:
            add(
                "dns-udp",
                "vsock-to-udp",
                {"vsock-addr": udp_vsock, "ip-addr": dns["upstream"]},
                "dns",
                keys,
            )
            if tcp_vsock:
                add(
                    "dns-tcp",
                    "vsock-to-ip",
                    {"vsock-addr": tcp_vsock, "ip-addr": dns["upstream"]},
                    "dns",
                    tcp_keys,
                )
    if raw:
        settings = _Reader(expanded, lines, ("raw",)).table(data["raw"], "raw")
        port, queue = settings["vsock-port"], settings["queue"]
        keys = {
            "vsock-addr": ("raw", "vsock-port"),
            "queue-num": ("raw", "queue"),
            "device": ("raw", "interface"),
            "ip-file": ("raw", "ip-file"),
        }
        if side == ENCLAVE:
            add(
                "raw-outgoing",
                "ip-to-vsock-raw-outgoing",
                {"vsock-addr": f"{parent_cid}:{port}", "queue-num": queue},
                "raw",
                keys,
            )
            add(
                "raw-incoming",
                "vsock-to-ip-raw-incoming",
                {
                    "vsock-addr": f"{enclave_cid}:{port}",
                    "device": "lo",
                    "ip-file": settings["ip-file"],
                },
                "raw",
                keys,
            )
            enclave_rules += _raw_enclave_rules(settings["ip-file"], queue)
        else:
            add(
                "raw-incoming",
                "ip-to-vsock-raw-incoming",
                {"vsock-addr": f"{enclave_cid}:{port}", "queue-num": queue},
                "raw",
                keys,
            )
            add(
                "raw-outgoing",
                "vsock-to-ip-raw-outgoing",
                {"vsock-addr": f"{parent_cid}:{port}", "device": settings["interface"]},
                "raw",
                keys,
            )
            # The enclave's ports go to the enclave: the parent's own connections (its
            # proxies' upstreams among them) keep to 61440-65535.
            parent_rules.append('sysctl -w net.ipv4.ip_local_port_range="61440 65535"')
            parent_rules += [
                f"iptables -A INPUT -i {settings['interface']} -p tcp --dport {ports} "
                f"-j NFQUEUE --queue-num {queue}"
                for ports in ("80", "443", "1024:61439")
            ]
    expanded.rules = enclave_rules if side == ENCLAVE else parent_rules
    return expanded


def _port_of(address: str) -> int:
    port = address.rpartition(":")[2]
    return int(port) if port.isdigit() else 0


def _ports(ports: list[Any], reader: _Reader) -> str:
    """The egress ports as iptables' multiport list: 80,443,8000:8100."""
    shown = []
    for port in ports:
        if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
            shown.append(str(port))
        elif isinstance(port, str) and _is_port_range(port):
            shown.append(port.replace("-", ":"))
        else:
            reader.error("ports", f"{port!r} is not a port (1-65535) or a range ('8000-8100')")
    return ",".join(shown)


def _is_port_range(text: str) -> bool:
    low, dash, high = text.partition("-")
    return bool(dash) and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535


def _allow(entries: list[Any], reader: _Reader) -> tuple[list[str], list[str]]:
    """`allow` entries as --allow-host patterns and --allow networks: a string is a network
    if it parses as one, else a host-name pattern; a table is AWS's allowlist entry of
    `address` (a name or a network) and `port`."""
    hosts: list[str] = []
    networks: list[str] = []
    for entry in entries:
        if isinstance(entry, dict):
            address, port = entry.get("address"), entry.get("port")
            if not isinstance(address, str) or (port is not None and not isinstance(port, int)):
                reader.error("allow", f"{entry!r}: an entry is {{ address = NAME, port = N }}")
                continue
            entry = address if port is None else _with_port(address, port)
        if not isinstance(entry, str):
            reader.error("allow", f"{entry!r}: expected a name, a network or a table")
            continue
        (networks if _is_network(entry) else hosts).append(entry)
    return hosts, networks


def _with_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _is_network(text: str) -> bool:
    bare = text
    if text.startswith("["):
        bare = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        bare = text.partition(":")[0]
    try:
        ipaddress.ip_network(bare, strict=False)
    except ValueError:
        return False
    return True


def _raw_enclave_rules(ip_file: str, queue: int) -> list[str]:
    from pf_proxy.raw.policy import RESERVED_NETWORKS

    rules = [
        f"X=$(cat {ip_file})",
        'ip addr add "$X/32" dev lo',
        "ip link set lo mtu 9001",
        'ip route add default dev lo src "$X"',
        "ipset create portfilter bitmap:port range 0-65535",
        "ipset add portfilter 80",
        "ipset add portfilter 443",
        "ipset add portfilter 1024-61439",
        "ipset create internal hash:net",
    ]
    rules += [f"ipset add internal {network}" for network in RESERVED_NETWORKS]
    rules.append(
        'iptables -A OUTPUT -p tcp -s "$X" -m set --match-set portfilter src '
        f"-m set ! --match-set internal dst -j NFQUEUE --queue-num {queue}"
    )
    return rules
