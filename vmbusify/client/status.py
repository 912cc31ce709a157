"""What the command listener says of this endpoint, as typed records (``GET /v1/status``,
``GET /v1/vms``; the fields are those of ``vmbusifyctl status --json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The state of a VM whose tunnel is up (the others: disconnected, connecting, backoff).
CONNECTED = "connected"


def _str(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    return value if isinstance(value, str) else ""


def _strs(doc: dict[str, Any], key: str) -> list[str]:
    value = doc.get(key)
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _num(doc: dict[str, Any], key: str) -> float | None:
    value = doc.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True)
class VMStatus:
    """One VM as this endpoint's mux sees it."""

    vmid: str
    #: ``connected``, ``connecting``, ``backoff`` or ``disconnected``.
    state: str
    #: The addresses the VM reported and holds.
    ips: list[str] = field(default_factory=list)
    #: Its hypervisor address (``vsock:3``, ``unix:/...``), when the status says it.
    address: str = ""
    rtt_ms: float | None = None
    #: When the tunnel came up (Unix time), if it is up.
    connected_since: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    #: The guest's host name and VMBusify version (from its HELLO), if connected.
    hostname: str = ""
    peer_version: str = ""
    last_error: str = ""
    #: Where the host found it: ``config``, ``libvirt``, ``firecracker``, ``cloud-hypervisor``
    #: (docs/discovery.md), and its other names (a libvirt domain's UUID).
    source: str = ""
    aliases: list[str] = field(default_factory=list)
    #: The whole record as the listener sent it (more counters).
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def connected(self) -> bool:
        """Whether its tunnel is up."""
        return self.state == CONNECTED

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> VMStatus:
        """The record of one VM of ``/v1/status`` or ``/v1/vms``."""
        return cls(vmid=_str(doc, "vmid"), state=_str(doc, "state"), ips=_strs(doc, "ips"),
                   address=_str(doc, "address"), rtt_ms=_num(doc, "rtt_ms"),
                   connected_since=_num(doc, "connected_since"),
                   bytes_in=_int(doc, "bytes_in"), bytes_out=_int(doc, "bytes_out"),
                   hostname=_str(doc, "hostname"), peer_version=_str(doc, "peer_version"),
                   last_error=_str(doc, "last_error"), source=_str(doc, "source"),
                   aliases=_strs(doc, "aliases"), raw=doc)


@dataclass(frozen=True)
class Status:
    """This endpoint: its mux, its VMs, workers and programs."""

    #: ``host`` or ``guest``.
    role: str
    name: str
    version: str
    pid: int
    vms: list[VMStatus]
    #: Each worker's record (name, pid, entities, its counters under ``stats``).
    workers: list[dict[str, Any]] = field(default_factory=list)
    #: Each supervised program's state (name, state, pid).
    programs: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def vm(self, vmid: str) -> VMStatus:
        """The VM with this vmid; KeyError if there is none."""
        for vm in self.vms:
            if vm.vmid == vmid:
                return vm
        raise KeyError(vmid)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Status:
        """The record of ``GET /v1/status``."""
        def dicts(key: str) -> list[dict[str, Any]]:
            value = doc.get(key)
            return [d for d in value if isinstance(d, dict)] if isinstance(value, list) else []

        return cls(role=_str(doc, "role"), name=_str(doc, "name"),
                   version=_str(doc, "version"), pid=_int(doc, "pid"),
                   vms=[VMStatus.from_json(vm) for vm in dicts("vms")],
                   workers=dicts("workers"), programs=dicts("programs"), raw=doc)
