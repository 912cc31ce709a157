"""Egress policy of a proxy server: which resolved addresses and ports it may connect to.

Rules are ``CIDR`` or ``CIDR:PORTS`` (``[v6-CIDR]:PORTS`` for IPv6), PORTS being a comma list
of ports and ``LOW-HIGH`` ranges: ``10.0.0.0/8:80,443,8000-8999``. An address must match an
allow rule and no deny rule: deny wins. Checks run on the *resolved* address (resolve, check,
connect: a name cannot rebind around the policy), after unwrapping IPv4-mapped and
IPv4-compatible IPv6 forms, so ``::ffff:127.0.0.1`` is judged as ``127.0.0.1``.

Built-in denials (``default_deny = true``, the default) come before any configured rule:
on the host its own loopback and unspecified addresses and every address of its own
interfaces (a VM must not reach the host's services, as the subnet's firewall also refuses),
and on both ends link-local and cloud-metadata addresses (169.254.0.0/16 holds
169.254.169.254; fd00:ec2::254 is AWS's IPv6 metadata). A guest's proxy server may reach its
own loopback and addresses: that is what ``VMID.vmbusify`` means to the host.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from vmbusify.config import ProxyConfig, Role
from vmbusify.errors import ConfigError
from vmbusify.system import IPAddress, interface_addresses

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Denied on both ends unless default_deny is off: link-local and cloud metadata.
METADATA_DENY = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")
#: Also denied on the host: the host's own loopback, and the unspecified addresses that
#: Linux connects to loopback.
HOST_DENY = ("127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128")


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow or deny rule: a network and the ports it covers (empty: every port)."""

    network: IPNetwork
    ports: tuple[tuple[int, int], ...] = ()
    text: str = ""

    def matches(self, ip: IPAddress, port: int) -> bool:
        """Whether ``ip``:``port`` falls under this rule."""
        if ip.version != self.network.version or ip not in self.network:
            return False
        return not self.ports or any(lo <= port <= hi for lo, hi in self.ports)


def _ports(text: str, rule: str) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        lo_text, sep, hi_text = part.strip().partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        except ValueError:
            raise ConfigError(f"proxy rule {rule!r}: bad port {part!r}") from None
        if not 0 <= lo <= hi <= 65535:
            raise ConfigError(f"proxy rule {rule!r}: port range {part!r} out of 0..65535")
        out.append((lo, hi))
    return tuple(out)


def parse_rule(text: str) -> Rule:
    """A rule from its config text; ConfigError if malformed."""
    raw = text.strip()
    ports, sep = "", ""
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0 or (raw[end + 1:] and not raw[end + 1:].startswith(":")):
            raise ConfigError(f"proxy rule {text!r}: expected [CIDR] or [CIDR]:PORTS")
        cidr, sep, ports = raw[1:end], raw[end + 1:end + 2], raw[end + 2:]
    elif raw.count(":") == 1:
        cidr, sep, ports = raw.partition(":")
    else:
        cidr = raw
    if sep and not ports:
        raise ConfigError(f"proxy rule {text!r}: empty port list after ':'")
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise ConfigError(f"proxy rule {text!r}: {exc}") from None
    return Rule(network, _ports(ports, text) if sep else (), raw)


def unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped or IPv4-compatible IPv6 address, else ``ip``."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        packed = ip.packed
        if packed[:12] == bytes(12) and packed[12:] not in (bytes(4), b"\0\0\0\1"):
            return ipaddress.IPv4Address(packed[12:])  # ::a.b.c.d (deprecated form)
    return ip


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

    @classmethod
    def from_config(cls, cfg: ProxyConfig, role: Role) -> EgressPolicy:
        """The policy a ProxyConfig describes for an endpoint of ``role``."""
        builtin: list[str] = []
        own: OwnAddresses | None = None
        if cfg.default_deny:
            builtin += METADATA_DENY
            if role is Role.HOST:
                builtin += HOST_DENY
                own = OwnAddresses()
        return cls([parse_rule(r) for r in cfg.allow], [parse_rule(r) for r in cfg.deny],
                   [parse_rule(r) for r in builtin], own)

    def check(self, address: str | IPAddress, port: int) -> Decision:
        """May this server connect to ``address``:``port``?"""
        try:
            ip = parse_ip(address) if isinstance(address, str) else address
        except ValueError:
            return Decision(False, f"{address!r} is not an IP address")
        ip = unwrap(ip)
        for rule in self.builtin:
            if rule.matches(ip, port):
                return Decision(False, f"{ip} is in the built-in denial {rule.text}")
        if self.own_addresses is not None and ip in self.own_addresses():
            return Decision(False, f"{ip} is an address of this host (built-in denial)")
        for rule in self.deny:
            if rule.matches(ip, port):
                return Decision(False, f"{ip}:{port} matches deny rule {rule.text}")
        for rule in self.allow:
            if rule.matches(ip, port):
                return Decision(True, f"allowed by {rule.text}")
        return Decision(False, f"{ip}:{port} matches no allow rule")
