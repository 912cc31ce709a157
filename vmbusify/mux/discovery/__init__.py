"""VMs found instead of listed (docs/discovery.md): running libvirt domains, Firecracker and
Cloud Hypervisor vsock sockets. Each source answers with ``Found`` records; the host side of
the mux (vmbusify/mux/host.py) merges them with ``[[vms]]`` and adds or drops peers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: A found VM's vmid: what a name becomes (at most this long, these characters).
VMID_MAX = 64
_NOT_VMID = re.compile(r"[^A-Za-z0-9._-]+")


def as_vmid(name: str) -> str:
    """``name`` (a domain's, a socket's) as a vmid: characters other than letters, digits,
    ``.``, ``_`` and ``-`` become ``_``, at most VMID_MAX of them ("" if nothing is left)."""
    return _NOT_VMID.sub("_", name).strip("._")[:VMID_MAX]


@dataclass(frozen=True)
class Found:
    """One VM a source found: its vmid, its hypervisor socket address and other names."""

    vmid: str
    address: str
    #: Other names the VM answers to (a libvirt domain's UUID).
    aliases: tuple[str, ...] = field(default_factory=tuple)
    #: Which source found it ("libvirt", "firecracker", ...).
    source: str = ""
