"""A peer of the mux: on the host one per VM, on a guest the one host."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from vmbusify.mux.tunnel import Tunnel
from vmbusify.protocol.package import Payload

#: Packages held for a VM while the host connects to it on demand.
MAX_WAITING = 1024


class PeerState(str, Enum):
    """Where a peer's tunnel is in its life."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    #: Waiting before the next reconnect attempt.
    BACKOFF = "backoff"


@dataclass
class Peer:
    """The mux's record of one peer and its current tunnel."""

    vmid: str
    address: str
    state: PeerState = PeerState.DISCONNECTED
    tunnel: Tunnel | None = None
    last_error: str = ""
    #: The addresses the peer holds (claimed in its HELLO and judged by the mux's
    #: AddressBook, which keeps this in step); none while disconnected.
    ips: list[str] = field(default_factory=list)
    #: Its claims not held, each ``{ip, why, reason, with}`` (a conflict, the config).
    ips_refused: list[dict[str, Any]] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    connects: int = 0
    #: An operator disconnected this VM: do not reconnect until asked.
    manual_down: bool = False
    runner: asyncio.Task[None] | None = None
    #: (header, payload, sender identity) held while connecting on demand.
    waiting: list[tuple[bytes, Payload, bytes]] = field(default_factory=list)
    state_changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Packages from this peer the mux dropped, by reason (switch.DropReason values).
    dropped: dict[str, int] = field(default_factory=dict)
    #: Times a tunnel to this peer used up its read budget and let the others go first,
    #: and tunnels closed because the peer left too many bytes waiting: past tunnels only.
    read_yields: int = 0
    backlog_closes: int = 0
    # Added for issue 16 (docs/discovery.md): other names of the VM (a libvirt domain's
    # UUID) and where it came from ("config", "libvirt", "firecracker", ...).
    aliases: tuple[str, ...] = ()
    source: str = "config"

    def add_tunnel_counters(self, tunnel: Tunnel) -> None:
        """Keep the counters of a tunnel that ended."""
        self.bytes_in += tunnel.bytes_in
        self.bytes_out += tunnel.bytes_out
        self.read_yields += tunnel.read_yields
        self.backlog_closes += tunnel.backlog_closes

    def set_state(self, state: PeerState, error: str = "") -> None:
        self.state = state
        if error:
            self.last_error = error
        self.state_changed.set()
        self.state_changed = asyncio.Event()

    def status(self) -> dict[str, Any]:
        """The per-VM record of `vmbusifyctl status --json`."""
        t = self.tunnel
        hello = t.peer_hello if t else None
        return {
            "vmid": self.vmid,
            "address": self.address,
            "state": self.state.value,
            "connected_since": t.connected_since if t else None,
            "rtt_ms": round(t.rtt_ms, 3) if t and t.rtt_ms is not None else None,
            "ips": list(self.ips),
            "ips_refused": [dict(r) for r in self.ips_refused],
            "bytes_in": self.bytes_in + (t.bytes_in if t else 0),
            "bytes_out": self.bytes_out + (t.bytes_out if t else 0),
            "hostname": hello.hostname if hello else None,
            "peer_version": hello.software_version if hello else None,
            "connects": self.connects,
            "last_error": self.last_error,
            "queued_bytes": t.out.bytes_queued if t else 0,
            "dropped": dict(self.dropped),
            "read_yields": self.read_yields + (t.read_yields if t else 0),
            "backlog_closes": self.backlog_closes + (t.backlog_closes if t else 0),
            # Added for issue 16 (docs/metrics.md):
            "aliases": list(self.aliases),
            "source": self.source,
            "guest_stats": dict(t.peer_stats.counters) if t and t.peer_stats else None,
            "guest_stats_at": t.peer_stats_at if t and t.peer_stats else None,
        }
