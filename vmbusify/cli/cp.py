"""`vmbusifyctl cp`: files into and out of a VM (docs/files.md).

    vmbusifyctl cp [-r] [-p] SRC... VM:DST        push
    vmbusifyctl cp [-r] [-p] VM:SRC... DST        pull

The work is vmbusify.files.push/pull; this module parses the command line and shows the
progress line (on a terminal only), the warnings and the ``--json`` summary.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from vmbusify.errors import FileCopyError, VMBusifyError, ctl_exit
from vmbusify.files import CopyResult, Progress, pull, push
from vmbusify.text import for_terminal


def split_remote(arg: str) -> tuple[str, str] | None:
    """``VM:PATH`` -> (VM, PATH); None for a local path. A VM is a name with no ``/`` before
    the colon, or an address in brackets (``[fd00::1]:/tmp``); write ``./a:b`` for a local
    file whose name has a colon."""
    if arg.startswith("["):
        end = arg.find("]:")
        return (arg[1:end], arg[end + 2:]) if end > 1 else None
    vm, colon, path = arg.partition(":")
    if not colon or not vm or "/" in vm:
        return None
    return vm, path


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """One line on stderr, rewritten in place: file, bytes, rate, ETA."""

    def __init__(self) -> None:
        self.width = 0
        self.shown = False

    def __call__(self, p: Progress) -> None:
        rate = p.bytes / p.elapsed if p.elapsed > 0.05 else 0.0
        # The whole copy's total when known (a push), else the current file's (a pull).
        done, total = (p.bytes, p.total_bytes) if p.total_bytes else (p.file_bytes, p.file_size)
        parts = [_size(done)]
        if total:
            parts[0] += f" / {_size(total)} ({100 * done // max(1, total)}%)"
        parts.append(f"{_size(rate)}/s")
        if total and rate > 0 and done <= total:
            parts.append(f"ETA {_clock((total - done) / rate)}")
        if p.files:
            parts.append(f"{p.files} files")
        name = for_terminal(p.name, 60).replace("\n", "\\n").replace("\t", "\\t")
        line = f"{name}  {'  '.join(parts)}"
        try:
            cols = os.get_terminal_size(2).columns
        except OSError:
            cols = 100
        line = line[:cols - 1]
        sys.stderr.write("\r" + line.ljust(self.width))
        sys.stderr.flush()
        self.width = len(line)
        self.shown = True

    def done(self) -> None:
        """End the line (before anything else goes to stderr)."""
        if self.shown:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.shown = False


def _say(message: str) -> None:
    click.echo(f"vmbusifyctl: {for_terminal(message)}", err=True)


def _parse(paths: tuple[str, ...]) -> tuple[str, str, list[str], str]:
    """(direction, vm, sources, dest) from the command line, or click.UsageError."""
    if len(paths) < 2:
        raise click.UsageError("cp needs at least one SRC and a DST")
    *srcs, dst = paths
    remote_dst = split_remote(dst)
    remote_srcs = [split_remote(s) for s in srcs]
    if remote_dst is not None:
        if any(r is not None for r in remote_srcs):
            raise click.UsageError("copy from the host to a VM or from a VM to the host, "
                                   "not between VMs")
        vm, dest = remote_dst
        return "push", vm, srcs, dest or "."
    if not all(r is not None for r in remote_srcs):
        raise click.UsageError("either DST or every SRC must be VM:PATH (a local name with a "
                               "colon: ./NAME)")
    vms = {r[0] for r in remote_srcs if r is not None}
    if len(vms) != 1:
        raise click.UsageError("every SRC must be on the same VM")
    return "pull", vms.pop(), [r[1] for r in remote_srcs if r is not None], dst


@click.command("cp")
@click.option("-r", "--recursive", is_flag=True, help="Copy directories and what is in them.")
@click.option("-p", "--preserve", is_flag=True,
              help="Keep modes and times (and owners, when root at the receiving end).")
@click.option("-u", "--user", default="", help="In the VM, read and write as USER (as exec).")
@click.option("--resume", is_flag=True,
              help="Continue one large file from what an interrupted copy left.")
@click.option("--checksum", is_flag=True, help="Compare sha256 at both ends.")
@click.option("-q", "--quiet", is_flag=True, help="No progress line.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
@click.option("--fsync", is_flag=True,
              help="Flush each file to disk before its rename, and the directories after.")
@click.argument("paths", nargs=-1, required=True)
@click.pass_context
def cp(ctx: click.Context, recursive: bool, preserve: bool, user: str, resume: bool,
       checksum: bool, quiet: bool, as_json: bool, fsync: bool, paths: tuple[str, ...]
       ) -> None:
    """Copy SRC... to VM:DST, or VM:SRC... to DST (VM: a vmid or an address it reported).

    As cp: an existing directory DST receives the sources by their names, otherwise DST is
    the new name. "-" as the one SRC reads stdin; "-" as DST writes the one file to stdout.
    Exit status: 0 copied, 1 failed (or some entries of a tree were not copied), 2 usage.
    """
    direction, vm, sources, dest = _parse(paths)
    to_stdout = direction == "pull" and dest == "-"
    line = ProgressLine() if (not quiet and not as_json and sys.stderr.isatty()) else None
    opts: dict[str, Any] = {"recursive": recursive, "preserve": preserve, "user": user,
                            "resume": resume, "checksum": checksum,
                            "client": ctx.obj["client"], "progress": line, "fsync": fsync}
    started = time.monotonic()
    try:
        if direction == "push":
            result = push(vm, sources, dest, **opts)
        else:
            result = pull(vm, sources, dest, **opts)
    except VMBusifyError as exc:
        if line:
            line.done()
        if as_json and not to_stdout:
            kind = exc.kind if isinstance(exc, FileCopyError) else "error"
            click.echo(json.dumps({"vm": vm, "direction": direction, "ok": False,
                                   "error": str(exc), "kind": kind,
                                   "seconds": round(time.monotonic() - started, 3)}))
        _say(str(exc))
        sys.exit(ctl_exit(exc.code))
    except KeyboardInterrupt:
        if line:
            line.done()
        _say("interrupted; nothing half-written is left at the target")
        sys.exit(130)
    if line:
        line.done()
    _report(result, as_json and not to_stdout)


def _report(result: CopyResult, as_json: bool) -> None:
    for w in result.warnings:
        message = str(w.get("message", ""))
        # The sender's messages for what it skipped already say "not copied: PATH ...".
        _say(message if message.startswith("not copied: ")
             else f"not copied: {w.get('path', '')}: {message}")
    if as_json:
        click.echo(json.dumps(result.to_json()))
    if not result.ok:
        sys.exit(1)
