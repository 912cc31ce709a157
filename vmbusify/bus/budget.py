"""What one worker holds for each VM, the caps on it (``[limits]``), and the counters.

A guest's root is hostile: it may open streams by the thousand, grant itself credit and stop
reading, or send what it was never asked for. Every byte and stream a worker holds on a VM's
behalf is charged to that VM's share here, so one VM meets its own cap and no other notices:

- **streams**: open at once with one VM (``streams_per_vm``) and in all (``streams_total``);
  past either, or while the VM's send budget (below) has been used up for ``TX_STUCK_AFTER``
  seconds with no credit back (its readers stalled), opening or accepting one raises
  LimitReached (the reason goes to the peer). A budget that is full while credit still
  flows (a legitimate burst: 1,000 connections each sending their first bytes) refuses
  nothing: the new stream's writer waits its turn like the others;
- **rx**: bytes received and not yet read by the application, summed over the VM's streams
  (``buffered_per_vm``, and ``buffered_total`` over every VM): a DATA package that would go
  past it resets its stream ("buffer limit reached");
- **tx**: bytes sent and not yet credited back (``buffered_per_vm``): a writer waits for the
  VM's budget as well as for its stream's credit, so what waits in the mux for a VM that
  granted credit on many streams and stopped reading stays bounded. Writers waiting for the
  budget are served in the order they came (each gets what it asked for, up to a chunk);
- **requests**: request handlers running for the VM (``requests_per_vm``), kept by the link.

Per package this is a dict lookup and a few integer updates; no task is created unless a
writer has to wait.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from vmbusify.config import LimitsConfig
from vmbusify.errors import LimitReached

#: Seconds a VM's send budget must have been used up with no credit coming back before new
#: streams to it are refused (its far readers stalled): below it the budget is only busy.
TX_STUCK_AFTER = 1.0


class Counter(str, Enum):
    """What is counted per VM (the keys of ``stats["limits"][vmid]``)."""

    #: Opens (ours or the peer's) refused at a stream cap.
    STREAMS_REFUSED = "streams_refused"
    #: Requests answered with an error at once: too many in flight for the VM.
    REQUESTS_REFUSED = "requests_refused"
    #: Streams reset because the VM's unread bytes would pass its cap.
    BUFFER_RESETS = "buffer_resets"
    #: Streams reset because the peer broke flow control (credit past the window, a WINDOW
    #: of 0, DATA past the credit it had).
    CREDIT_RESETS = "credit_resets"
    #: Packages dropped: malformed, of a type their route does not take, or for no route.
    BAD_PACKAGES = "bad_packages"
    #: DATA or WINDOW for a stream not open (never opened, or already finished: a few after
    #: a reset are normal, bytes that were in flight).
    UNKNOWN_STREAM = "unknown_stream"
    #: Handlers (or tasks they started) that failed with an unexpected error.
    HANDLER_ERRORS = "handler_errors"


class TxWaiter:
    """A writer waiting for its VM's send budget."""

    __slots__ = ("fut", "want")

    def __init__(self, want: int) -> None:
        self.want = want
        self.fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class VMShare:
    """One VM's use of this worker, and its counters."""

    vmid: str
    streams: int = 0
    #: Received, not yet read.
    rx: int = 0
    #: Sent, not yet credited back.
    tx: int = 0
    #: Request handlers running.
    requests: int = 0
    #: When credit last came back or the budget last filled up (Budget.clock); a budget
    #: full for TX_STUCK_AFTER since then is stuck.
    tx_progress: float = 0.0
    counters: dict[Counter, int] = field(default_factory=dict)
    waiters: collections.deque[TxWaiter] = field(default_factory=collections.deque)
    #: Credit owed to the VM: bytes its streams brought that were read and not yet
    #: returned (each stream returns its own at a quarter of a window), and the streams that
    #: owe it (vmbusify.bus.streams keeps both).
    owed: int = 0
    owing: dict[Any, None] = field(default_factory=dict)


class Budget:
    """Every VM's share of one worker, checked against ``[limits]``."""

    def __init__(self, limits: LimitsConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or LimitsConfig()
        self.clock = clock
        self.streams = 0
        self.rx = 0
        self._vms: dict[str, VMShare] = {}

    def vm(self, vmid: str) -> VMShare:
        """The share of ``vmid`` (vmids come from the mux, never from the peer's bytes)."""
        share = self._vms.get(vmid)
        if share is None:
            share = self._vms[vmid] = VMShare(vmid)
        return share

    def count(self, vmid: str, counter: Counter, n: int = 1) -> None:
        """Add ``n`` to one of the VM's counters."""
        c = self.vm(vmid).counters
        c[counter] = c.get(counter, 0) + n

    def snapshot(self) -> dict[str, dict[str, int]]:
        """The non-zero counters per VM, for the worker's stats (``stats["limits"]``)."""
        out: dict[str, dict[str, int]] = {}
        for vmid, share in self._vms.items():
            nonzero = {c.value: n for c, n in share.counters.items() if n}
            if nonzero:
                out[vmid] = nonzero
        return out

    # -- streams ---------------------------------------------------------------------------
    def add_stream(self, share: VMShare) -> None:
        """Charge one more stream; raises LimitReached (counted) at a cap: the VM's or the
        worker's stream count, or the VM's send budget used up and stuck (its peer has held
        that much unacknowledged for TX_STUCK_AFTER seconds: a new stream would only wait,
        so it is refused with the reason). A full budget whose credit still comes back is
        a busy one, not a stuck one: the open goes through and its writer waits in line."""
        lim = self.limits
        why = ""
        if share.streams >= lim.streams_per_vm:
            why = f"{share.vmid}: {share.streams} streams open: limit reached"
        elif self.streams >= lim.streams_total:
            why = f"{self.streams} streams open with all VMs: limit reached"
        elif (share.tx >= lim.buffered_per_vm
              and self.clock() - share.tx_progress >= TX_STUCK_AFTER):
            why = (f"{share.vmid}: {share.tx >> 20} MiB sent and not yet acknowledged: "
                   "limit reached")
        if why:
            self.count(share.vmid, Counter.STREAMS_REFUSED)
            raise LimitReached(why)
        share.streams += 1
        self.streams += 1

    def remove_stream(self, share: VMShare) -> None:
        share.streams -= 1
        self.streams -= 1

    def stream_room(self, share: VMShare) -> str:
        """Why no stream could be added now ("" if one could); counts a refusal."""
        try:
            self.add_stream(share)
        except LimitReached as exc:
            return str(exc)
        self.remove_stream(share)
        return ""

    # -- received bytes --------------------------------------------------------------------
    def rx_take(self, share: VMShare, n: int) -> bool:
        """Charge ``n`` received bytes; False (nothing charged) if a cap would be passed."""
        lim = self.limits
        if share.rx + n > lim.buffered_per_vm or self.rx + n > lim.buffered_total:
            return False
        share.rx += n
        self.rx += n
        return True

    def rx_release(self, share: VMShare, n: int) -> None:
        share.rx -= n
        self.rx -= n

    # -- sent bytes ------------------------------------------------------------------------
    def tx_try(self, share: VMShare, want: int) -> int:
        """Take up to ``want`` bytes of the VM's send budget now; 0: wait (tx_wait)."""
        if share.waiters:
            return 0  # others came first
        n = min(want, self.limits.buffered_per_vm - share.tx)
        if n <= 0:
            return 0
        share.tx += n
        if share.tx >= self.limits.buffered_per_vm:
            share.tx_progress = self.clock()  # just filled: stuck only if it stays so
        return n

    async def tx_wait(self, share: VMShare, waiter: TxWaiter) -> int:
        """Wait in line for the VM's budget; the bytes granted (0: withdrawn, see
        tx_withdraw). Call with a waiter made for this one wait."""
        share.waiters.append(waiter)
        try:
            return await waiter.fut
        except asyncio.CancelledError:
            if waiter.fut.done() and not waiter.fut.cancelled():
                self.tx_release(share, waiter.fut.result())  # granted, never used
            else:
                self._remove(share, waiter)
            raise

    def tx_withdraw(self, share: VMShare, waiter: TxWaiter) -> None:
        """Stop a wait (its stream was reset): tx_wait returns 0."""
        self._remove(share, waiter)
        if not waiter.fut.done():
            waiter.fut.set_result(0)

    def _remove(self, share: VMShare, waiter: TxWaiter) -> None:
        try:
            share.waiters.remove(waiter)
        except ValueError:
            pass

    def tx_release(self, share: VMShare, n: int) -> None:
        """``n`` bytes were credited back (or will never be): serve the waiters in order."""
        share.tx -= n
        share.tx_progress = self.clock()
        waiters = share.waiters
        cap = self.limits.buffered_per_vm
        while waiters and share.tx < cap:
            waiter = waiters.popleft()
            if waiter.fut.done():
                continue
            grant = min(waiter.want, cap - share.tx)
            share.tx += grant
            waiter.fut.set_result(grant)
