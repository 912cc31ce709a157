"""`vmbusify`: the programs supervisord runs (mux, control, workers) and the lab."""

from __future__ import annotations

import os
import sys

import click

from vmbusify.cli.programs import control, mux, worker
from vmbusify.config import check_config
from vmbusify.config_file import DEFAULT_CONFIG_PATH
from vmbusify.errors import LabError


def _lab_unusable(reason: str) -> click.Command:
    """`vmbusify lab ...` when the lab cannot load (a bad VMBUSIFY_LAB_INSTANCE): every use
    says why in one line and exits 1; the other commands are not affected."""
    @click.command("lab", context_settings={"ignore_unknown_options": True,
                                            "allow_extra_args": True})
    def lab() -> None:
        """Simulated VMs in network namespaces (cannot load here: run it to see why)."""
        raise click.ClickException(reason)
    return lab


lab: click.Command
try:
    from vmbusify.cli.lab import lab
except LabError as exc:  # raised as the lab's layout loads: no traceback for a bad setting
    lab = _lab_unusable(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmbusify")
def main() -> None:
    """VMBusify: reach a VM with no network over its hypervisor channel."""


main.add_command(mux)
main.add_command(control)
main.add_command(worker)
main.add_command(lab)


@main.command("check-config")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="Print nothing when the file is good.")
def check_config_command(file: str | None, quiet: bool) -> None:
    """Check a configuration file (default $VMBUSIFY_CONFIG or /etc/vmbusify/vmbusify.toml)
    as the programs load it: every problem on a line of its own (FILE: KEY: what is wrong),
    exit status 1 if there is one, 0 if the programs would start with it (as sshd -t)."""
    _config, problems = check_config(file)
    for line in problems:
        click.echo(line, err=True)
    if problems:
        sys.exit(1)
    if not quiet:
        path = file or os.environ.get("VMBUSIFY_CONFIG") or DEFAULT_CONFIG_PATH
        click.echo(f"{path}: ok" + ("" if os.path.exists(path) else
                                     " (no file: the defaults)"))


@main.command("man")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=".",
              show_default=True, help="Directory to write the pages into (made if missing).")
@click.pass_context
def man_command(ctx: click.Context, output: str) -> None:
    """Write the man pages of vmbusify, vmbusifyctl and vmbusifyexec (made from their own
    --help) into a directory, e.g. /usr/local/share/man/man1."""
    from pathlib import Path

    # Imported here: the pages load every CLI, which no other command needs.
    from vmbusify.cli.manpages import write_pages
    for path in write_pages(Path(output), ctx.find_root().command):
        click.echo(path)
