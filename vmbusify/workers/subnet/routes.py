"""Addresses and routes of the subnet's TUN interface, and the guest's optional resolv.conf.

Host: the interface gets the subnet's first address (``100.77.0.1/24``, ``fd77:...::1/64``);
the kernel's connected routes then send every VM's address into the TUN.
Guest: the interface gets the leased address and two default routes via the host with a
high metric (65000 by default), so a default route of a working SDN interface, which always
has a lower metric, keeps winning; when the SDN route goes away, ours carries the traffic.
Everything here is undone by closing the TUN device, except resolv.conf, which
``ResolvConf.restore`` puts back.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from vmbusify.errors import SubnetError
from vmbusify.protocol.subnet import Lease
from vmbusify.workers.subnet.command import run

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
_MARK = "# Written by vmbusify subnet: the host answers DNS; the original is restored on stop.\n"


def ip(*args: str, check: bool = True) -> str:
    """``ip ARGS``; its output. SubnetError if it fails (with ``check``)."""
    return run(["ip", *args], check=check).stdout


def ipv6_available() -> bool:
    """Whether this machine's kernel has IPv6 enabled."""
    try:
        return Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").read_text().strip() == "0"
    except OSError:
        return False


def default_uplink() -> str:
    """The interface of the IPv4 default route ("" if there is none)."""
    try:
        routes = json.loads(ip("-j", "route", "show", "default") or "[]")
    except ValueError:
        return ""
    return str(routes[0].get("dev", "")) if routes else ""


def has_global_ipv6(ifname: str) -> bool:
    """Whether ``ifname`` has a global-scope IPv6 address (so IPv6 can leave through it)."""
    try:
        doc = json.loads(ip("-j", "-6", "addr", "show", "dev", ifname, "scope", "global",
                            check=False) or "[]")
    except ValueError:
        return False
    return any(doc and d.get("addr_info") for d in doc)


def link_exists(ifname: str) -> bool:
    """Whether interface ``ifname`` exists in this namespace."""
    return run(["ip", "link", "show", "dev", ifname], check=False).returncode == 0


#: Guest only: the largest GSO packet the guest's TCP hands its TUN (the kernel's default is
#: 65536). Four frames of this size plus their headers fit in one 256 KiB DATA package; four of
#: 65536 would not. Not on the host: the kernel would cut every forwarded 64 KiB segment
#: (from the uplink) that exceeds it back into MTU-sized packets.
GSO_MAX_SIZE = 65000


def _bring_up(ifname: str, mtu: int) -> None:
    ip("link", "set", "dev", ifname, "mtu", str(mtu), "up")


def configure_host(ifname: str, mtu: int, cidr: str, cidr6: str = "") -> None:
    """The host's side: gateway addresses on the TUN (idempotent)."""
    _bring_up(ifname, mtu)
    ip("addr", "replace", cidr, "dev", ifname)
    if cidr6:
        ip("-6", "addr", "replace", cidr6, "dev", ifname, "nodad")


def configure_guest(ifname: str, lease: Lease) -> None:
    """The guest's side: the leased addresses and default routes via the host (idempotent)."""
    _bring_up(ifname, lease.mtu)
    # Older iproute2 lacks gso_max_size: then a 1 MiB batch holds 15 big frames instead of 16.
    ip("link", "set", "dev", ifname, "gso_max_size", str(GSO_MAX_SIZE), check=False)
    ip("addr", "replace", f"{lease.address}/{lease.prefixlen}", "dev", ifname)
    ip("route", "replace", "default", "via", lease.gateway, "dev", ifname,
       "metric", str(lease.metric))
    if lease.address6:
        ip("-6", "addr", "replace", f"{lease.address6}/{lease.prefixlen6}", "dev", ifname,
           "nodad")
        ip("-6", "route", "replace", "default", "via", lease.gateway6, "dev", ifname,
           "metric", str(lease.metric))


class ResolvConf:
    """Points /etc/resolv.conf at the host while the subnet is up, and puts it back.

    The original (a file's content, or a symlink's target) is saved in the state directory
    before the first change, so a worker killed with -9 restores it on its next stop. The file
    is rewritten in place, never replaced, because it may be a bind mount (``ip netns exec``).
    """

    def __init__(self, state_dir: str, path: Path = RESOLV_CONF) -> None:
        self.path = path
        self.saved = Path(state_dir) / "subnet-resolv.conf.json"

    def apply(self, servers: list[str]) -> None:
        """Write a resolv.conf naming ``servers`` (saving the original the first time)."""
        if not servers:
            return
        if not self.saved.exists():
            original: dict[str, Any]
            if self.path.is_symlink():
                original = {"symlink": os.readlink(self.path)}
            else:
                try:
                    original = {"content": self.path.read_text()}
                except FileNotFoundError:
                    original = {"absent": True}
            self.saved.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.saved.write_text(json.dumps(original))
        text = _MARK + "".join(f"nameserver {s}\n" for s in servers)
        if self.path.is_symlink():
            self.path.unlink()
        try:
            with open(self.path, "w") as fh:
                fh.write(text)
        except OSError as exc:
            raise SubnetError(f"cannot write {self.path}: {exc.strerror}") from None
        log.info("resolv.conf now names %s", ", ".join(servers))

    def restore(self) -> None:
        """Put the original back (nothing if this end never changed it)."""
        try:
            original = json.loads(self.saved.read_text())
        except (OSError, ValueError):
            return
        try:
            if "symlink" in original:
                self.path.unlink(missing_ok=True)
                os.symlink(original["symlink"], self.path)
            elif original.get("absent"):
                self.path.unlink(missing_ok=True)
            else:
                with open(self.path, "w") as fh:
                    fh.write(str(original.get("content", "")))
        except OSError as exc:
            log.warning("cannot restore %s: %s", self.path, exc.strerror)
            return
        self.saved.unlink(missing_ok=True)
        log.info("resolv.conf restored")
