"""Counters of the proxy worker: open connections and bytes, per VM, for `vmbusifyctl status`.

Published with WorkerLink.report() as::

    {"open": 3, "vms": {"vm1": {"open": 2, "opened": 40, "refused": 1,
                                "bytes_in": 1234, "bytes_out": 99}}}

``bytes_in`` came from the tunnel, ``bytes_out`` went into it; a connection counts under the
VM at the other end of its tunnel, whichever end opened it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vmbusify.bus.streams import Stream


@dataclass
class VMCounters:
    """One VM's totals (closed connections; open ones are added at report time)."""

    open: int = 0
    opened: int = 0
    refused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class ConnStats:
    """Every live proxied connection, and totals per VM."""

    def __init__(self) -> None:
        self._vms: dict[str, VMCounters] = {}
        self._live: set[Stream] = set()

    def _vm(self, vmid: str) -> VMCounters:
        c = self._vms.get(vmid)  # not setdefault: that builds a VMCounters every time
        if c is None:
            c = self._vms[vmid] = VMCounters()
        return c

    def refused(self, vmid: str) -> None:
        """An open that failed (policy, connect error, handshake)."""
        self._vm(vmid).refused += 1

    def opened(self, stream: Stream) -> None:
        """A connection is now relaying."""
        c = self._vm(stream.vmid)
        c.open += 1
        c.opened += 1
        self._live.add(stream)

    def closed(self, stream: Stream) -> None:
        """The connection finished: fold its bytes into the totals."""
        if stream not in self._live:
            return
        self._live.discard(stream)
        c = self._vm(stream.vmid)
        c.open -= 1
        c.bytes_in += stream.bytes_in
        c.bytes_out += stream.bytes_out

    @property
    def open(self) -> int:
        return len(self._live)

    def snapshot(self) -> dict[str, Any]:
        """The report body."""
        vms = {vmid: asdict(c) for vmid, c in self._vms.items()}
        for s in self._live:
            vms[s.vmid]["bytes_in"] += s.bytes_in
            vms[s.vmid]["bytes_out"] += s.bytes_out
        return {"open": self.open, "vms": vms}
