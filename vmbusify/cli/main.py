"""`vmbusify`: the programs supervisord runs (mux, control, workers) and the lab."""

from __future__ import annotations

import click

from vmbusify.cli.lab import lab
from vmbusify.cli.programs import control, mux, worker


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmbusify")
def main() -> None:
    """VMBusify: reach a VM with no network over its hypervisor channel."""


main.add_command(mux)
main.add_command(control)
main.add_command(worker)
main.add_command(lab)
