"""Egress policy of a proxy server: which resolved addresses and ports it may connect to.

Rules are ``CIDR`` or ``CIDR:PORTS`` (``[v6-CIDR]:PORTS`` for IPv6), PORTS being a comma list
of ports and ``LOW-HIGH`` ranges: ``10.0.0.0/8:80,443,8000-8999``. An address must match an
allow rule and no deny rule: deny wins. Checks run on the *resolved* address (resolve, check,
connect: a name cannot rebind around the policy), in every dress an IPv4 address can wear in
IPv6 (``forms``): IPv4-mapped (``::ffff:127.0.0.1``), -translated and -compatible forms are
judged as the IPv4 address alone; NAT64 (64:ff9b::/96, and the local-use 64:ff9b:1::/48 in its
last 32 bits and at the other RFC 6052 positions: ``embedded_ipv4``), 6to4 (2002::/16) and
Teredo (2001::/32) addresses are judged as themselves *and* as each IPv4 address inside: denied
if any of them is, allowed only if all are. So a denied IPv4 address is denied whatever IPv6
form it comes in.

Built-in denials (``default_deny = true``, the default) come before any configured rule:
on the host its own loopback and unspecified addresses and every address of its own
interfaces (a VM must not reach the host's services, as the subnet's firewall also refuses),
and on both ends link-local and cloud-metadata addresses (169.254.0.0/16 holds
169.254.169.254; fd00:ec2::254 is AWS's IPv6 metadata). A guest's proxy server may reach its
own loopback and addresses: that is what ``VMID.vmbusify`` means to the host.

On the host, also before any allow rule and whatever ``default_deny`` says: the addresses
that belong to VMs, so no VM reaches another through the host's proxy (the subnet's firewall
keeps them apart the same way): the subnet's ranges (``[subnet] cidr``, ``cidr6``: the host
assigns them to VMs) and every address the configuration gives a VM (``[[vms]] ips``). Never
what VMs report: a VM claiming an address would then block it for everyone. One switch lifts
this, for the subnet and the proxy alike: ``[subnet] allow_vm_to_vm = true``.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

# Rule and parse_rule live in the config model, which checks every rule at load; they are
# re-exported here, where the policy uses them.
from vmbusify.config import ProxyConfig, Role, Rule, SubnetConfig, VMEntry, parse_rule
from vmbusify.system import IPAddress, interface_addresses

#: Denied on both ends unless default_deny is off: link-local and cloud metadata.
METADATA_DENY = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")
#: Also denied on the host: the host's own loopback, and the unspecified addresses that
#: Linux connects to loopback.
HOST_DENY = ("127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128")


def unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped or IPv4-compatible IPv6 address, else ``ip``."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        packed = ip.packed
        if packed[:12] == bytes(12) and packed[12:] not in (bytes(4), b"\0\0\0\1"):
            return ipaddress.IPv4Address(packed[12:])  # ::a.b.c.d (deprecated form)
    return ip


#: NAT64 prefixes: the well-known one (RFC 6052, IPv4 in the last 32 bits) and the local-use
#: one (RFC 8215), whose networks may embed the IPv4 address at any RFC 6052 position.
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
#: Where RFC 6052 puts the IPv4 address's four bytes, per prefix length (byte 8 is the
#: reserved "u" octet, skipped).
_RFC6052_BYTES = {48: (6, 7, 9, 10), 56: (7, 9, 10, 11), 64: (9, 10, 11, 12),
                  96: (12, 13, 14, 15)}
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")  # IPv4-translated, RFC 2765
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses a NAT64, 6to4 or Teredo address stands for (else none)."""
    packed = ip.packed
    out: list[ipaddress.IPv4Address] = []
    if ip in NAT64_WELL_KNOWN:
        out.append(ipaddress.IPv4Address(packed[12:]))
    elif ip in NAT64_LOCAL:
        # The last 32 bits always (the usual /96 layout); the other RFC 6052 layouts too,
        # unless they give 0.0.0.0/8, which is what zero padding reads as (else every /96
        # address would be refused). A /48 or /56 layout's last 32 bits are 0.0.0.0, so
        # such a translator is refused: a false refusal is possible, a way around is not.
        out.append(ipaddress.IPv4Address(packed[12:]))
        for length in (64, 56, 48):
            v4 = ipaddress.IPv4Address(bytes(packed[i] for i in _RFC6052_BYTES[length]))
            if v4 not in _THIS_NETWORK:
                out.append(v4)
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out += list(ip.teredo)  # (server, client)
    return list(dict.fromkeys(out))


def forms(ip: IPAddress) -> tuple[IPAddress, ...]:
    """Every address the policy judges for a connect to ``ip``.

    An IPv4-mapped, -translated or -compatible address is the IPv4 address (the connect goes
    there); a NAT64 / 6to4 / Teredo address is itself (the gateway or relay the packet goes
    to) and each IPv4 address inside (where it ends up); any other address is itself.
    """
    alias = unwrap(ip)
    if alias is not ip:
        return (alias,)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _SIIT:
            return (ipaddress.IPv4Address(ip.packed[12:]),)
        return (ip, *embedded_ipv4(ip))
    return (ip,)


def vm_rules(subnet: SubnetConfig | None, vms: Sequence[VMEntry]) -> list[tuple[Rule, str]]:
    """The destinations that belong to VMs, each with what it is (for the refusal): the
    subnet's ranges and the addresses the configuration gives each VM."""
    out: list[tuple[Rule, str]] = []
    if subnet is not None and subnet.enabled:
        for key in ("cidr", "cidr6"):
            text = getattr(subnet, key)
            if text:
                out.append((parse_rule(text), f"in the subnet's range {text} ([subnet] {key})"))
    for vm in vms:
        for text in vm.ips:
            out.append((parse_rule(text), f"{vm.vmid}'s address {text} ([[vms]] ips)"))
    return out


def parse_ip(text: str) -> IPAddress:
    """An address as connect() would use it (scope id dropped); ValueError if not an IP."""
    return ipaddress.ip_address(text.split("%", 1)[0])


class OwnAddresses:
    """This machine's interface addresses, read again at most every ``ttl`` seconds (they
    change when interfaces come and go; a check must not cost a scan every time)."""

    def __init__(self, read: Callable[[], Collection[IPAddress]] = interface_addresses,
                 ttl: float = 2.0) -> None:
        self._read = read
        self._ttl = ttl
        self._addresses: frozenset[IPAddress] = frozenset()
        self._read_at = float("-inf")

    def __call__(self) -> frozenset[IPAddress]:
        now = time.monotonic()
        if now - self._read_at >= self._ttl:
            self._addresses = frozenset(unwrap(ip) for ip in self._read())
            self._read_at = now
        return self._addresses


@dataclass(frozen=True)
class Decision:
    """The outcome of a check, with the rule that decided it (for the log)."""

    allowed: bool
    reason: str


@dataclass
class EgressPolicy:
    """The rules of one proxy server."""

    allow: list[Rule]
    deny: list[Rule] = field(default_factory=list)
    builtin: list[Rule] = field(default_factory=list)
    #: The addresses of this machine, denied like the built-in rules (None: not checked).
    own_addresses: Callable[[], Collection[IPAddress]] | None = None
    #: Destinations that belong to VMs (the subnet's ranges, configured VM addresses), each
    #: with what it is; denied before any allow rule ([] where VM -> VM is allowed).
    vms: list[tuple[Rule, str]] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: ProxyConfig, role: Role, subnet: SubnetConfig | None = None,
                    vms: Sequence[VMEntry] = ()) -> EgressPolicy:
        """The policy a ProxyConfig describes for an endpoint of ``role``.

        On the host, ``subnet`` and ``vms`` (the endpoint's ``[subnet]`` and ``[[vms]]``)
        give the destinations that belong to VMs, denied unless ``subnet.allow_vm_to_vm``;
        ``subnet`` None means the defaults (``SubnetConfig()``).
        """
        builtin: list[str] = []
        own: OwnAddresses | None = None
        if cfg.default_deny:
            builtin += METADATA_DENY
            if role is Role.HOST:
                builtin += HOST_DENY
                own = OwnAddresses()
        vm_deny: list[tuple[Rule, str]] = []
        if role is Role.HOST:
            subnet = subnet if subnet is not None else SubnetConfig()
            if not subnet.allow_vm_to_vm:
                vm_deny = vm_rules(subnet, vms)
        return cls([parse_rule(r) for r in cfg.allow], [parse_rule(r) for r in cfg.deny],
                   [parse_rule(r) for r in builtin], own, vm_deny)

    def check(self, address: str | IPAddress, port: int) -> Decision:
        """May this server connect to ``address``:``port``? Judged on every form of the
        address (``forms``): denied if any form is, allowed only if every form is."""
        try:
            ip = parse_ip(address) if isinstance(address, str) else address
        except ValueError:
            return Decision(False, f"{address!r} is not an IP address")
        judged = forms(ip)
        for form in judged:
            refusal = self._denial(form, port)
            if refusal:
                return Decision(False, refusal + _inside(form, ip))
        allowed_by: list[str] = []
        for form in judged:
            rule = next((r for r in self.allow if r.matches(form, port)), None)
            if rule is None:
                return Decision(False, f"{form}:{port} matches no allow rule" + _inside(form, ip))
            allowed_by.append(rule.text)
        return Decision(True, f"allowed by {', '.join(dict.fromkeys(allowed_by))}")

    def _denial(self, ip: IPAddress, port: int) -> str:
        """Why ``ip``:``port`` is denied before any allow rule is looked at ("" if not)."""
        for rule in self.builtin:
            if rule.matches(ip, port):
                return f"{ip} is in the built-in denial {rule.text}"
        if self.own_addresses is not None and ip in self.own_addresses():
            return f"{ip} is an address of this host (built-in denial)"
        for rule, what in self.vms:
            if rule.matches(ip, port):
                return f"{ip} is {what}: no VM -> VM ([subnet] allow_vm_to_vm is false)"
        for rule in self.deny:
            if rule.matches(ip, port):
                return f"{ip}:{port} matches deny rule {rule.text}"
        return ""


def _inside(form: IPAddress, ip: IPAddress) -> str:
    """" (inside IP)" when the judged form is not the address itself."""
    return "" if form == ip else f" (inside {ip})"
