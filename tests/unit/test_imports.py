"""Imports follow use: what a proxy does not use, its process does not load (each of these
costs several MiB of resident memory; benchmarks/memory.py measures them)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("prometheus_client", "dns", "pyroute2")


def _after(code: str) -> list[str]:
    """What `code`, run in a fresh interpreter, prints (split at white space)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)  # fmt: skip
    return done.stdout.split()


def _modules_after(code: str) -> set[str]:
    return set(_after(f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"))


def _loaded_after(code: str) -> set[str]:
    return {name.split(".")[0] for name in _modules_after(code)}


@pytest.mark.parametrize(
    "code",
    [
        # every kind's command and plan module, the runner and the file reader
        "import pf_proxy.cli.tcp, pf_proxy.cli.udp, pf_proxy.cli.raw, pf_proxy.cli.run, "
        "pf_proxy.runner, pf_proxy.config, pf_proxy.kinds",
        # the planes' engines, as a proxy of each kind runs them
        "import pf_proxy.tcp.engine, pf_proxy.tcp.routes, pf_proxy.udp.engine, "
        "pf_proxy.raw.forward, pf_proxy.raw.addresses, pf_proxy.metrics, pf_proxy.hybrid",
    ],
)
def test_metrics_names_and_netlink_libraries_are_not_imported_by_the_data_path(code: str) -> None:
    assert _loaded_after(code) & set(HEAVY) == set()


def test_they_are_imported_where_they_are_used() -> None:
    """The check above can fail: the same check sees them once their users are imported."""
    assert {"prometheus_client", "dns"} <= _loaded_after(
        "import pf_proxy.metrics; pf_proxy.metrics.exposition()\nimport pf_proxy.tcp.resolver"
    )


def test_binding_and_connecting_ip_literals_loads_neither_the_idna_codec_nor_random() -> None:
    """Smaller, but in every process: `random` (0.2 MiB) for the retries' jitter, and the idna
    codec with stringprep and unicodedata (0.4 MiB), which getaddrinfo() loads for a host
    given as a str, as every IP literal was."""
    loaded = _modules_after(
        "from pf_proxy.endpoints import IpEndpoint, parse_ip_address\n"
        "from pf_proxy.udp.sockets import UdpTarget, bind_udp\n"
        "for text in ('127.0.0.1:0', '[::1]:0'):\n"
        "    address = parse_ip_address(text)\n"
        "    IpEndpoint(address).listen().close()\n"
        "    bind_udp(address).close()\n"
        "    assert UdpTarget(address).literal_infos\n"
    )
    assert {"pf_proxy.udp.sockets", "pf_proxy.endpoints"} <= loaded
    assert {"random", "encodings.idna", "stringprep", "unicodedata"} & loaded == set()


def test_the_policy_sniffer_and_explicit_parser_load_only_for_the_egress_routes() -> None:
    """The modules of ip-to-vsock, vsock-to-ip, ip-to-vsock-transparent and
    transparent-port-to-vsock do not import them (about 0.3 MiB); the egress routes' module
    brings them. (test_run_file.py checks a real process serving those four kinds.)"""
    policy = {"pf_proxy.tcp.access", "pf_proxy.tcp.sniff", "pf_proxy.tcp.explicit"}
    plain = _modules_after(
        "import pf_proxy.cli.tcp, pf_proxy.kinds, pf_proxy.runner, pf_proxy.tcp.engine, "
        "pf_proxy.tcp.routes"
    )
    assert "pf_proxy.tcp.routes" in plain
    assert plain & policy == set()
    assert policy <= _modules_after("import pf_proxy.tcp.egress")


LOOP_RUNS = (
    "import asyncio, sys\n"
    "async def main() -> int:\n"
    "    return 7\n"
    "print(uvloop.__name__, uvloop.run(main()), 'ssl' in sys.modules, '_ssl' in sys.modules)\n"
    "import ssl\n"
    "print(hasattr(ssl, 'PROTOCOL_TLS_CLIENT'))\n"
)


def test_both_loops_are_imported_without_ssl_which_stays_importable() -> None:
    """Neither asyncio (imported by `import pf_proxy`) nor uvloop loads ssl (4.4 MiB), and a
    later `import ssl` (prometheus_client's, dnspython's) gets the real module."""
    printed = _after("import pf_proxy.loops as loops\nuvloop = loops.import_uvloop()\n" + LOOP_RUNS)
    assert printed == ["uvloop", "7", "False", "False", "True"]


def test_a_uvloop_that_wants_more_of_ssl_is_imported_with_the_real_one() -> None:
    """The stand-in holds what uvloop 0.23 reads; a uvloop that reads more than a stand-in
    has (here: an empty one) is imported again, whole, with the real ssl."""
    printed = _after(
        "from types import ModuleType\n"
        "import pf_proxy.loops as loops\n"
        "uvloop = loops.import_uvloop(ModuleType('ssl'))\n" + LOOP_RUNS
    )
    assert printed == ["uvloop", "7", "True", "True", "True"]


def test_a_process_that_loaded_ssl_already_gets_uvloop_as_it_is() -> None:
    printed = _after("import ssl\nimport pf_proxy.loops as loops\nuvloop = loops.import_uvloop()\n"
                     + LOOP_RUNS)  # fmt: skip
    assert printed == ["uvloop", "7", "True", "True", "True"]
