"""`pf-proxy run` files (pure): the keys are the commands' flags and convert as the flags do;
every error is reported with its line and key; a description expands into two sides that
agree; a reload's diff."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from pf_proxy import config
from pf_proxy.config import ConfigErrors, option_keys, parse
from pf_proxy.kinds import KINDS
from pf_proxy.runner import Spec, diff

# A valid value for each flag of the eleven commands, as a file and a command line write it.
SAMPLES: dict[str, object] = {
    "vsock-addr": "88:5000",
    "ip-addr": "127.0.0.1:8080",
    "vsock": "88",
    "connect-timeout": 3.5,
    "idle-timeout": 60,
    "drain-timeout": 2,
    "vsock-buffer-size": 65536,
    "metrics": "127.0.0.1:9100",
    "workers": 2,
    "allow": ["10.0.0.0/8", "192.0.2.0/24"],
    "deny": ["10.1.0.0/16"],
    "deny-private": True,
    "allow-host": ["api.example.com", "*.example.org"],
    "stats-interval": 30,
    "queue-num": 3,
    "device": "eth1",
    "ip-file": "/etc/enclave-ip.txt",
    "backlog": 4096,
    "request-timeout": 7,
    "vsock-uds": "/run/vm1/v.sock",
}


def _flags(command: click.Command) -> set[str]:
    return {opt[2:] for param in command.params for opt in param.opts if opt.startswith("--")}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_flag_is_a_key_and_every_key_a_flag(kind: str) -> None:
    command = KINDS[kind].command()
    assert set(option_keys(command)) == _flags(command) - {"help", "version"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_file_converts_each_option_as_its_flag_does(kind: str) -> None:
    """Every option of every command, set in a file and on a command line to the same value:
    the proxy's options are the command's parameters, equal."""
    command = KINDS[kind].command()
    keys = option_keys(command)
    missing = set(keys) - set(SAMPLES)
    assert not missing, f"add sample values for {missing}"
    table, args = [f'kind = "{kind}"'], []
    for key, param in keys.items():
        value = SAMPLES[key]
        if key == "vsock-addr" and KINDS[kind].listens_on_vsock:
            value = "2:5000"  # with --vsock-uds, a listener is the host's side: CID 2
        table.append(f"{key} = {_toml(value)}")
        if param.is_flag:
            args.append(f"--{key}")
        else:
            for item in value if isinstance(value, list) else [value]:
                args += [f"--{key}", str(item)]
    loaded = parse("[proxy.p]\n" + "\n".join(table) + "\n", "f.toml")
    flags = command.make_context(kind, args).params
    assert loaded.specs[0].options == flags


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return str(value)


@pytest.mark.parametrize("kind", list(KINDS))
def test_defaults_are_the_flags_defaults(kind: str) -> None:
    command = KINDS[kind].command()
    required = {
        key: SAMPLES[key] for key, param in option_keys(command).items() if param.required
    }
    lines = [f'kind = "{kind}"'] + [f"{key} = {_toml(value)}" for key, value in required.items()]
    text = "[proxy.p]\n" + "\n".join(lines) + "\n"
    args = [part for key, value in required.items() for part in (f"--{key}", str(value))]
    assert parse(text, "f.toml").specs[0].options == command.make_context(kind, args).params


def errors_of(text: str, side: str | None = None) -> list[str]:
    with pytest.raises(ConfigErrors) as caught:
        parse(text, "f.toml", side)
    return [error.format("f.toml") for error in caught.value.errors]


GOOD = '[proxy.web]\nkind = "ip-to-vsock"\nip-addr = "127.0.0.1:8080"\nvsock-addr = "88:5000"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # a wrong key
            GOOD + "colour = 1\n",
            ["f.toml:5: proxy.web.colour: not an option of ip-to-vsock (its options: "
             "backlog, connect-timeout, drain-timeout, idle-timeout, ip-addr, metrics, "
             "vsock-addr, vsock-buffer-size, vsock-uds, workers)"],
        ),
        (  # a wrong type
            GOOD + "connect-timeout = \"10\"\n",
            ["f.toml:5: proxy.web.connect-timeout: expected a number, got a string"],
        ),
        (  # a wrong value, as the flag says it
            GOOD.replace('"88:5000"', '"88-5000"'),
            ["f.toml:4: proxy.web.vsock-addr: '88-5000': invalid vsock address, should "
             "contain one colon"],
        ),
        (
            GOOD + "connect-timeout = -1\n",
            ["f.toml:5: proxy.web.connect-timeout: -1 is out of range "
             "(0.001<=SECONDS<=31536000)"],
        ),
        (  # a duplicate name
            GOOD + GOOD,
            ["f.toml:5: proxy.web: declared twice (a proxy name must be unique)"],
        ),
        (  # two proxies on one address (a wildcard covers the other)
            GOOD + GOOD.replace("web", "web2").replace("127.0.0.1", "0.0.0.0"),
            ["f.toml:5: proxy.web2: listens on tcp 0.0.0.0:8080, as proxy 'web' does: only "
             "one can"],
        ),
        (  # an unknown kind
            '[proxy.x]\nkind = "ip-to-vsok"\n',
            ["f.toml:2: proxy.x.kind: unknown kind 'ip-to-vsok' (one of: vsock-to-ip, "
             "ip-to-vsock, vsock-to-ip-transparent, ip-to-vsock-transparent, "
             "transparent-port-to-vsock, vsock-to-ip-proxy, ip-to-vsock-raw-incoming, "
             "ip-to-vsock-raw-outgoing, vsock-to-ip-raw-incoming, vsock-to-ip-raw-outgoing, "
             "udp-to-vsock, vsock-to-udp)"],
        ),
        (  # not TOML
            "[proxy.x\nkind = 1\n",
            ["f.toml:1: (syntax): not valid TOML: Expected ']' at the end of a table "
             "declaration"],
        ),
        (  # a required option missing, and a kind missing
            '[proxy.a]\nkind = "vsock-to-ip"\nvsock-addr = "88:1"\n[proxy.b]\nip-addr = "x"\n',
            ["f.toml:1: proxy.a.ip-addr: missing: vsock-to-ip needs it",
             "f.toml:4: proxy.b.kind: missing: every proxy needs a kind"],
        ),
        (  # the metrics listener on a proxy's address
            'metrics = "127.0.0.1:8080"\n' + GOOD,
            ["f.toml:1: metrics: listens on tcp 127.0.0.1:8080, as proxy 'web' does: only "
             "one can"],
        ),
        (
            "",
            ["f.toml:?: (file): no proxies to run: declare [proxy.NAME] tables, or describe "
             "the enclave's network"],
        ),
        (
            '[proxy."a b"]\nkind = "vsock-to-ip"\n',
            ["f.toml:1: proxy.a b: a proxy name is 1-64 letters, digits, '_', '.' or '-', "
             "starting with a letter or digit"],
        ),
    ],
)  # fmt: skip
def test_bad_input_names_the_line_and_the_key(text: str, expected: list[str]) -> None:
    assert errors_of(text) == expected


def test_every_error_is_listed_not_just_the_first() -> None:
    text = (
        '[proxy.a]\nkind = "vsock-to-ip"\nvsock-addr = "x"\nip-addr = "y"\n'
        "drain-timeout = true\n[proxy.b]\nkind = 7\n"
    )
    assert [line.split(": ", 2)[:2] for line in errors_of(text)] == [
        ["f.toml:3", "proxy.a.vsock-addr"],
        ["f.toml:4", "proxy.a.ip-addr"],
        ["f.toml:5", "proxy.a.drain-timeout"],
        ["f.toml:7", "proxy.b.kind"],
    ]


def test_an_unreadable_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as caught:
        config.load(tmp_path / "missing.toml")
    assert str(caught.value) == (
        f"{tmp_path}/missing.toml:?: (file): cannot be read: No such file or directory"
    )


def test_the_metrics_address_is_the_process_s() -> None:
    loaded = parse('metrics = "127.0.0.1:9100"\n' + GOOD, "f.toml")
    assert str(loaded.metrics) == "127.0.0.1:9100"
    assert errors_of('metrics = "127.0.0.1:9100"\n' + GOOD + 'metrics = "127.0.0.1:9101"\n') == [
        "f.toml:6: proxy.web.metrics: 127.0.0.1:9101 differs from the process's metrics "
        "address 127.0.0.1:9100: the process serves one /metrics"
    ]
    # given in a proxy table only, it is the process's too
    assert str(parse(GOOD + 'metrics = "127.0.0.1:9101"\n', "f.toml").metrics) == "127.0.0.1:9101"


def test_tcp_and_udp_on_one_port_do_not_collide() -> None:
    dns = '[proxy.dns]\nkind = "udp-to-vsock"\nip-addr = "127.0.0.1:8080"\nvsock-addr = "3:53"\n'
    text = GOOD + dns
    assert [spec.name for spec in parse(text, "f.toml").specs] == ["web", "dns"]


# --- a reload's diff --------------------------------------------------------------------------


def _spec(name: str, kind: str = "ip-to-vsock", **options: object) -> Spec:
    return Spec(name, kind, dict(options))


def test_diff_by_name() -> None:
    old = {"a": _spec("a", port=1), "b": _spec("b", port=2), "c": _spec("c", port=3)}
    new = {"a": _spec("a", port=1), "b": _spec("b", port=20), "d": _spec("d", port=4),
           "c2": _spec("c2", port=3)}  # fmt: skip
    changes = diff(old, new)
    assert changes.added == ["d", "c2"]
    assert changes.removed == ["c"]
    assert changes.changed == ["b"]
    assert changes.unchanged == ["a"]


def test_a_new_kind_under_an_old_name_is_a_change() -> None:
    changes = diff({"a": _spec("a", port=1)}, {"a": _spec("a", "vsock-to-ip", port=1)})
    assert (changes.changed, changes.unchanged) == (["a"], [])


def test_no_change_is_no_change() -> None:
    specs = {"a": _spec("a", port=1)}
    changes = diff(specs, dict(specs))
    assert (changes.added, changes.removed, changes.changed) == ([], [], [])


# --- one description, two sides ---------------------------------------------------------------

DESCRIPTION = """
[enclave]
cid = 88

[[ingress]]
port = 443

[[ingress]]
listen = "0.0.0.0:8080"
target = "127.0.0.1:9000"
vsock-port = 5080
name = "admin"

[egress]
ports = [80, 443, "8000-8100"]
allow = ["*.amazonaws.com", { address = "10.1.0.0/16" }, "192.0.2.0/24"]
deny = ["10.1.2.0/24"]

[dns]
upstream = "10.0.0.2:53"

[raw]
interface = "eth0"
"""


def _by_name(side: str) -> dict[str, Spec]:
    return {spec.name: spec for spec in parse(DESCRIPTION, "f.toml", side).specs}


def test_a_description_gives_each_side_its_half_on_the_same_vsock_ports() -> None:
    enclave, parent = _by_name("enclave"), _by_name("parent")
    pairs = {  # name: (enclave kind, parent kind)
        "ingress-443": ("vsock-to-ip", "ip-to-vsock"),
        "admin": ("vsock-to-ip", "ip-to-vsock"),
        "egress": ("ip-to-vsock-transparent", "vsock-to-ip-transparent"),
        "dns-udp": ("udp-to-vsock", "vsock-to-udp"),
        "dns-tcp": ("ip-to-vsock", "vsock-to-ip"),
        "raw-incoming": ("vsock-to-ip-raw-incoming", "ip-to-vsock-raw-incoming"),
        "raw-outgoing": ("ip-to-vsock-raw-outgoing", "vsock-to-ip-raw-outgoing"),
    }
    assert set(enclave) == set(parent) == set(pairs)
    for name, (enclave_kind, parent_kind) in pairs.items():
        assert (enclave[name].kind, parent[name].kind) == (enclave_kind, parent_kind)
        # one side listens on the vsock address the other connects to
        assert enclave[name].options["vsock_addr"] == parent[name].options["vsock_addr"], name
    assert str(parent["ingress-443"].options["ip_addr"]) == "0.0.0.0:443"
    assert str(enclave["ingress-443"].options["ip_addr"]) == "127.0.0.1:443"
    assert str(enclave["admin"].options["vsock_addr"]) == "88:5080"
    assert str(enclave["admin"].options["ip_addr"]) == "127.0.0.1:9000"
    assert str(enclave["egress"].options["vsock_addr"]) == "3:1201"  # raw has 1200
    policy = parent["egress"].options
    assert [str(p) for p in policy["allow_hosts"]] == ["*.amazonaws.com"]
    assert [str(n) for n in policy["allow"]] == ["10.1.0.0/16", "192.0.2.0/24"]
    assert [str(n) for n in policy["deny"]] == ["10.1.2.0/24"]
    assert policy["deny_private"] is True
    assert str(parent["dns-udp"].options["ip_addr"]) == "10.0.0.2:53"
    assert parent["raw-outgoing"].options["device"] == "eth0"


def test_each_side_s_firewall_commands() -> None:
    enclave = parse(DESCRIPTION, "f.toml", "enclave").rules
    parent = parse(DESCRIPTION, "f.toml", "parent").rules
    assert (
        "iptables -t nat -A OUTPUT -p tcp -m multiport --dports 80,443,8000:8100 "
        "-j REDIRECT --to-ports 1200"
    ) in enclave
    assert 'ip route add default dev lo src "$X"' in enclave  # raw: the enclave's address
    assert "ipset add internal 169.254.0.0/16" in enclave
    assert enclave[-1] == (
        'iptables -A OUTPUT -p tcp -s "$X" -m set --match-set portfilter src '
        "-m set ! --match-set internal dst -j NFQUEUE --queue-num 0"
    )
    assert parent == ['sysctl -w net.ipv4.ip_local_port_range="61440 65535"'] + [
        f"iptables -A INPUT -i eth0 -p tcp --dport {ports} -j NFQUEUE --queue-num 0"
        for ports in ("80", "443", "1024:61439")
    ]


def test_a_description_needs_a_side_and_says_what_is_wrong_in_it() -> None:
    assert errors_of(DESCRIPTION) == [
        "f.toml:2: (file): it describes both sides of an enclave: run it with --side "
        "enclave or --side parent"
    ]
    bad = (
        "[enclave]\ncid = \"88\"\n[[ingress]]\nname = \"x\"\n[egress]\nmode = \"vpn\"\n"
        "[dns]\nupstream = \"nowhere\"\ncolour = 1\n"
    )
    assert errors_of(bad, "parent") == [
        "f.toml:2: enclave.cid: expected an integer",
        "f.toml:3: ingress[0]: needs port, or both listen and target",
        "f.toml:6: egress.mode: must be one of: transparent, proxy",
        "f.toml:8: dns.upstream: 'nowhere': malformed address, expected IP:PORT",
        "f.toml:9: dns.colour: not a key of [dns] (its keys: listen, upstream, vsock-port, "
        "tcp-vsock-port)",
    ]


def test_proxies_beside_a_description_run_on_their_side() -> None:
    text = DESCRIPTION + (
        '[proxy.extra]\nside = "parent"\nkind = "vsock-to-ip"\nvsock-addr = "3:7000"\n'
        'ip-addr = "127.0.0.1:7000"\n'
    )
    assert "extra" in {spec.name for spec in parse(text, "f.toml", "parent").specs}
    assert "extra" not in {spec.name for spec in parse(text, "f.toml", "enclave").specs}


def test_egress_through_an_explicit_proxy() -> None:
    text = (
        "[enclave]\ncid = 88\n[egress]\nmode = \"proxy\"\n"
        'allow = ["api.example.com:443"]\n'
    )
    (enclave,) = parse(text, "f.toml", "enclave").specs
    (parent,) = parse(text, "f.toml", "parent").specs
    assert (enclave.kind, str(enclave.options["ip_addr"])) == ("ip-to-vsock", "127.0.0.1:1080")
    assert parent.kind == "vsock-to-ip-proxy"
    assert enclave.options["vsock_addr"] == parent.options["vsock_addr"]
    assert [str(p) for p in parent.options["allow_hosts"]] == ["api.example.com:443"]
    assert parse(text, "f.toml", "enclave").rules == ["ip link set lo up"]  # no REDIRECT


def test_a_hybrid_vsock_side_is_checked_as_a_whole() -> None:
    """--vsock-uds with an address hybrid vsock cannot use: the file's line, as the command's
    usage error would say it."""
    text = (
        '[proxy.guest-in]\nkind = "vsock-to-ip"\nvsock-addr = "88:5000"\n'
        'ip-addr = "127.0.0.1:80"\nvsock-uds = "/run/vm1/v.sock"\n'
    )
    assert errors_of(text) == [
        "f.toml:3: proxy.guest-in.vsock-addr: '88:5000': with --vsock-uds a listener is the host "
        "side of one VM, reached by the guest at CID 2: use 2:5000 (or 4294967295:5000)"
    ]
    fixed = parse(text.replace("88:5000", "2:5000"), "f.toml").specs[0]
    assert str(fixed.options["vsock_uds"]) == "/run/vm1/v.sock"
