"""The command reference and the man pages say what each real console script's --help says.

For every console script in pyproject.toml (and every subcommand a group lists), the script
itself is run with --help in an 80-column terminal, and its usage line, description, options
(flags and metavar, help text, click's default, range and required notes) and subcommands are
read from that output. The reference page that scripts/reference.py generates for the docs
site, and the man page it generates for `make man` (rendered by groff, as man does), must say
the same: nothing missing, nothing extra, nothing different.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest

from scripts import reference

SCRIPTS = list(reference.console_scripts())
BIN = Path(sys.executable).parent


_WRAPPED_AT_HYPHEN = re.compile(r"(?<=[a-z])- (?=[a-z])")


def _normal(text: str) -> str:
    """Whitespace as one space; a word click wrapped at its hyphen (--deny-\nprivate) whole."""
    return _WRAPPED_AT_HYPHEN.sub("-", " ".join(text.split()))


@dataclass
class Help:
    """What one --help output says."""

    usage: str
    description: str
    options: dict[str, str] = field(default_factory=dict)  # spec -> help text with extras
    commands: list[str] = field(default_factory=list)


_ENTRY = re.compile(r"^  (\S(?:\S| (?! ))*)(?: {2,}(.*))?$")


def parse_help(text: str) -> Help:
    """Parse click's --help layout: Usage, description, then Options: and Commands:."""
    lines = text.splitlines()
    assert lines[0].startswith("Usage: "), text
    usage = lines[0].removeprefix("Usage: ").strip()
    index = 1
    while index < len(lines) and lines[index].startswith(" " * 7):  # a wrapped usage line
        usage += " " + lines[index].strip()
        index += 1
    description: list[str] = []
    sections: dict[str, list[tuple[str, list[str]]]] = {}
    current: list[tuple[str, list[str]]] | None = None
    for line in lines[index:]:
        if line and not line.startswith(" ") and line.endswith(":"):
            current = sections.setdefault(line[:-1], [])
            continue
        if current is None:
            description.append(line)
            continue
        if not line.strip():
            continue
        entry = _ENTRY.match(line)
        if entry and not line.startswith("   "):
            current.append((entry.group(1), [entry.group(2) or ""]))
        else:
            assert current, f"a continuation line before any entry: {line!r}"
            current[-1][1].append(line.strip())
    assert set(sections) <= {"Options", "Commands"}, sections.keys()
    return Help(
        usage=_normal(usage),
        description=_normal(" ".join(description)),
        options={spec: _normal(" ".join(rest)) for spec, rest in sections.get("Options", [])},
        commands=[name for name, _ in sections.get("Commands", [])],
    )


def run_help(*command: str) -> str:
    script = BIN / command[0]
    assert script.exists(), f"{script}: the console script is not installed (make installs it)"
    result = subprocess.run(
        [str(script), *command[1:], "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def real_helps(script: str) -> dict[tuple[str, ...], Help]:
    """--help of `script` and of each subcommand its help lists (recursively), by path."""
    found: dict[tuple[str, ...], Help] = {}
    pending = [(script,)]
    while pending:
        path = pending.pop(0)
        found[path] = parse_help(run_help(*path))
        pending += [(*path, name) for name in found[path].commands]
    return found


# --- the reference page, read back ----------------------------------------------------------

_MARKDOWN_ESCAPE = re.compile(r"\\([\\`*_\[\]#|])")
_FACT = re.compile(
    r"(Flag|Repeatable|Required|(Type|Default|Range|Environment variable): `([^`]*)`)\."
)
_EXTRAS_ORDER = (
    ("Environment variable", "env var: {}"),
    ("Default", "default: {}"),
    ("Range", "{}"),
)


def _plain(markdown: str) -> str:
    return html.unescape(_MARKDOWN_ESCAPE.sub(r"\1", markdown))


def _with_extras(help_text: str, facts_line: str) -> str:
    """The option's help as --help prints it: the help, then click's notes in brackets."""
    facts = {m.group(2) or m.group(1): m.group(3) for m in _FACT.finditer(facts_line)}
    assert _normal(_FACT.sub("", facts_line)) == "", f"not a facts line: {facts_line!r}"
    notes = [form.format(facts[name]) for name, form in _EXTRAS_ORDER if name in facts]
    if "Required" in facts:
        notes.append("required")
    extras = f"[{'; '.join(notes)}]" if notes else ""
    return _normal(f"{help_text} {extras}")


def page_helps(page: str, script: str) -> dict[tuple[str, ...], Help]:
    """What a generated reference page says, per command path, in --help's terms."""
    found: dict[tuple[str, ...], Help] = {}
    path: tuple[str, ...] = (script,)
    block: list[str] = []  # the paragraphs since the last heading
    option: str | None = None
    in_code = False
    usage_next = False

    def flush_option() -> None:
        if option is not None:
            assert block, f"{script}: option {option} has no facts line"
            found[path].options[option] = _with_extras(_plain(" ".join(block[:-1])), block[-1])

    for line in page.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            usage_next = in_code and not found[path].usage
            continue
        if in_code:
            if usage_next:
                found[path].usage = _normal(line)
                found[path].description = _normal(_plain(" ".join(block)))
                block, usage_next = [], False
            continue
        heading = re.match(r"^(#+) (.*?)(?: \{#[^}]*\})?$", line)
        if heading:
            flush_option()
            block, option = [], None
            level, title = len(heading.group(1)), heading.group(2)
            if level == 1:
                assert title == script
                found[path] = Help(usage="", description="")
            elif re.fullmatch(r"`[^`]+`", title) and title[1:-1].startswith(f"{script} "):
                path = tuple(title[1:-1].split(" "))
                found[path] = Help(usage="", description="")
            elif title.startswith("`"):
                option = title.strip("`")
            continue
        if line.startswith("| [`"):
            found[path].commands.append(line.split("`")[1].split(" ")[-1])
        elif line.strip() and not line.startswith(("<!--", "|")):
            block.append(line.strip())
    flush_option()
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_reference_page_says_what_help_says(script: str) -> None:
    page = reference.markdown_page(
        reference.describe(reference.load_command(reference.console_scripts()[script]), script)
    )
    real = real_helps(script)
    documented = page_helps(page, script)
    assert sorted(documented) == sorted(real), "commands on the page and in --help differ"
    for path, help_ in real.items():
        doc = documented[path]
        name = " ".join(path)
        assert doc.usage == help_.usage, f"{name}: usage"
        assert doc.description == help_.description, f"{name}: description"
        assert list(doc.options) == list(help_.options), f"{name}: options"
        for spec, text in help_.options.items():
            assert doc.options[spec] == text, f"{name} {spec}"
        assert doc.commands == help_.commands, f"{name}: subcommands"


def test_every_console_script_gets_a_page_in_the_nav() -> None:
    """The hook puts a page per [project.scripts] entry after reference/index.md."""

    class Config:
        def __init__(self) -> None:
            self.nav = [{"Home": "index.md"}, {"Command reference": ["reference/index.md"]}]

    config = Config()
    reference.on_config(config)
    assert config.nav[1]["Command reference"] == [
        "reference/index.md",
        *({name: f"reference/{name}.md"} for name in SCRIPTS),
    ]


# --- the man pages --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def man_pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`make man`'s pages, written by the same code into a fresh directory."""
    directory = tmp_path_factory.mktemp("man")
    written = reference.write_man_pages(directory)
    return {path.stem: path for path in written}


def render_man(path: Path) -> str:
    """The page as man shows it (groff's man macros, plain text, no warnings allowed)."""
    groff = shutil.which("groff")
    assert groff, "groff is needed to render man pages (Debian: groff-base, installed by make)"
    result = subprocess.run(
        [groff, "-man", "-Tascii", "-ww", "-rLL=300n", "-P-c", "-P-b", "-P-u", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
    return _normal(result.stdout)


def _model_options(doc: reference.CommandDoc) -> dict[str, reference.OptionDoc]:
    found = {option.spec: option for option in doc.options}
    for sub in doc.subcommands:
        found.update(_model_options(sub))
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_man_page_says_what_help_says(script: str, man_pages: dict[str, Path]) -> None:
    assert set(man_pages) == set(SCRIPTS)
    text = render_man(man_pages[script])
    # click's notes (default, range, required) are checked against --help by the page test;
    # here they must be in the man page as the model words them
    model = _model_options(
        reference.describe(reference.load_command(reference.console_scripts()[script]), script)
    )
    for path, help_ in real_helps(script).items():
        name = " ".join(path)
        assert help_.usage in text, f"{name}: usage"
        assert help_.description in text, f"{name}: description"
        for spec in help_.options:
            assert spec in text, f"{name}: {spec}"
            option = model[spec]
            assert _normal(option.help) in text, f"{name} {spec}: help text"
            assert reference.option_facts(option).replace("`", "") in text, f"{name} {spec}"
        for command in help_.commands:
            assert f"{name} {command}" in text, f"{name}: subcommand {command}"


# --- a click group, as the next console scripts will have ------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True, help="Say more.")
def _group() -> None:
    """Run proxies from a file."""


@_group.command(name="run")
@click.argument("file", type=click.Path())
@click.option("--only", multiple=True, metavar="NAME", help="Start only these <proxies>.")
@click.option(
    "--grace",
    type=click.FloatRange(0, 60),
    default=5.0,
    show_default=True,
    help="Seconds to drain.",
)
def _run(file: str, only: tuple[str, ...], grace: float) -> None:
    """Start every proxy FILE describes; SIGHUP reloads it."""


@_group.command(name="check")
@click.argument("file")
def _check(file: str) -> None:
    """Check FILE and say what it would start."""


def _in_process_helps(group: click.Group, name: str) -> dict[tuple[str, ...], Help]:
    ctx = click.Context(group, info_name=name, terminal_width=78, **group.context_settings)
    found = {(name,): parse_help(group.get_help(ctx))}
    for sub_name in group.list_commands(ctx):
        sub = group.get_command(ctx, sub_name)
        assert sub is not None
        sub_ctx = click.Context(
            sub, info_name=sub_name, parent=ctx, terminal_width=78, **sub.context_settings
        )
        found[(name, sub_name)] = parse_help(sub.get_help(sub_ctx))
    return found


def test_a_group_and_its_subcommands_are_documented() -> None:
    """A group's page has the group's options, its commands, and each subcommand's usage
    (arguments included) and options, as their --help has them."""
    page = reference.markdown_page(reference.describe(_group, "demo"))
    documented = page_helps(page, "demo")
    real = _in_process_helps(_group, "demo")
    assert sorted(documented) == sorted(real) == [("demo",), ("demo", "check"), ("demo", "run")]
    for path, help_ in real.items():
        assert documented[path] == help_, path
    assert "{#run-only}" in page and "{#run-grace}" in page  # anchors do not collide
