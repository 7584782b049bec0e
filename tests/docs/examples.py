"""The fenced code blocks of the docs (README.md and docs/), and how their examples are run.

The rule (docs/development/docs.md): every fenced block says what it is (```text, ```yaml,
```sh, ...). A block of shell commands (sh, bash, shell, console) is either run by
tests/docs/test_examples.py as written, said by the line before it:

    <!-- run -->

or said not to be, with the reason:

    <!-- not run: it needs an enclave -->

A block that is run is a console transcript: `$ command` lines (a line ending in `\\` goes on
to the next), each followed by the output it must print (stdout and stderr together). In the
output, a line `...` stands for any number of lines and `...` inside a line for any text. A
command must exit 0 unless the next command is `echo $?`, whose output then shows the status.
A command ending in `&` runs in the background; what it prints is not compared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_LANGUAGES = {"sh", "bash", "shell", "console"}
MARKER = re.compile(r"^<!-- (run|not run: (?P<why>.*\S)) -->$")
ANY_MARKER = re.compile(r"^<!-- (run|not run)\b")
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, from 1
    language: str
    text: str
    marker: str | None  # "run", "not run: why", or None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES


def read_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown file, and the problems found on the way (a marker
    that no block follows, a fence never closed)."""
    blocks: list[Block] = []
    problems: list[str] = []
    lines = path.read_text().splitlines()
    pending: tuple[int, str] | None = None  # a marker waiting for its block
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        fence = _FENCE.match(line)
        if fence:
            start = index + 1
            indent, ticks = len(fence["indent"]), fence["fence"]
            body: list[str] = []
            index += 1
            while index < len(lines) and lines[index].strip() != ticks:
                body.append(lines[index][indent:])
                index += 1
            if index == len(lines):
                problems.append(f"{path.relative_to(ROOT)}:{len(lines)}: a fence never closed")
            marker = pending[1] if pending else None
            language = fence["info"].strip().split(" ")[0]
            blocks.append(Block(path, start, language, "\n".join(body), marker))
            pending = None
        elif ANY_MARKER.match(stripped):
            if pending:
                problems.append(f"{path.relative_to(ROOT)}:{pending[0]}: a marker with no block")
            if not MARKER.match(stripped):
                problems.append(f"{path.relative_to(ROOT)}:{index + 1}: malformed {stripped!r}")
            pending = (index + 1, stripped[5:-4])
        elif stripped and pending:
            problems.append(f"{path.relative_to(ROOT)}:{pending[0]}: a marker with no block")
            pending = None
        index += 1
    if pending:
        problems.append(f"{path.relative_to(ROOT)}:{pending[0]}: a marker with no block")
    return blocks, problems


def all_blocks() -> tuple[list[Block], list[str]]:
    blocks: list[Block] = []
    problems: list[str] = []
    for path in DOC_FILES:
        found, trouble = read_blocks(path)
        blocks += found
        problems += trouble
    return blocks, problems


@dataclass(frozen=True)
class Step:
    command: str  # as bash reads it (continuation lines joined with their newlines)
    expected: list[str]  # output lines, `...` wildcards allowed

    @property
    def background(self) -> bool:
        return bool(re.search(r"(?<!&)&\s*$", self.command))


_HEREDOC = re.compile(r"<<-?\s*'?([A-Za-z_]+)'?\s*$")


def transcript(text: str) -> list[Step]:
    """The `$ command` / output steps of a console block."""
    steps: list[Step] = []
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.startswith("$ "):
            if steps:
                steps[-1].expected.append(line.rstrip())
            elif line.strip():
                raise ValueError(f"output before the first command: {line!r}")
            index += 1
            continue
        command = [line[2:]]
        while command[-1].endswith("\\") and index + 1 < len(lines):
            index += 1
            command.append(lines[index])
        heredoc = _HEREDOC.search(command[-1])
        if heredoc:  # the document's lines follow, each after bash's "> " prompt
            while index + 1 < len(lines) and lines[index + 1].startswith(">"):
                index += 1
                command.append(lines[index][2:])
                if command[-1] == heredoc.group(1):
                    break
        steps.append(Step("\n".join(command), []))
        index += 1
    for step in steps:
        while step.expected and not step.expected[-1]:
            step.expected.pop()
    return steps


def line_matches(expected: str, actual: str) -> bool:
    parts = [re.escape(part) for part in expected.split("...")]
    return re.fullmatch(".*".join(parts), actual, re.DOTALL) is not None


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """Whether `actual` lines fit `expected`, where a line `...` is any number of lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(output_matches(expected[1:], actual[skip:]) for skip in range(len(actual) + 1))
    return (
        bool(actual)
        and line_matches(expected[0], actual[0])
        and output_matches(expected[1:], actual[1:])
    )
