"""Stable subnet addresses: each VM keeps the address it got first, across reconnects and
restarts of either end.

The host keeps ``{vmid: index}`` in ``<state_dir>/subnet-leases.json`` (written atomically);
index K means ``.K`` in the IPv4 subnet and ``::K`` in the IPv6 prefix. Index 1 is the host,
the network and broadcast addresses are never given, and a VM that comes back gets its old
index even if the subnet was changed (as long as the index still fits).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from pathlib import Path

from vmbusify.errors import SubnetError

log = logging.getLogger(__name__)

GATEWAY_INDEX = 1


class LeaseTable:
    """vmid -> index, persisted; and the reverse lookups the host's packet path needs."""

    def __init__(self, path: Path, network: ipaddress.IPv4Network,
                 network6: ipaddress.IPv6Network | None = None) -> None:
        if network.num_addresses < 4:
            raise SubnetError(f"subnet {network} is too small (a /30 at most)")
        self.path = path
        self.network = network
        self.network6 = network6
        self._index: dict[str, int] = {}
        self._load()

    @property
    def last_index(self) -> int:
        """The highest index a VM can get (the broadcast address is not one)."""
        return self.network.num_addresses - 2

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
            raw = doc.get("leases", {}) if isinstance(doc, dict) else {}
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("leases file %s unreadable (%s); starting afresh", self.path, exc)
            return
        for vmid, index in raw.items():
            if isinstance(vmid, str) and isinstance(index, int) and \
                    GATEWAY_INDEX < index <= self.last_index and index not in self._index.values():
                self._index[vmid] = index

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"version": 1, "leases": self._index}, indent=1) + "\n")
        os.replace(tmp, self.path)

    def index_for(self, vmid: str) -> int:
        """The index of ``vmid``, given now if it has none; SubnetError if the subnet is full."""
        index = self._index.get(vmid)
        if index is not None:
            return index
        used = set(self._index.values())
        for candidate in range(GATEWAY_INDEX + 1, self.last_index + 1):
            if candidate not in used:
                self._index[vmid] = candidate
                self._save()
                log.info("vm=%s: new lease %s", vmid, self.address(candidate))
                return candidate
        raise SubnetError(f"subnet {self.network} is full ({len(used)} VMs)")

    def address(self, index: int) -> ipaddress.IPv4Address:
        return self.network.network_address + index

    def address6(self, index: int) -> ipaddress.IPv6Address | None:
        return self.network6.network_address + index if self.network6 is not None else None

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.address(GATEWAY_INDEX)

    @property
    def gateway6(self) -> ipaddress.IPv6Address | None:
        return self.address6(GATEWAY_INDEX)

    def packed_addresses(self, vmid: str) -> list[bytes]:
        """The VM's addresses as packed bytes (what its packets must carry as source)."""
        index = self.index_for(vmid)
        out = [self.address(index).packed]
        v6 = self.address6(index)
        if v6 is not None:
            out.append(v6.packed)
        return out

    def items(self) -> dict[str, int]:
        return dict(self._index)
