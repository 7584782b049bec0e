"""The hybrid stage's two sides of one small protocol: the guest runs what the host asks.

In the hybrid stage (`python -m tests.vsock.guest --hybrid`) the tests run on the host, and
the guest, whose vsock device is behind vhost-device-vsock, runs this agent:

    python -m tests.hybrid.agent DIR

DIR is on the results share (9p), which both sides see, and which does not depend on the
vsock under test:

    DIR/ready               written by the agent once it runs
    DIR/requests/N.json     a request from the host (written to N.tmp, then renamed)
    DIR/results/N.json      the agent's answer
    DIR/logs/N.out, N.err   the output of a process started by request N
    DIR/logs/N.exit         its exit status, once it has exited
    DIR/stop                the host is done: the agent stops what it started and exits

Requests: {"run": argv, "env": {...}, "timeout": s} -> {"returncode", "stdout", "stderr"};
{"start": argv, "env": {...}} -> {"pid"}; {"signal": pid, "signum": n} -> {}.

On the host, `GuestAgent` asks, and `GuestProcess` is a started process with the interface of
the tests' `Proxy` (its output, `wait_for`, `stop`).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.integration.helpers import Proxy

POLL = 0.02  # seconds between looks at the share, on both sides


def _write_atomically(path: Path, value: object) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(value))
    partial.rename(path)


# --- the guest's side -------------------------------------------------------------------------


class Agent:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: dict[str, subprocess.Popen[bytes]] = {}  # by request name
        for part in ("requests", "results", "logs"):
            (directory / part).mkdir(parents=True, exist_ok=True)

    def serve(self) -> None:
        (self.directory / "ready").write_text(f"{os.getpid()}\n")
        requests = self.directory / "requests"
        while not (self.directory / "stop").exists():
            for entry in sorted(requests.glob("*.json")):
                request = json.loads(entry.read_text())
                entry.unlink()
                _write_atomically(
                    self.directory / "results" / entry.name, self.answer(entry.stem, request)
                )
            self.reap()
            time.sleep(POLL)
        self.stop_all()

    def answer(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        env = {**os.environ, **request.get("env", {})}
        if "run" in request:
            try:
                done = subprocess.run(
                    request["run"], env=env, capture_output=True, text=True,
                    timeout=request.get("timeout", 60), stdin=subprocess.DEVNULL,
                )  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as exc:
                return {"returncode": -1, "stdout": "", "stderr": f"agent: {exc}"}
            return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
        if "start" in request:
            logs = self.directory / "logs"
            with open(logs / f"{name}.out", "wb") as out, open(logs / f"{name}.err", "wb") as err:
                process = subprocess.Popen(
                    request["start"], env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL
                )
            self.started[name] = process
            return {"pid": process.pid}
        if "signal" in request:
            try:
                os.kill(request["signal"], request["signum"])
            except ProcessLookupError:
                pass
            return {}
        return {"error": f"unknown request {request}"}

    def reap(self) -> None:
        for name, process in list(self.started.items()):
            if process.poll() is not None:
                _write_atomically(self.directory / "logs" / f"{name}.exit", process.returncode)
                del self.started[name]

    def stop_all(self) -> None:
        for process in self.started.values():
            process.terminate()
        for process in self.started.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


# --- the host's side --------------------------------------------------------------------------


class GuestAgent:
    """Asks the agent in the guest, through `directory` (PF_PROXY_HYBRID_AGENT)."""

    def __init__(self, directory: Path, timeout: float = 120.0) -> None:
        self.directory = directory
        self.timeout = timeout
        self._numbers = itertools.count()

    def ask(self, request: dict[str, Any], timeout: float | None = None) -> tuple[str, Any]:
        """(the request's name, the agent's answer)."""
        name = f"{os.getpid()}-{next(self._numbers):05d}"
        _write_atomically(self.directory / "requests" / f"{name}.json", request)
        answer = self.directory / "results" / f"{name}.json"
        deadline = time.monotonic() + (timeout or self.timeout)
        while not answer.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the guest's agent did not answer {request}")
            time.sleep(POLL)
        return name, json.loads(answer.read_text())

    def run(
        self, *argv: str, env: dict[str, str] | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in the guest to its end."""
        _, done = self.ask({"run": list(argv), "env": env or {}, "timeout": timeout}, timeout + 30)
        return subprocess.CompletedProcess(
            list(argv), done["returncode"], done["stdout"], done["stderr"]
        )

    def start(self, *argv: str, env: dict[str, str] | None = None) -> GuestProcess:
        name, started = self.ask({"start": list(argv), "env": env or {}})
        return GuestProcess(self, name, started["pid"], list(argv))


class _Exited:
    """What `Proxy` needs of a process: `pid` and `poll()` (from the agent's exit file)."""

    def __init__(self, exit_file: Path, pid: int) -> None:
        self.exit_file = exit_file
        self.pid = pid

    def poll(self) -> int | None:
        try:
            code: int = json.loads(self.exit_file.read_text())
        except FileNotFoundError:
            return None
        return code


class GuestProcess(Proxy):
    """A process the agent started in the guest: its output as a `Proxy`'s."""

    def __init__(self, agent: GuestAgent, name: str, pid: int, args: list[str]) -> None:
        logs = agent.directory / "logs"
        self.agent = agent
        self.args = args
        self.timeout = agent.timeout
        self.stdout_path = logs / f"{name}.out"
        self.stderr_path = logs / f"{name}.err"
        self.process = _Exited(logs / f"{name}.exit", pid)  # type: ignore[assignment]

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Send `sig`, and SIGKILL if it has not exited within `timeout`; its exit status."""
        for signum in (sig, signal.SIGKILL):
            self.agent.ask({"signal": self.process.pid, "signum": int(signum)})
            deadline = time.monotonic() + (timeout or self.timeout)
            while time.monotonic() < deadline:
                if (code := self.process.poll()) is not None:
                    return code
                time.sleep(POLL)
        raise TimeoutError(f"{self.args} did not exit in the guest, even on SIGKILL")


if __name__ == "__main__":
    Agent(Path(sys.argv[1])).serve()
