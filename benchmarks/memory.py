"""Resident memory of the proxies: one process per proxy against one `pf-proxy run` file, beside
socat and nginx, idle and after a load; and what each import costs.

    python -m benchmarks.memory [--runs N] [--output FILE]      (root: a network namespace)

Everything runs in a network namespace of its own (the raw proxies bind nfqueues and open raw
sockets; nothing touches this machine's own network): `lo`, and an `eth0` (one end of a veth
pair) with 192.0.2.1 for `vsock-to-ip-raw-outgoing`. vsock is the emulation. Bytecode is
compiled first, as a wheel's installation does (with PYTHONDONTWRITEBYTECODE, as on this
machine, every start would compile every module again, and the compiler's memory would count).

    11 processes      each of the eleven commands as its own process, the file's options
    one file          pf-proxy run with one proxy of each of the eleven kinds; and of twelve,
                      with vsock-to-ip-proxy (which loads dnspython to resolve names)
    one proxy         pf-proxy run with one ip-to-vsock; and ip-to-vsock as a command
    asyncio loop      the file of eleven and the command again, with PF_PROXY_LOOP=asyncio
                      (the standard library's loop: the memory-lean choice)
    floor             no proxy: what one imports before pf-proxy's code, a loop and a
                      listening socket, on each loop (what no proxy can go below)
    socat, nginx      one TCP -> Unix-socket relay each (socat forking per connection, nginx's
                      stream module in one process): native references

"Idle" is VmRSS 2 s after start. "After load" is VmRSS after 32 clients made short
connections through ip-to-vsock -> vsock-to-ip for 3 s and 500 connections were then held open
(measured while held), and "released" once they closed. The same run counts the short
connections per second through the pair as two commands and as two proxies of the file
(benchmarks/cpucost.py compares the CPU per operation). Medians of --runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from statistics import median

from benchmarks.cpucost import NGINX_STREAM_MODULE
from benchmarks.processes import rss_kib, tree_pss_kib
from pf_proxy.loops import LOOP_ENV
from tests.netns import Netns, netns

CHECKOUT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TCP_IN, TCP_OUT, UDP_IN = 7000, 7001, 7053  # the pair's ports, and udp-to-vsock's
ECHO_PORT = 7100
IMPORTS = [  # what a proxy may import, in the order a process imports them ("pf_proxy": the
    # package, which imports asyncio without ssl; uvloop as pf_proxy.loops imports it), then
    # ssl, which none of them loads: what its first user (a scrape, dnspython) adds
    "pf_proxy", "uvloop", "click", "pf_proxy.endpoints", "pf_proxy.runtime",
    "pf_proxy.runner", "pf_proxy.cli.options", "pf_proxy.tcp.engine", "pf_proxy.udp.engine",
    "pf_proxy.raw.forward", "ssl", "prometheus_client", "dns.asyncresolver", "pyroute2",
]  # fmt: skip

# The kinds, with the options each runs with here (file keys, as flags too): the eleven
# commands, and vsock-to-ip-proxy (EXTRA), which loads dnspython for its name lookups.
EXTRA = "vsock-to-ip-proxy"
KINDS: dict[str, dict[str, object]] = {
    "vsock-to-ip": {"vsock-addr": f"88:{TCP_OUT}", "ip-addr": f"127.0.0.1:{ECHO_PORT}"},
    "ip-to-vsock": {"ip-addr": f"127.0.0.1:{TCP_IN}", "vsock-addr": f"88:{TCP_OUT}"},
    "vsock-to-ip-transparent": {"vsock-addr": "3:1200", "deny-private": True},
    "ip-to-vsock-transparent": {"ip-addr": "127.0.0.1:1200", "vsock-addr": "3:1200"},
    "transparent-port-to-vsock": {"ip-addr": "127.0.0.1:1300", "vsock": "88"},
    "vsock-to-ip-proxy": {"vsock-addr": "3:1080", "deny-private": True},
    "udp-to-vsock": {"ip-addr": f"127.0.0.1:{UDP_IN}", "vsock-addr": "3:53"},
    "vsock-to-udp": {"vsock-addr": "3:53", "ip-addr": "127.0.0.1:5353"},
    "ip-to-vsock-raw-incoming": {"vsock-addr": "88:1201", "queue-num": 1},
    "ip-to-vsock-raw-outgoing": {"vsock-addr": "3:1201", "queue-num": 2},
    "vsock-to-ip-raw-incoming": {"vsock-addr": "88:1201", "device": "lo", "ip-file": "{ip}"},
    "vsock-to-ip-raw-outgoing": {"vsock-addr": "3:1201", "device": "eth0"},
}


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _flags(options: dict[str, object], ip_file: Path) -> list[str]:
    flags = []
    for key, value in options.items():
        if value is True:
            flags.append(f"--{key}")
        else:
            flags += [f"--{key}", str(value).replace("{ip}", str(ip_file))]
    return flags


def _toml(name: str, kind: str, options: dict[str, object], ip_file: Path) -> str:
    lines = [f"[proxy.{name}]", f'kind = "{kind}"']
    for key, value in options.items():
        shown = "true" if value is True else json.dumps(value)
        lines.append(f"{key} = {shown.replace('{ip}', str(ip_file))}")
    return "\n".join(lines) + "\n"


@contextmanager
def _started(ns: Netns, args: list[str], workdir: Path, env: dict[str, str]) -> Iterator[int]:
    """Start `args` in `ns` (output to files); its pid; SIGTERM at the end."""
    stem = workdir / f"{Path(args[0]).name}-{time.monotonic_ns()}"
    with open(stem.with_suffix(".out"), "wb") as out, open(stem.with_suffix(".err"), "wb") as err:
        proc = ns.popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                        env={**os.environ, **env})  # fmt: skip
    try:
        yield proc.pid
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(20)


def _listening(ns: Netns, port: int) -> bool:
    return f":{port} " in ns.run("ss", "-Hltn", check=False).stdout


def _wait(condition: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _client(ns: Netns, mode: str, port: int, **options: object) -> dict[str, float]:
    args = [str(BIN / "python"), "-m", "benchmarks.loadgen", mode, "--port", str(port)]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    done = ns.run(*args, check=True, timeout=120)
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def _load(ns: Netns, pids: list[int]) -> dict[str, float]:
    """The load, and the memory during and after it: rate for 3 s, then 500 connections held."""
    rate = _client(ns, "rate", TCP_IN, concurrency=32, duration=3, warmup=0)
    holder = ns.popen(
        [str(BIN / "python"), "-m", "benchmarks.loadgen", "hold", "--port", str(TCP_IN),
         "--connections", "500", "--duration", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(2.5)  # the 500 are open
    held = sum(rss_kib(pid) for pid in pids)
    holder.wait(60)
    time.sleep(1.0)
    released = sum(rss_kib(pid) for pid in pids)
    return {"held": held, "released": released, "conn_s": rate["completed"] / 3}


@contextmanager
def _namespace(workdir: Path) -> Iterator[tuple[Netns, dict[str, str], Path]]:
    with netns("pfp-mem") as ns:
        ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        ns.run("ip", "addr", "add", "192.0.2.1/24", "dev", "eth0")
        ns.run("ip", "link", "set", "eth0", "up")
        vsock = workdir / "vsock"
        vsock.mkdir(exist_ok=True)
        ip_file = workdir / "ip.txt"
        ip_file.write_text("192.0.2.1\n")
        yield ns, {"PF_PROXY_VSOCK_DIR": str(vsock)}, ip_file


def measure_once(workdir: Path) -> dict[str, dict[str, float]]:
    """One run of every set-up: name -> figures (KiB, /s, Gbit/s)."""
    found: dict[str, dict[str, float]] = {}
    with _namespace(workdir) as (ns, env, ip_file):
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        echo = [str(BIN / "python"), "-m", "benchmarks.loadgen", "echo", "--port",
                str(ECHO_PORT), "--lifetime", "600"]  # fmt: skip
        with ExitStack() as stack:
            stack.enter_context(_started(ns, echo, workdir, {"PYTHONPATH": str(CHECKOUT)}))
            _wait(lambda: _listening(ns, ECHO_PORT), "the echo server")

            pids = {
                kind: stack.enter_context(
                    _started(ns, [str(BIN / kind), *_flags(options, ip_file)], workdir, env)
                )
                for kind, options in KINDS.items()
            }
            _wait(lambda: _listening(ns, TCP_IN), "ip-to-vsock")
            time.sleep(2.0)
            each = {kind: rss_kib(pid) for kind, pid in pids.items()}
            others = sum(kib for kind, kib in each.items()
                         if kind not in ("ip-to-vsock", "vsock-to-ip", EXTRA))  # fmt: skip
            loaded = _load(ns, [pids["ip-to-vsock"], pids["vsock-to-ip"]])
            found["11 processes"] = {
                "idle": sum(kib for kind, kib in each.items() if kind != EXTRA),
                **{f"idle {kind}": kib for kind, kib in each.items()},
                **loaded,
                "held": loaded["held"] + others,
                "released": loaded["released"] + others,
            }

        eleven = [kind for kind in KINDS if kind != EXTRA]
        for name, kinds, loop in (
            ("one file, the 11 kinds", eleven, "uvloop"),
            ("one file, 12 kinds", list(KINDS), "uvloop"),
            ("one proxy (file)", ["ip-to-vsock"], "uvloop"),
            ("one file, the 11 kinds, asyncio loop", eleven, "asyncio"),
        ):
            file = workdir / f"{name.replace(' ', '-')}.toml"
            file.write_text("".join(_toml(f"p{n}", kind, KINDS[kind], ip_file)
                                    for n, kind in enumerate(kinds)))  # fmt: skip
            with ExitStack() as stack:
                stack.enter_context(_started(ns, echo, workdir, {"PYTHONPATH": str(CHECKOUT)}))
                _wait(lambda: _listening(ns, ECHO_PORT), "the echo server")
                if "vsock-to-ip" not in kinds:  # the pair's other half, as a command
                    stack.enter_context(_started(
                        ns, [str(BIN / "vsock-to-ip"), *_flags(KINDS["vsock-to-ip"], ip_file)],
                        workdir, env))  # fmt: skip
                pid = stack.enter_context(_started(
                    ns, [str(BIN / "pf-proxy"), "run", str(file)], workdir,
                    {**env, LOOP_ENV: loop}))  # fmt: skip
                _wait(lambda: _listening(ns, TCP_IN), name)
                time.sleep(2.0)
                found[name] = {"idle": rss_kib(pid), **_load(ns, [pid])}

        for name, loop in (("one proxy (command)", "uvloop"),
                           ("one proxy (command), asyncio loop", "asyncio")):  # fmt: skip
            with ExitStack() as stack:
                pid = stack.enter_context(_started(
                    ns, [str(BIN / "ip-to-vsock"), *_flags(KINDS["ip-to-vsock"], ip_file)],
                    workdir, {**env, LOOP_ENV: loop}))  # fmt: skip
                _wait(lambda: _listening(ns, TCP_IN), "ip-to-vsock")
                time.sleep(2.0)
                found[name] = {"idle": rss_kib(pid)}

        for name, args in _references(workdir):
            with _started(ns, args, workdir, {}) as pid:
                _wait(lambda: _listening(ns, TCP_IN), name)
                time.sleep(1.0)
                found[name] = {"idle": tree_pss_kib(pid) if name == "socat" else rss_kib(pid)}
    return found


def _references(workdir: Path) -> list[tuple[str, list[str]]]:
    target = workdir / "vsock" / f"88_{TCP_OUT}.sock"
    references = [("socat", ["socat", f"TCP-LISTEN:{TCP_IN},bind=127.0.0.1,reuseaddr,fork",
                             f"UNIX-CONNECT:{target}"])]  # fmt: skip
    if Path(NGINX_STREAM_MODULE).exists():
        config = workdir / "nginx.conf"
        config.write_text(
            f"load_module {NGINX_STREAM_MODULE};\ndaemon off;\nmaster_process off;\n"
            f"worker_processes 1;\npid {workdir}/nginx.pid;\nerror_log {workdir}/nginx.log;\n"
            "events { worker_connections 1024; }\n"
            f"stream {{ server {{ listen 127.0.0.1:{TCP_IN}; proxy_pass unix:{target}; }} }}\n"
        )
        references.append(("nginx", ["nginx", "-p", str(workdir), "-c", str(config)]))
    return references


def import_costs() -> list[tuple[str, float]]:
    """What each import adds to a fresh interpreter's resident memory, in this order (MiB)."""
    script = (
        "import importlib, sys\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS'): return int(line.split()[1]) / 1024\n"
        "print('start', rss())\n"
        "for name in sys.argv[1:]:\n"
        "    before = rss()\n"
        "    if name == 'uvloop': importlib.import_module('pf_proxy.loops').import_uvloop()\n"
        "    else: importlib.import_module(name)\n"
        "    print(name, rss() - before)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-c", script, *IMPORTS], capture_output=True,
                          text=True, env=env, check=True)  # fmt: skip
    return [(line.split()[0], float(line.split()[1])) for line in done.stdout.splitlines()]


FLOOR_SCRIPT = """
import sys
import pf_proxy.loops  # asyncio, and uvloop below, imported as a proxy imports them: no ssl
import asyncio
new_loop = asyncio.new_event_loop
if sys.argv[1] == "uvloop":
    new_loop = pf_proxy.loops.import_uvloop().new_event_loop
import click, logging, socket

async def serve():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    await asyncio.get_running_loop().create_server(asyncio.Protocol, sock=listener)
    await asyncio.sleep(0.5)

new_loop().run_until_complete(serve())
for line in open("/proc/self/status"):
    if line.startswith("VmRSS"):
        print(int(line.split()[1]))
"""


def floor_kib(loop: str) -> int:
    """A process with what a proxy imports before any of pf-proxy's code (click, asyncio and
    on uvloop uvloop, imported without ssl as pf_proxy.loops does), a loop and one listening
    socket: no proxy on that loop can take less."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-c", FLOOR_SCRIPT, loop], capture_output=True,
                          text=True, env=env, check=True)  # fmt: skip
    return int(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    os.environ["PYTHONPATH"] = str(CHECKOUT)  # benchmarks.loadgen, run in the namespace
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(CHECKOUT / "src")],
                   check=True, env={k: v for k, v in os.environ.items()
                                    if k != "PYTHONDONTWRITEBYTECODE"})  # fmt: skip
    runs: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="pfp-mem-") as name:
        for run in range(args.runs):
            runs.append(measure_once(Path(name)))
            _progress(f"run {run + 1}: " + ", ".join(
                f"{k} {v['idle'] / 1024:.1f} MiB" for k, v in runs[-1].items()))  # fmt: skip

    def med(setup: str, figure: str) -> float:
        return median(run[setup][figure] for run in runs if figure in run[setup])

    mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731
    lines = [
        f"Resident memory (VmRSS, MiB; socat: PSS of it and its children), medians of "
        f"{args.runs}; python -m benchmarks.memory",
        "",
        "| set-up | processes | idle | 500 connections held | after they closed |",
        "|---|---:|---:|---:|---:|",
    ]
    for setup, count in (
        ("11 processes", 11),
        ("one file, the 11 kinds", 1),
        ("one file, 12 kinds", 1),
        ("one proxy (file)", 1),
        ("one file, the 11 kinds, asyncio loop", 1),
    ):
        held = mib(med(setup, "held")) if setup != "one proxy (file)" else "-"
        lines.append(f"| {setup} | {count} | {mib(med(setup, 'idle'))} | {held} "
                     f"| {mib(med(setup, 'released')) if held != '-' else '-'} |")  # fmt: skip
    for setup in ("one proxy (command)", "one proxy (command), asyncio loop", "socat", "nginx"):
        if all(setup in run for run in runs):
            lines.append(f"| {setup} | 1 | {mib(med(setup, 'idle'))} | | |")
    lines += ["", "Each kind as its own process, idle:", ""]
    lines += [f"- {kind}: {mib(med('11 processes', f'idle {kind}'))} MiB" for kind in KINDS]
    lines += ["", "The data path, in the same runs (ip-to-vsock -> vsock-to-ip):", "",
              "| set-up | short connections/s |", "|---|---:|"]  # fmt: skip
    for setup in ("11 processes", "one file, the 11 kinds", "one file, the 11 kinds, asyncio loop"):
        lines.append(f"| {setup} | {med(setup, 'conn_s'):,.0f} |")
    lines += ["", "The floor: the interpreter, click and the loop's imports, a loop and one "
              "listening socket, none of pf-proxy (median of 3):", ""]  # fmt: skip
    for loop in ("uvloop", "asyncio"):
        lines.append(f"- {loop}: {mib(median(floor_kib(loop) for _ in range(3)))} MiB")
    lines += ["", "What each import adds to a fresh interpreter (MiB, in this order):", ""]
    said = {"pf_proxy": "pf_proxy (asyncio, without ssl)", "uvloop": "uvloop (ssl's stand-in)"}
    lines += [f"- {said.get(name, name)}: {cost:+.2f}" for name, cost in import_costs()]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
