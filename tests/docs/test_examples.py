"""Every example command in README.md and docs/ is run here as written, or marked as not run.

tests/docs/examples.py has the rule and the transcript format. A block marked `<!-- run -->`
runs as one bash script in a network namespace made for it (so its fixed ports and any
address or firewall rule it adds stay there), in a fresh directory (a block that runs `make`:
in the checkout, where its Makefile is), with the virtualenv's console scripts first on PATH,
TMPDIR and PF_PROXY_VSOCK_DIR in a fresh directory (vsock is always emulated here) and an
80-column terminal. Whatever it started is stopped when it ends.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.reference import console_scripts
from tests.docs.examples import (
    ROOT,
    Block,
    Step,
    all_blocks,
    output_matches,
    transcript,
)
from tests.netns import netns
from tests.vsocks import SLOWDOWN

BLOCKS, PROBLEMS = all_blocks()
RUN = [block for block in BLOCKS if block.marker == "run"]
BIN = Path(sys.executable).parent
BLOCK_TIMEOUT = 120 * SLOWDOWN
# What `make test` puts in the environment: a `make` in an example would then print
# "make[1]: Entering directory ...", which a reader's terminal does not.
_MAKE_VARIABLES = {
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
    "MAKEOVERRIDES",
    "MAKE_TERMOUT",
    "MAKE_TERMERR",
}

# First words that say "this line is a command": outside a shell block, they need one.
COMMAND_WORDS = {
    *console_scripts(),
    "make",
    "pip",
    "sudo",
    "iptables",
    "ip6tables",
    "ipset",
    "curl",
    "dig",
    "systemctl",
    "python",
    "python3",
    "export",
    "socat",
}


def _looks_like_commands(text: str) -> bool:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return bool(lines) and (
        lines[0].startswith("$ ") or any(line.split()[0] in COMMAND_WORDS for line in lines)
    )


def test_every_block_says_what_it_is() -> None:
    """Every fenced block has a language; every block of shell commands is run here or
    marked not run, with the reason; nothing else holds commands."""
    problems = list(PROBLEMS)
    for block in BLOCKS:
        if not block.language:
            problems.append(f"{block.where}: give the block a language (text, sh, console, ...)")
        elif block.is_shell and block.marker is None:
            problems.append(
                f"{block.where}: shell commands: mark them <!-- run --> (a console transcript "
                "the tests run) or <!-- not run: why -->"
            )
        elif block.marker == "run" and block.language != "console":
            problems.append(f"{block.where}: a block that is run must be a console transcript")
        elif block.marker is not None and not block.is_shell:
            problems.append(f"{block.where}: a marker on a {block.language} block")
        elif not block.is_shell and _looks_like_commands(block.text):
            problems.append(f"{block.where}: commands in a {block.language} block: use sh")
    assert not problems, "\n".join(problems)


def test_some_examples_are_run() -> None:
    """The rule has teeth only if examples are run: the README's two-minute one above all."""
    assert any(block.path.name == "README.md" for block in RUN)


def _script(steps: list[Step], background_log: Path) -> str:
    """The transcript as bash: each command, then a line with its exit status."""
    lines = ["exec 2>&1"]
    for number, step in enumerate(steps):
        command = step.command
        if step.background:
            assert not step.expected, f"a background command shows no output: {command!r}"
            command = re.sub(r"&\s*$", f">>{shlex.quote(str(background_log))} 2>&1 &", command)
        lines += [
            command,
            f"__status=$?; printf '\\n@@pf-docs {number} %d@@\\n' \"$__status\"; "
            '(exit "$__status")',
        ]
    return "\n".join(lines) + "\n"


def _results(output: str) -> list[tuple[list[str], int]]:
    """Each command's output lines and exit status, from the script's output."""
    parts = re.split(r"\n@@pf-docs \d+ (\d+)@@\n", output)
    results = []
    for index in range(0, len(parts) - 1, 2):
        results.append(
            ([line.rstrip() for line in parts[index].splitlines()], int(parts[index + 1]))
        )
    return results


def _stop_group(process: subprocess.Popen[str]) -> None:
    """Stop what the block started: its session's process group (its id is ours)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.root
@pytest.mark.parametrize("block", RUN, ids=lambda block: block.where)
def test_example_runs_as_written(block: Block, tmp_path: Path) -> None:
    steps = transcript(block.text)
    assert steps, f"{block.where}: no `$ ` command in a block marked run"
    background_log = tmp_path / "background.log"
    script = tmp_path / "example.sh"
    script.write_text(_script(steps, background_log))
    (tmp_path / "vsock").mkdir()
    uses_make = any(step.command.split()[0] == "make" for step in steps)
    work = ROOT if uses_make else tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {
        **{name: value for name, value in os.environ.items() if name not in _MAKE_VARIABLES},
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "TMPDIR": str(tmp_path),
        "PF_PROXY_VSOCK_DIR": str(tmp_path / "vsock"),
        "COLUMNS": "80",
    }
    with netns("pfp-docs") as ns:
        process = subprocess.Popen(
            ns.command(["bash", str(script)]),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=work,
            env=env,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=BLOCK_TIMEOUT)
        finally:
            _stop_group(process)
    background = background_log.read_text() if background_log.exists() else ""
    results = _results(output)
    context = f"\n--- output ---\n{output}\n--- background commands ---\n{background}"
    assert len(results) == len(steps), f"{block.where}: the script stopped early{context}"
    for number, (step, (actual, status)) in enumerate(zip(steps, results, strict=True)):
        checked_by_next = number + 1 < len(steps) and steps[number + 1].command == "echo $?"
        assert status == 0 or checked_by_next, (
            f"{block.where}: `{step.command}` exited {status}{context}"
        )
        if not step.background:
            assert output_matches(step.expected, actual), (
                f"{block.where}: `{step.command}` printed\n"
                + "\n".join(actual)
                + "\n--- expected ---\n"
                + "\n".join(step.expected)
                + context
            )


def test_the_readmes_links_lead_somewhere() -> None:
    """README.md is not part of the site, so mkdocs does not check its links: every relative
    link must name a file of the checkout (and a page's anchor is the site's business)."""
    readme = ROOT / "README.md"
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme.read_text())
    relative = [target for target in targets if "://" not in target]
    assert relative, "the README links into docs/"
    missing = [target for target in relative if not (ROOT / target).exists()]
    assert not missing, missing
