"""`vmbusify lab up|down|status`: simulated VMs in network namespaces (needs root)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from vmbusify.errors import LabError
from vmbusify.lab import lab as lab_impl
from vmbusify.lab.layout import MAX_VMS

F = TypeVar("F", bound=Callable[..., Any])


def _lab_errors(fn: F) -> F:
    """Turn LabError into click's one-line "Error: ..." and exit code 1."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LabError as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper  # type: ignore[return-value]


@click.group()
@click.option("-q", "--quiet", is_flag=True, help="Print no progress, only the result.")
def lab(quiet: bool) -> None:
    """Simulated VMs in network namespaces, or real QEMU guests, for demos and tests (needs
    root)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="lab: %(message)s")


def _releases(ctx: click.Context, param: click.Parameter,
              values: tuple[str, ...]) -> dict[str, str]:
    """``("vm2=v0.1.0", ...)`` -> ``{"vm2": "v0.1.0"}``; a usage error for anything else."""
    found: dict[str, str] = {}
    for value in values:
        vmid, sep, ref = value.partition("=")
        if not sep or not vmid or not ref:
            raise click.BadParameter(f"{value!r}: expected VMID=RELEASE, e.g. vm2=v0.1.0")
        found[vmid] = ref
    return found


@lab.command("up")
@click.option("--vms", type=click.IntRange(1, MAX_VMS), default=None,
              help="Number of VMs (vm1..vmN). Default: keep the lab's, or 2 for a new lab "
                   "(1 for a new QEMU lab).")
@click.option("--guest-release", "guest_releases", multiple=True, metavar="VMID=RELEASE",
              callback=_releases,
              help="Run VMID's guest stack from an older release (a git tag of this checkout, "
                   "e.g. vm2=v0.1.0), or from this checkout again (vm2=current). Repeatable; "
                   "VMs not named keep theirs.")
@click.option("--qemu", is_flag=True,
              help="Real Linux guests under QEMU (no NIC; virtio-serial) instead of namespaces. "
                   "The first run builds the guest image (minutes, cached).")
@click.option("--accel", type=click.Choice(["kvm", "tcg"]), default=None,
              help="QEMU's accelerator. Default: KVM if a guest boots under it here "
                   "(probed once, cached), else TCG.")
@_lab_errors
def up(vms: int | None, guest_releases: dict[str, str], qemu: bool, accel: str | None) -> None:
    """Bring the lab up, or repair it (idempotent)."""
    if accel and not qemu:
        raise click.UsageError("--accel goes with --qemu")
    if guest_releases and qemu:
        raise click.UsageError("--guest-release is for the namespace lab, not --qemu")
    click.echo(lab_impl.up(vms, guest_releases=dict(guest_releases), qemu=qemu,
                           accel=accel).render())


@lab.command("down")
@_lab_errors
def down() -> None:
    """Stop the lab's stacks and remove everything it made (idempotent)."""
    lab_impl.down()
    click.echo("lab: down")


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_lab_errors
def status(as_json: bool) -> None:
    """Show the lab's VMs, external network and host stack."""
    lab_impl.require_root()
    st = lab_impl.status()
    click.echo(json.dumps(st.to_json(), indent=2) if as_json else st.render())
