"""`vmbusify lab`: simulated VMs in network namespaces (placeholder, being written)."""

from __future__ import annotations

import click


@click.group()
def lab() -> None:
    """Simulated VMs in network namespaces, for demos and tests."""
