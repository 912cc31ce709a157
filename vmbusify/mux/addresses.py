"""Which VM owns which address: the claims VMs make in their HELLO, judged (sans-I/O).

A VM reports its addresses (HELLO ``ips``, again whenever they change); root in a VM is
hostile, so a report is a *claim*, not a fact. The book holds an address for a VM only when:

- it is an address a VM can own (not loopback, link-local, multicast, unspecified or the
  broadcast address: those mean something else on every machine);
- the configuration allows it to that VM (``[[vms]] ips``: addresses or CIDRs; empty = any
  address), and it is not inside what the configuration gives another VM;
- no other VM claims it too. An address claimed by two VMs is held by *neither*: the host
  cannot tell which one lies, so it does not guess (a hostile VM that reconnects first after
  a host restart takes nothing once the owner is back).

A VM's claims go when it disconnects (``release``), and a conflict it caused is resolved for
the other VM. Every lookup by address (``owner``) goes through here and fails with a reason
naming the conflict or refusal instead of guessing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from vmbusify.config import Config
from vmbusify.errors import UnknownVMError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The most addresses one VM may claim (HELLO carries at most 256).
MAX_CLAIMS = 256


class Refusal(str, Enum):
    """Why a claimed address is not held."""

    #: Another VM claims it too.
    CONFLICT = "conflict"
    #: Outside the addresses the configuration allows this VM.
    OUTSIDE_CONFIG = "outside-config"
    #: Inside the addresses the configuration gives another VM.
    RESERVED = "reserved"
    #: Loopback, link-local, multicast, unspecified, broadcast: nobody's.
    NOT_OWNABLE = "not-ownable"
    #: Not an IP address at all.
    INVALID = "invalid"


@dataclass(frozen=True)
class RefusedAddress:
    """A claim the book did not honour, and why."""

    ip: str
    why: Refusal
    #: The other VMs involved: those claiming it too (CONFLICT), or the VMs it is configured
    #: for (RESERVED).
    others: tuple[str, ...] = ()

    def describe(self) -> str:
        """Why, in words (for status and errors)."""
        if self.why is Refusal.CONFLICT:
            return f"conflict with {', '.join(self.others)}"
        if self.why is Refusal.OUTSIDE_CONFIG:
            return "outside the configured ips"
        if self.why is Refusal.RESERVED:
            return f"configured for {', '.join(self.others)}"
        if self.why is Refusal.NOT_OWNABLE:
            return "not an address a VM can own (loopback, link-local, multicast, broadcast)"
        return "not an IP address"

    def as_dict(self) -> dict[str, Any]:
        """The record in ``vmbusifyctl status --json`` (``ips_refused``)."""
        return {"ip": self.ip, "why": self.why.value, "reason": self.describe(),
                "with": list(self.others)}


def canonical(text: str) -> IPAddress:
    """The address a claim or lookup names: scope id dropped, IPv4-mapped IPv6 as IPv4 (so
    ``::ffff:10.0.0.1`` and ``10.0.0.1`` are one address). ValueError if not an address."""
    ip = ipaddress.ip_address(str(text).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def ownable(ip: IPAddress) -> bool:
    """Whether a VM may own ``ip`` (a unicast address that means the same on every link)."""
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return False
    return ip != ipaddress.IPv4Address("255.255.255.255")


class AddressBook:
    """Per VM the addresses it claims; who holds what; lookups by address."""

    def __init__(self, allowed: Mapping[str, Sequence[str]] | None = None) -> None:
        """``allowed``: vmid -> the addresses or CIDRs the configuration allows it (a VM not
        listed, or with an empty list, may claim any address not configured for another)."""
        self._allowed: dict[str, tuple[IPNetwork, ...]] = {
            vmid: tuple(ipaddress.ip_network(n, strict=False) for n in nets)
            for vmid, nets in (allowed or {}).items() if nets}
        #: vmid -> its claims, in the order reported (canonical text).
        self._claims: dict[str, tuple[str, ...]] = {}
        #: vmid -> claims refused for the VM alone (config, reservation, not ownable).
        self._own_refusals: dict[str, dict[str, RefusedAddress]] = {}
        #: address -> the VMs whose claim of it passed their own checks.
        self._claimants: dict[str, set[str]] = {}

    @classmethod
    def from_config(cls, config: Config) -> AddressBook:
        """The book for a mux with this configuration (``[[vms]] ips``)."""
        return cls({vm.vmid: vm.ips for vm in config.vms})

    def set_allowed(self, allowed: Mapping[str, Sequence[str]]) -> None:
        """Replace what the configuration allows each VM (a reload); claims already held
        are judged again at the VM's next HELLO."""
        self._allowed = {vmid: tuple(ipaddress.ip_network(n, strict=False) for n in nets)
                         for vmid, nets in allowed.items() if nets}

    # -- claims ----------------------------------------------------------------------------
    def claim(self, vmid: str, ips: Iterable[str]) -> set[str]:
        """Replace ``vmid``'s claims with ``ips`` (every HELLO carries the full list).

        Returns the vmids whose held addresses changed (``vmid`` itself, and any VM that
        lost an address to a new conflict or got one back).
        """
        claims: list[str] = []
        refusals: dict[str, RefusedAddress] = {}
        for text in ips:
            if len(claims) + len(refusals) >= MAX_CLAIMS:
                break
            try:
                ip = canonical(text)
            except ValueError:
                shown = str(text)[:64]
                refusals[shown] = RefusedAddress(shown, Refusal.INVALID)
                continue
            key = str(ip)
            if key in claims or key in refusals:
                continue
            refusal = self._own_check(vmid, ip)
            if refusal is not None:
                refusals[key] = refusal
            else:
                claims.append(key)
        old = self._claims.get(vmid, ())
        touched = self._neighbours(vmid, old) | self._neighbours(vmid, claims)
        before = {v: self.held(v) for v in touched}
        for key in old:
            self._drop(vmid, key)
        for key in claims:
            self._claimants.setdefault(key, set()).add(vmid)
        self._claims[vmid] = tuple(claims) + tuple(refusals)
        self._own_refusals[vmid] = refusals
        return {v for v in touched | {vmid} if self.held(v) != before.get(v)}

    def release(self, vmid: str) -> set[str]:
        """``vmid`` disconnected: its claims go. Returns the vmids whose holdings changed."""
        return self.claim(vmid, ()) if vmid in self._claims else set()

    def _own_check(self, vmid: str, ip: IPAddress) -> RefusedAddress | None:
        """Whether ``vmid`` may claim ``ip`` at all, whoever else claims it."""
        if not ownable(ip):
            return RefusedAddress(str(ip), Refusal.NOT_OWNABLE)
        mine = self._allowed.get(vmid)
        if mine is not None:
            if not _inside(ip, mine):
                return RefusedAddress(str(ip), Refusal.OUTSIDE_CONFIG)
            return None
        reserved_for = tuple(v for v, nets in self._allowed.items()
                             if v != vmid and _inside(ip, nets))
        if reserved_for:
            return RefusedAddress(str(ip), Refusal.RESERVED, reserved_for)
        return None

    def _neighbours(self, vmid: str, keys: Iterable[str]) -> set[str]:
        """``vmid`` and every VM claiming one of ``keys`` too."""
        out = {vmid}
        for key in keys:
            out |= self._claimants.get(key, set())
        return out

    def _drop(self, vmid: str, key: str) -> None:
        holders = self._claimants.get(key)
        if holders is not None:
            holders.discard(vmid)
            if not holders:
                del self._claimants[key]

    # -- queries ---------------------------------------------------------------------------
    def held(self, vmid: str) -> list[str]:
        """The addresses ``vmid`` holds (claimed, allowed, and claimed by no other VM)."""
        return [key for key in self._claims.get(vmid, ())
                if self._claimants.get(key) == {vmid}]

    def refused(self, vmid: str) -> list[RefusedAddress]:
        """``vmid``'s claims that it does not hold, each with the reason."""
        own = self._own_refusals.get(vmid, {})
        out: list[RefusedAddress] = []
        for key in self._claims.get(vmid, ()):
            if key in own:
                out.append(own[key])
                continue
            others = sorted(self._claimants.get(key, set()) - {vmid})
            if others:
                out.append(RefusedAddress(key, Refusal.CONFLICT, tuple(others)))
        return out

    def status(self, vmid: str) -> dict[str, Any]:
        """``ips`` (held) and ``ips_refused`` (with reasons) for one VM's status record."""
        return {"ips": self.held(vmid),
                "ips_refused": [r.as_dict() for r in self.refused(vmid)]}

    def owner(self, address: str) -> str:
        """The vmid holding ``address`` (docs/proxy.md, "Who holds an address").

        UnknownVMError, naming the VMs, if it is in conflict or was refused, or if no VM
        reported it: a lookup never guesses.
        """
        try:
            key = str(canonical(address))
        except ValueError:
            raise UnknownVMError(f"not an IP address: {address!r}") from None
        holders = sorted(self._claimants.get(key, set()))
        if len(holders) == 1:
            return holders[0]
        if holders:
            raise UnknownVMError(
                f"address conflict: {key} is claimed by {' and '.join(holders)}; neither "
                "holds it until one of them stops claiming it (vmbusifyctl status)")
        refused = [(v, r[key]) for v, r in sorted(self._own_refusals.items()) if key in r]
        if refused:
            why = "; ".join(f"{v} claimed it but {r.describe()}" for v, r in refused)
            raise UnknownVMError(f"no VM holds the address {key}: {why}")
        raise UnknownVMError(f"no VM reported the address {key}")


def _inside(ip: IPAddress, nets: Iterable[IPNetwork]) -> bool:
    return any(ip.version == n.version and ip in n for n in nets)
