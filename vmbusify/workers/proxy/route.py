"""Where the proxy client sends a target: which VM (on the host) and what host name.

On a guest every target goes to the host. On the host the target picks the VM:

    VMID.vmbusify          that VM's own loopback ("localhost" resolved inside the VM)
    NAME.VMID.vmbusify     NAME as the VM resolves it (an address or name inside the VM)
    an IP address          the VM that holds it (vmid-by-ip: the mux's AddressBook, docs/proxy.md
                           "Who holds an address"; an address two VMs claim is held by neither)

Anything else has no VM to go to and is refused with reply 4 (host unreachable), as is an
address no VM holds, with the mux's reason (a conflict between two VMs is named, never
resolved by picking one).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from vmbusify.bus.frames import HOST_VMID
from vmbusify.bus.link import WorkerLink
from vmbusify.config import Role
from vmbusify.errors import UnknownVMError, VMBusifyError
from vmbusify.protocol.proxy import ReplyCode

SUFFIX = ".vmbusify"
#: How long the list of known vmids is trusted before asking the mux again.
VMIDS_TTL = 2.0


class RouteError(Exception):
    """No way to reach the target; ``reply`` says how to answer."""

    def __init__(self, reply: ReplyCode, message: str) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Route:
    """Send PROXY-OPEN for ``host``:``port`` to ``vmid``."""

    vmid: str
    host: str
    port: int


def split_vmbusify_name(name: str, vmids: set[str]) -> tuple[str, str] | None:
    """(vmid, host inside it) for a ``[NAME.]VMID.vmbusify`` name, or None if not one.

    The longest known vmid wins, so vmids with dots work. Names are case-insensitive (DNS
    names are, and a Hyper-V VM id is a GUID that tools print in either case); a vmid that
    matches exactly wins over one that matches only ignoring case. RouteError if the VM is
    unknown.
    """
    low = name.lower().rstrip(".")
    if not low.endswith(SUFFIX):
        return None
    stem = name.rstrip(".")[: -len(SUFFIX)]
    for fold in (False, True):
        key = stem.lower() if fold else stem
        for vmid in sorted(vmids, key=len, reverse=True):
            want = vmid.lower() if fold else vmid
            if key == want:
                return vmid, "localhost"
            if key.endswith("." + want):
                return vmid, stem[: -len(vmid) - 1]
    raise RouteError(ReplyCode.HOST_UNREACHABLE, f"no VM named in {name!r}")


class Router:
    """Chooses the VM for each target (asks the mux for vmids and vmid-by-ip)."""

    def __init__(self, link: WorkerLink, role: Role) -> None:
        self.link = link
        self.role = role
        self._vmids: set[str] = set()
        self._vmids_at = 0.0

    async def _known_vmids(self) -> set[str]:
        if time.monotonic() - self._vmids_at > VMIDS_TTL:
            vms = await self.link.control({"cmd": "list"})
            self._vmids = {str(v["vmid"]) for v in vms}
            self._vmids_at = time.monotonic()
        return self._vmids

    async def route(self, host: str, port: int) -> Route:
        """The route for a target; RouteError if there is none."""
        if self.role is Role.GUEST:
            return Route(HOST_VMID, host, port)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        try:
            if ip is None:
                split = split_vmbusify_name(host, await self._known_vmids())
                if split is None:
                    raise RouteError(
                        ReplyCode.HOST_UNREACHABLE,
                        f"{host}: the host's proxy reaches VMs only (use an address a VM "
                        "holds, VMID.vmbusify or NAME.VMID.vmbusify)")
                return Route(split[0], split[1], port)
            vmid = await self.link.control({"cmd": "vmid", "ip": str(ip)})
            return Route(str(vmid), str(ip), port)
        except UnknownVMError as exc:
            raise RouteError(ReplyCode.HOST_UNREACHABLE, str(exc)) from None
        except VMBusifyError as exc:
            msg = str(exc)
            code = (ReplyCode.HOST_UNREACHABLE
                    if "no VM reported" in msg or "address conflict" in msg
                    or "no VM holds" in msg else ReplyCode.GENERAL_FAILURE)
            raise RouteError(code, msg) from None
