"""Man pages made from the CLIs' own help: ``vmbusify man --output DIR`` writes
``vmbusify.1``, ``vmbusifyctl.1`` and ``vmbusifyexec.1`` (roff), so a page never says
something ``--help`` does not. packaging/install.sh installs them into
/usr/local/share/man/man1, packaging/build-guest.py into the guest package's /usr/share/man.

``vmbusify`` and ``vmbusifyctl`` are click programs: each command's help, arguments and
options come from click. ``vmbusifyexec`` is not (docs/exec.md "A light client"): its page is
made from its usage text (cli/exec.py USAGE).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import click

from vmbusify import __version__
from vmbusify.cli.ctl import main as ctl_main
from vmbusify.cli.exec import PROG, USAGE

#: The page's footer and where each program's page comes from.
SOURCE = f"vmbusify {__version__}"
MANUAL = "VMBusify Manual"
SEE_ALSO = ("vmbusify", "vmbusifyctl", "vmbusifyexec")


def esc(text: str) -> str:
    """Text as roff shows it as it is (backslashes, hyphens, a leading dot or quote)."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def _paragraphs(text: str) -> list[str]:
    """click's help text as roff paragraphs (``\\b`` blocks kept as they are written)."""
    out = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        if block.startswith("\b"):
            out.append(".nf\n" + esc(block[1:].strip("\n")) + "\n.fi")
        else:
            out.append(esc(" ".join(line.strip() for line in block.splitlines())))
    return [line for i, par in enumerate(out) for line in ([".PP"] if i else []) + [par]]


def _params(command: click.Command, ctx: click.Context) -> list[str]:
    lines = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        if isinstance(param, click.Argument) and not help_text:
            continue  # in the synopsis already
        lines += [".TP", f"\\fB{esc(names)}\\fR", esc(help_text) or "."]
    return lines


def _arguments(command: click.Command, ctx: click.Context) -> str:
    pieces = command.collect_usage_pieces(ctx)
    return " ".join(pieces)


def _header(name: str, summary: str) -> list[str]:
    return [f'.TH {name.upper()} 1 "" "{SOURCE}" "{MANUAL}"', ".SH NAME",
            f"{name} \\- {esc(summary)}"]


def _see_also(name: str) -> list[str]:
    others = [f"\\fB{other}\\fR(1)" for other in SEE_ALSO if other != name]
    return [".SH SEE ALSO", ", ".join(others) + ", and the documentation in docs/ of the "
            "source (docs/cli.md for these commands)."]


def click_page(name: str, command: click.Command) -> str:
    """The page of a click program (its commands, for a group, each in a section)."""
    ctx = click.Context(command, info_name=name, **command.context_settings)
    summary = command.get_short_help_str(200).rstrip(".")
    lines = _header(name, summary)
    lines += [".SH SYNOPSIS", f"\\fB{name}\\fR {esc(_arguments(command, ctx))}"]
    lines += [".SH DESCRIPTION", *_paragraphs(command.help or "")]
    options = _params(command, ctx)
    if options:
        lines += [".SH OPTIONS", *options]
    if isinstance(command, click.Group):
        lines.append(".SH COMMANDS")
        lines += _commands(name, command, ctx)
    lines += _see_also(name)
    return "\n".join(lines) + "\n"


def _commands(prefix: str, group: click.Group, ctx: click.Context) -> list[str]:
    lines: list[str] = []
    for sub_name in group.list_commands(ctx):
        sub = group.get_command(ctx, sub_name)
        if sub is None or sub.hidden:
            continue
        sub_ctx = click.Context(sub, info_name=sub_name, parent=ctx)
        title = f"{prefix} {sub_name} {_arguments(sub, sub_ctx)}".strip()
        lines += [f'.SS "{esc(title)}"', *_paragraphs(sub.help or "")]
        lines += _params(sub, sub_ctx)
        if isinstance(sub, click.Group):
            lines += _commands(f"{prefix} {sub_name}", sub, sub_ctx)
    return lines


def usage_page(name: str, usage: str) -> str:
    """The page of a program whose help is a usage text (``Usage:`` lines, a description,
    ``Options:`` with two-space-indented entries, then paragraphs)."""
    blocks = re.split(r"\n\s*\n", usage.strip())
    synopsis = [line.split(":", 1)[-1].strip() if i == 0 else line.strip()
                for i, line in enumerate(blocks[0].splitlines())]
    description = " ".join(line.strip() for line in blocks[1].splitlines())
    summary = re.split(r" \(|; |\. ", description)[0]
    lines = _header(name, summary)
    lines.append(".SH SYNOPSIS")
    for i, line in enumerate(synopsis):
        lines += ([".br"] if i else []) + [esc(line).replace(esc(name), f"\\fB{name}\\fR", 1)]
    lines += [".SH DESCRIPTION", esc(description)]
    for block in blocks[2:]:
        first, _, rest = block.partition("\n")
        if first.strip() == "Options:":
            lines += [".SH OPTIONS", *_usage_options(rest)]
        elif re.match(r"^[A-Z][a-z ]{2,20}:", first):
            head, _, body = block.partition(":")
            lines += [f".SH {esc(head.upper())}",
                      esc(" ".join(line.strip() for line in body.splitlines()).strip())]
        else:
            lines += [".PP", esc(" ".join(line.strip() for line in block.splitlines()))]
    lines += _see_also(name)
    return "\n".join(lines) + "\n"


def _usage_options(text: str) -> list[str]:
    entries: list[tuple[str, str]] = []
    for line in text.splitlines():
        m = re.match(r"^ {2,6}(-\S.*?)(?: {2,}(.*))?$", line)
        if m and not line.startswith(" " * 12):
            entries.append((m.group(1).strip(), (m.group(2) or "").strip()))
        elif entries:
            names, help_text = entries[-1]
            entries[-1] = (names, f"{help_text} {line.strip()}".strip())
    out = []
    for names, help_text in entries:
        out += [".TP", f"\\fB{esc(names)}\\fR", esc(help_text)]
    return out


def pages(vmbusify_main: click.Command) -> dict[str, str]:
    """Every page: file name -> roff text (``vmbusify_main``: the ``vmbusify`` group, which
    imports this module)."""
    return {"vmbusify.1": click_page("vmbusify", vmbusify_main),
            "vmbusifyctl.1": click_page("vmbusifyctl", ctl_main),
            "vmbusifyexec.1": usage_page(PROG, USAGE)}


def write_pages(output: Path, vmbusify_main: click.Command) -> list[Path]:
    """Write every page into ``output`` (made if missing); the paths written."""
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in pages(vmbusify_main).items():
        path = output / file_name
        path.write_text(text)
        written.append(path)
    return written
