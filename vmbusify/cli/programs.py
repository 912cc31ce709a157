"""The long-running programs supervisord starts: `vmbusify mux`, `control`, `worker NAME`."""

from __future__ import annotations

import click


@click.command()
def mux() -> None:
    """Run the tunnel-mux (owns the hypervisor connections)."""
    raise click.ClickException("not yet written")


@click.command()
def control() -> None:
    """Run the command listener (HTTP on 127.0.0.1:6543)."""
    raise click.ClickException("not yet written")


@click.command()
@click.argument("name")
def worker(name: str) -> None:
    """Run one worker process (exec, proxy or subnet)."""
    raise click.ClickException("not yet written")
