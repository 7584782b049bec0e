"""The command reference and the man pages, generated from the click commands.

Every console script in pyproject.toml's [project.scripts] is imported and walked (a click
group with its subcommands too) into a `CommandDoc`: usage, help text, and each option as
`--help` shows it (flags and metavar, type, help text, and click's own default, range and
required notes). Two renderings come from that one model:

- a Markdown page per console script, added to the docs site while mkdocs builds it (this file
  is an mkdocs hook, see mkdocs.yml): nothing generated is committed, so the reference cannot
  fall behind the code, and a new console script gets its page and its nav entry by itself;
- a man page per console script: `python scripts/reference.py man DIR` (what `make man` runs)
  writes DIR/man1/<script>.1.

tests/docs/test_reference.py runs each real console script's `--help` and checks that its
page and its man page say the same.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
REFERENCE_DIR = "reference"  # in docs/: index.md is written by hand, the rest generated
COMMANDS_PLACEHOLDER = "<!-- commands -->"  # in reference/index.md: the table of commands
HELP_WIDTH = 78  # what click formats --help to in an 80-column terminal


@dataclass(frozen=True)
class OptionDoc:
    spec: str  # the left column of --help: "-v, --vsock-addr CID:PORT"
    anchor: str  # "vsock-addr" (a subcommand's: "run-vsock-addr")
    help: str
    type_name: str  # click's name for the type: "seconds", "CID:PORT", "boolean"
    is_flag: bool
    multiple: bool
    extras: dict[str, str]  # click's notes: default, range, required, envvars


@dataclass(frozen=True)
class CommandDoc:
    path: tuple[str, ...]  # ("vsock-to-ip",) or ("pf-proxy", "run")
    usage: str  # "vsock-to-ip [OPTIONS]"
    help: str
    short_help: str
    epilog: str
    options: tuple[OptionDoc, ...]
    arguments: tuple[str, ...]  # metavars of positional arguments, as in the usage line
    subcommands: tuple[CommandDoc, ...] = field(default=())

    @property
    def name(self) -> str:
        return " ".join(self.path)


def console_scripts() -> dict[str, str]:
    """[project.scripts]: console script name -> "module:attribute", in file order."""
    with PYPROJECT.open("rb") as file:
        scripts: dict[str, str] = tomllib.load(file)["project"]["scripts"]
    return scripts


def load_command(target: str) -> click.Command:
    module_name, _, attribute = target.partition(":")
    value: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    if not isinstance(value, click.Command):
        raise TypeError(f"{target} is not a click command")
    return value


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    # The command's own context settings (-h as well as --help), as when it runs.
    settings = {**command.context_settings, "terminal_width": HELP_WIDTH}
    return click.Context(command, info_name=name, parent=parent, **settings)


def _help_text(text: str | None) -> str:
    """A help text as click uses it: dedented, cut at \\f."""
    return inspect.cleandoc(text or "").split("\f", 1)[0].strip()


def describe(command: click.Command, name: str, parent: click.Context | None = None) -> CommandDoc:
    """The model of `command` (run as `name`) and its subcommands, from click itself."""
    ctx = _context(command, name, parent)
    path = tuple(ctx.command_path.split(" "))
    prefix = "-".join(path[1:])
    options: list[OptionDoc] = []
    arguments: list[str] = []
    for param in command.get_params(ctx):
        if isinstance(param, click.Argument):
            arguments.append(param.make_metavar(ctx))
            continue
        if not isinstance(param, click.Option):
            continue
        record = param.get_help_record(ctx)
        if record is None:  # hidden
            continue
        longest = max(param.opts + param.secondary_opts, key=len).lstrip("-")
        options.append(
            OptionDoc(
                spec=record[0],
                anchor=f"{prefix}-{longest}" if prefix else longest,
                help=_help_text(param.help),
                type_name=param.type.name,
                is_flag=param.is_flag,
                multiple=param.multiple,
                extras={
                    key: _extra_text(value) for key, value in param.get_help_extra(ctx).items()
                },
            )
        )
    subcommands: list[CommandDoc] = []
    if isinstance(command, click.Group):
        for sub_name in command.list_commands(ctx):
            sub = command.get_command(ctx, sub_name)
            if sub is not None and not sub.hidden:
                subcommands.append(describe(sub, sub_name, ctx))
    return CommandDoc(
        path=path,
        usage=" ".join([ctx.command_path, *command.collect_usage_pieces(ctx)]),
        help=_help_text(command.help),
        short_help=command.get_short_help_str(limit=200),
        epilog=_help_text(command.epilog),
        options=tuple(options),
        arguments=tuple(arguments),
        subcommands=tuple(subcommands),
    )


def _extra_text(value: Any) -> str:
    return ", ".join(value) if isinstance(value, (list, tuple)) else str(value)


def command_docs() -> Iterator[CommandDoc]:
    """Every console script's model, in pyproject.toml's order."""
    for name, target in console_scripts().items():
        yield describe(load_command(target), name)


# --- Markdown -------------------------------------------------------------------------------

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]#|])")


def markdown_text(text: str) -> str:
    """Plain text as Markdown that shows exactly that text."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _paragraphs(text: str) -> Iterator[str]:
    """click's help paragraphs: a paragraph after a line holding only \\b keeps its lines."""
    for block in re.split(r"\n\s*\n", text):
        if block.startswith("\b\n"):
            yield "```text\n" + block[2:] + "\n```"
        elif block.strip():
            yield markdown_text(" ".join(block.split()))


def option_facts(option: OptionDoc) -> str:
    """The line under an option's help: its type and click's notes, as --help has them."""
    facts = ["Flag." if option.is_flag else f"Type: `{option.type_name}`."]
    if option.multiple:
        facts.append("Repeatable.")
    extras = option.extras
    if "default" in extras:
        facts.append(f"Default: `{extras['default']}`.")
    if "range" in extras:
        facts.append(f"Range: `{extras['range']}`.")
    if "envvars" in extras:
        facts.append(f"Environment variable: `{extras['envvars']}`.")
    if "required" in extras:
        facts.append("Required.")
    return " ".join(facts)


def markdown_page(doc: CommandDoc) -> str:
    lines = [
        f"# {doc.name}",
        "",
        "<!-- Generated while the site is built (scripts/reference.py) from the click command:"
        " edit the help texts in src/pf_proxy/cli/, not this page. -->",
        "",
    ]
    lines += _markdown_command(doc, level=1)
    return "\n".join(lines).rstrip() + "\n"


def _markdown_command(doc: CommandDoc, level: int) -> list[str]:
    lines: list[str] = []
    if level > 1:
        lines += [f"{'#' * level} `{doc.name}` {{#{'-'.join(doc.path[1:])}}}", ""]
    lines += [*_join(_paragraphs(doc.help)), "```text", doc.usage, "```", ""]
    if doc.options:
        heading = "#" * (level + 1)
        lines += [f"{heading} Options" + _sub_anchor(doc, "options"), ""]
        for option in doc.options:
            lines += [f"{heading}# `{option.spec}` {{#{option.anchor}}}", ""]
            if option.help:
                lines += [*_join(_paragraphs(option.help))]
            lines += [option_facts(option), ""]
    if doc.subcommands:
        heading = "#" * (level + 1)
        lines += [f"{heading} Commands" + _sub_anchor(doc, "commands"), ""]
        lines += ["| command | what it does |", "|---|---|"]
        for sub in doc.subcommands:
            anchor = "-".join(sub.path[1:])
            lines.append(f"| [`{sub.name}`](#{anchor}) | {markdown_text(sub.short_help)} |")
        lines.append("")
        for sub in doc.subcommands:
            lines += _markdown_command(sub, level + 1)
    if doc.epilog:
        lines += [*_join(_paragraphs(doc.epilog))]
    return lines


def _sub_anchor(doc: CommandDoc, what: str) -> str:
    return f" {{#{'-'.join(doc.path[1:])}-{what}}}" if len(doc.path) > 1 else ""


def _join(paragraphs: Iterator[str]) -> list[str]:
    lines: list[str] = []
    for paragraph in paragraphs:
        lines += [paragraph, ""]
    return lines


def commands_table(docs: list[CommandDoc]) -> str:
    """The table of commands on reference/index.md, one row per console script."""
    rows = ["| command | what it does |", "|---|---|"]
    for doc in docs:
        rows.append(f"| [`{doc.name}`]({doc.name}.md) | {markdown_text(doc.short_help)} |")
    return "\n".join(rows)


# --- man pages ------------------------------------------------------------------------------


def roff_text(text: str) -> str:
    """Plain text as roff that shows exactly that text (no request or escape sneaks in)."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n")
    )


def man_page(doc: CommandDoc, version: str) -> str:
    title = doc.name.upper().replace(" ", "-")
    lines = [
        f'.TH "{title}" "1" "" "pf-proxy {version}" "pf-proxy manual"',
        ".nh",  # no hyphenation, no justification: flags and values stay whole and searchable
        ".ad l",
        ".SH NAME",
        f"{roff_text(doc.name)} \\- {roff_text(doc.short_help)}",
    ]
    lines += _man_command(doc, top=True)
    lines += [
        ".SH SEE ALSO",
        "The pf\\-proxy manual (docs/ in the source tree, built with mkdocs), whose command "
        "reference is generated from the same source as this page.",
    ]
    return "\n".join(lines) + "\n"


def _man_command(doc: CommandDoc, top: bool) -> list[str]:
    lines = [".SH SYNOPSIS" if top else f".SH {roff_text(doc.name.upper())}"]
    lines += [".nf", roff_text(doc.usage), ".fi"]
    if doc.help:
        lines += [".SH DESCRIPTION"] if top else [".PP"]
        lines += _man_paragraphs(doc.help)
    if doc.options:
        lines += [".SH OPTIONS" if top else ".SS Options"]
        for option in doc.options:
            lines += [".TP", f"\\fB{roff_text(option.spec)}\\fR"]
            if option.help:
                lines += _man_paragraphs(option.help)
            lines += [".RS", roff_text(option_facts(option).replace("`", "")), ".RE"]
    if doc.subcommands:
        lines += [".SH COMMANDS" if top else ".SS Commands"]
        for sub in doc.subcommands:
            lines += [".TP", f"\\fB{roff_text(sub.name)}\\fR", roff_text(sub.short_help)]
        for sub in doc.subcommands:
            lines += _man_command(sub, top=False)
    if doc.epilog:
        lines += [".PP", *_man_paragraphs(doc.epilog)]
    return lines


def _man_paragraphs(text: str) -> list[str]:
    lines: list[str] = []
    for index, block in enumerate(re.split(r"\n\s*\n", text)):
        if index:
            lines.append(".PP")
        if block.startswith("\b\n"):
            lines += [".nf", roff_text(block[2:]), ".fi"]
        else:
            lines.append(roff_text(" ".join(block.split())))
    return lines


def write_man_pages(directory: Path) -> list[Path]:
    """DIR/man1/<script>.1 for every console script; the paths written."""
    version = str(importlib.import_module("pf_proxy").__version__)  # what --version says
    section = directory / "man1"
    section.mkdir(parents=True, exist_ok=True)
    written = []
    for doc in command_docs():
        path = section / f"{doc.name}.1"
        path.write_text(man_page(doc, version))
        written.append(path)
    return written


# --- the mkdocs hook ------------------------------------------------------------------------


def _nav_section_of(nav: Any, page: str) -> list[Any] | None:
    """The list in the nav that holds `page` (as a path or a {title: path})."""
    if isinstance(nav, list):
        for item in nav:
            if item == page or (isinstance(item, dict) and page in item.values()):
                return nav
            found = _nav_section_of(item, page)
            if found is not None:
                return found
    elif isinstance(nav, dict):
        for value in nav.values():
            found = _nav_section_of(value, page)
            if found is not None:
                return found
    return None


def on_config(config: Any) -> Any:
    """Put a page per console script in the nav, after reference/index.md."""
    from mkdocs.exceptions import PluginError

    section = _nav_section_of(config.nav, f"{REFERENCE_DIR}/index.md")
    if section is None:
        raise PluginError(f"the nav in mkdocs.yml must list {REFERENCE_DIR}/index.md")
    section += [{name: f"{REFERENCE_DIR}/{name}.md"} for name in console_scripts()]
    return config


def on_files(files: Any, config: Any) -> Any:
    """Add the generated reference pages to the site's files."""
    from mkdocs.structure.files import File

    for doc in command_docs():
        uri = f"{REFERENCE_DIR}/{doc.name}.md"
        files.append(File.generated(config, uri, content=markdown_page(doc)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill the table of commands into reference/index.md."""
    if page.file.src_uri == f"{REFERENCE_DIR}/index.md":
        from mkdocs.exceptions import PluginError

        if COMMANDS_PLACEHOLDER not in markdown:
            raise PluginError(f"{REFERENCE_DIR}/index.md lost its {COMMANDS_PLACEHOLDER}")
        markdown = markdown.replace(COMMANDS_PLACEHOLDER, commands_table(list(command_docs())))
    return markdown


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "man":
        print("usage: python scripts/reference.py man DIR", file=sys.stderr)
        return 2
    for path in write_man_pages(Path(argv[1])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
