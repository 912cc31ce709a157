"""nat (docs/subnet.md): the host's nftables table and IP forwarding for the subnet.

Every rule lives in one table of our own (``table inet vmbusify`` by default, named per lab
instance). ``apply`` replaces the table in one nft transaction (``add`` + ``delete`` +
definition), so it is idempotent and never leaves half a ruleset; ``remove`` deletes the
table and nothing else. Base chains have policy ``accept``: they only decide traffic that
enters or leaves our TUN, and leave everything else to whoever else filters on the host.

Forwarding is switched on per interface (``net.ipv4.conf.<if>.forwarding`` of the TUN and
the uplink), not machine-wide: IPv4 decides by the *input* interface's flag, so the host
forwards for the subnet and its replies and for nothing else. Each flag the worker changes is
recorded in the state directory before it is changed, and put back on stop only if it is
still ours to restore (``conf.all.forwarding`` still off: nobody switched forwarding on for
the whole machine since). See docs/subnet.md.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from vmbusify.errors import SubnetError
from vmbusify.workers.subnet.command import run

log = logging.getLogger(__name__)

_TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,30}$")
SYSCTL = Path("/proc/sys/net")


@dataclass(frozen=True)
class NatPolicy:
    """What the host's table says, computed from the config (pure data)."""

    table: str
    tun: str
    cidr: str
    #: "" when the host has no uplink: VMs then reach the host only.
    uplink: str = ""
    cidr6: str = ""
    allow_vm_to_vm: bool = False

    def __post_init__(self) -> None:
        check_table(self.table)


def check_table(name: str) -> str:
    """``name`` if it is a safe nftables table name; SubnetError otherwise."""
    if not _TABLE_RE.match(name):
        raise SubnetError(f"invalid nftables table name {name!r} (letters, digits, _ and -, "
                          "starting with a letter, at most 31)")
    return name


def ruleset(p: NatPolicy) -> str:
    """The nft script that (re)creates the table atomically."""
    tun = json.dumps(p.tun)
    vm_to_vm = "accept" if p.allow_vm_to_vm else "drop"
    forward = [
        # The tunnel has a large MTU, the outside 1500: clamp the MSS of SYNs to the route's.
        f'iifname {tun} tcp flags syn / syn,rst tcp option maxseg size set rt mtu',
        f'oifname {tun} tcp flags syn / syn,rst tcp option maxseg size set rt mtu',
        f'iifname {tun} oifname {tun} {vm_to_vm}',
    ]
    postrouting: list[str] = []
    if p.uplink:
        up = json.dumps(p.uplink)
        forward += [
            f'iifname {tun} oifname {up} accept',
            f'iifname {up} oifname {tun} ct state established,related accept',
        ]
        postrouting.append(f'oifname {up} ip saddr {p.cidr} masquerade')
        if p.cidr6:
            postrouting.append(f'oifname {up} ip6 saddr {p.cidr6} masquerade')
    forward += [f'iifname {tun} drop', f'oifname {tun} drop']
    inbound = [
        f'iifname {tun} ct state established,related accept',
        f'iifname {tun} meta l4proto {{ tcp, udp }} th dport 53 accept',
        f'iifname {tun} meta l4proto {{ icmp, ipv6-icmp }} accept',
        f'iifname {tun} drop',
    ]
    lines = [
        f"add table inet {p.table}",
        f"delete table inet {p.table}",
        f"table inet {p.table} {{",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        *[f"    {r}" for r in forward],
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        *[f"    {r}" for r in inbound],
        "  }",
        "  chain output {",
        "    type filter hook output priority filter; policy accept;",
        f"    oifname {tun} icmp type redirect drop",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        *[f"    {r}" for r in postrouting],
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def apply(policy: NatPolicy) -> None:
    """Install (or replace) the table; SubnetError if nft refuses it."""
    run(["nft", "-f", "-"], input=ruleset(policy))
    log.info("nft table inet %s installed (tun %s, uplink %s, vm-to-vm %s)", policy.table,
             policy.tun, policy.uplink or "none", "allowed" if policy.allow_vm_to_vm else "blocked")


def table_exists(table: str) -> bool:
    """Whether our table is present."""
    return run(["nft", "list", "table", "inet", check_table(table)], check=False).returncode == 0


def remove(table: str) -> bool:
    """Delete our table if present (nothing else); True if it was there."""
    if not table_exists(table):
        return False
    run(["nft", "delete", "table", "inet", check_table(table)])
    log.info("nft table inet %s removed", table)
    return True


# --- forwarding ---------------------------------------------------------------------------------


class Forwarding:
    """Per-interface forwarding flags this worker switched on, and how to put them back."""

    def __init__(self, state_dir: str, sysctl: Path = SYSCTL) -> None:
        self.sysctl = sysctl
        self.record = Path(state_dir) / "subnet-forwarding.json"

    def _path(self, family: str, ifname: str) -> Path:
        """The sysctl file of ``ifname``'s forwarding flag (family "ipv4" or "ipv6")."""
        return self.sysctl / family / "conf" / ifname / "forwarding"

    def _load(self) -> dict[str, str]:
        try:
            doc = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}

    def _save(self, changed: dict[str, str]) -> None:
        self.record.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if changed:
            self.record.write_text(json.dumps(changed))
        else:
            self.record.unlink(missing_ok=True)

    def enable(self, family: str, ifname: str) -> None:
        """Switch forwarding on for ``ifname``, remembering the old value if it was off."""
        path = self._path(family, ifname)
        try:
            before = path.read_text().strip()
        except OSError as exc:
            raise SubnetError(f"cannot read {path}: {exc.strerror}") from None
        if before == "1":
            return
        changed = self._load()
        changed.setdefault(str(path), before)  # written before the change: survives kill -9
        self._save(changed)
        try:
            path.write_text("1\n")
        except OSError as exc:
            raise SubnetError(f"cannot switch forwarding on ({path}): {exc.strerror}") from None
        log.info("forwarding on for %s (%s)", ifname, family)

    def restore(self) -> None:
        """Put back every flag we changed, unless forwarding was since switched on for all."""
        changed = self._load()
        for name, before in changed.items():
            path = Path(name)
            family = path.parts[-4] if len(path.parts) >= 4 else "ipv4"
            try:
                everyone = (self.sysctl / family / "conf" / "all" / "forwarding").read_text()
                if everyone.strip() == "1":
                    log.info("forwarding is on machine-wide now; leaving %s as it is", path)
                elif path.exists():
                    path.write_text(before + "\n")
                    log.info("forwarding restored to %s (%s)", before, path)
            except OSError as exc:
                log.warning("cannot restore %s: %s", path, exc.strerror)
        self._save({})
