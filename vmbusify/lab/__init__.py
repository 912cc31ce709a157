"""The lab: simulated VMs in network namespaces on one Linux machine, for demos and tests.

Each VM ``vmK`` is a namespace ``vmbl-vmK`` with no route out; its guest stack listens on a
Unix socket (``/run/vmbusify-lab/vmK/tunnel.sock``) standing in for vsock, the only link to
the host stack, which runs in the root namespace. ``vmbl-ext`` plays the external network.
See ``layout`` for every name, address and path.

Modules: ``layout`` (names, paths, generated configs), ``netns`` (``ip`` commands), ``stack``
(one supervisord per machine), ``access`` (run commands on a lab machine), ``external`` (the
external network's services: the hook for its DNS server), ``release`` (a VM's guest stack
from an older release: ``lab up --guest-release vm2=v0.1.0``), ``lab`` (up / down / status),
``testing`` (what the e2e fixtures yield: ``LabHandle``, ``vmbusify()``, ``lab_status()``;
the copy tests' and bench's ``write_big_file`` and ``sha256_of``).

Helpers for tests and tools::

    from vmbusify.lab import run_in_vm, run_on, supervisorctl_command, program_pid

    run_in_vm("vm1", ["ip", "route"])                      # inside vmbl-vm1
    run_on("host", ["vmbusifyctl", "status", "--json"])    # with the host's VMBUSIFY_CONFIG
    argv, env = supervisorctl_command("vm2", "status")     # subprocess.run(argv, env=env)
    program_pid("host", "mux")                             # int, or None when not running
"""

from vmbusify.lab.access import command, run_in_vm, run_on
from vmbusify.lab.lab import LabStatus, down, status, up
from vmbusify.lab.layout import LAB_ROOT, LabLayout
from vmbusify.lab.netns import ns_argv, run_in_netns
from vmbusify.lab.stack import (
    Stack,
    program_pid,
    stack_for,
    stack_processes,
    supervisorctl,
    supervisorctl_command,
)

__all__ = [
    "LAB_ROOT", "LabLayout", "LabStatus", "Stack", "command", "down", "ns_argv", "program_pid",
    "run_in_netns", "run_in_vm", "run_on", "stack_for", "stack_processes", "status",
    "supervisorctl", "supervisorctl_command", "up",
]
