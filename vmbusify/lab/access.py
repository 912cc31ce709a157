"""Run commands on a lab machine: the host (root namespace) or a VM (its namespace).

Commands get the machine's VMBusify environment (``VMBUSIFY_CONFIG`` and friends, the venv's
bin first on ``PATH``), so ``vmbusifyctl``, ``vmbusifyexec`` or ``curl`` behave as they would
on that machine. Examples::

    run_in_vm("vm1", ["ip", "-j", "addr"])                # inside vmbl-vm1
    run_on("host", ["vmbusifyctl", "status", "--json"])   # the host's command listener
    argv, env = command("vm2", ["curl", "-sS", "http://127.0.0.1:8080/"])
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import vmbusify.lab.netns as ip
from vmbusify.lab.layout import vm_index
from vmbusify.lab.stack import Stack, as_stack


def command(target: Stack | str, argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """argv (wrapped in ``ip netns exec`` for a VM) and environment to run ``argv`` on ``target``.

    ``target`` is "host", "vmK" or a Stack.
    """
    stack = as_stack(target)
    return ip.ns_argv(stack.netns, argv), stack.env()


def run_on(
    target: Stack | str,
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` on ``target`` and capture its output (text); ``check``: LabError on failure."""
    full, env = command(target, argv)
    return ip.run(full, env=env, check=check, input=input, timeout=timeout)


def run_in_vm(vmid: str, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """``run_on(vmid, argv)`` for a VM id ("vm1"); keywords as for run_on()."""
    vm_index(vmid)  # a clear LabError for "host" or a typo
    return run_on(vmid, argv, **kwargs)  # type: ignore[arg-type]
