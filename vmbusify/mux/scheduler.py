"""The order packages leave on a tunnel: control first, then streams in turn.

One serialized tunnel carries every stream of every worker. Messages that are not stream
data (requests, ACKs, pings, window updates) jump the queue; stream data is taken one
package per stream in round-robin, so a bulk transfer cannot starve a small exec. How much
may wait here is the tunnel's to bound (``backlog``, checked before each put against
``[limits] tunnel_backlog``): the streams' credit windows bound well-behaved peers, but a
peer can grant itself credit, or send PINGs and REQUESTs and never read the answers.
"""

from __future__ import annotations

import asyncio
import collections

Item = tuple[bytes, bytes | memoryview]  # (header, payload)
StreamKey = tuple[int, int]  # (sending entity, stream id)

#: What a queued package costs beyond its bytes (the tuple, two bytes objects, a deque slot):
#: charged in ``backlog`` so a flood of tiny PONGs is bounded like a few big DATA packages.
PACKAGE_COST = 200


class Tally:
    """A running sum of the ``backlog`` of one or more queues (a mux's, over every VM)."""

    __slots__ = ("total",)

    def __init__(self) -> None:
        self.total = 0


class OutQueue:
    """A fair queue of packages waiting for the tunnel's socket."""

    def __init__(self) -> None:
        self._control: collections.deque[Item] = collections.deque()
        self._streams: collections.OrderedDict[StreamKey, collections.deque[Item]] = (
            collections.OrderedDict())
        self._ready = asyncio.Event()
        #: Bytes of every package waiting (control and DATA).
        self.bytes_queued = 0
        #: Bytes of the packages in the control queue (not bounded by any stream window).
        self.control_bytes = 0
        self._count = 0
        #: Where this queue adds its backlog (its own until it joins a shared one).
        self._tally = Tally()

    def __len__(self) -> int:
        return self._count

    @property
    def control_count(self) -> int:
        """Packages waiting in the control queue."""
        return len(self._control)

    @property
    def backlog(self) -> int:
        """What the waiting packages cost: their bytes plus PACKAGE_COST each."""
        return self.bytes_queued + PACKAGE_COST * self._count

    def share(self, tally: Tally) -> None:
        """Count this queue's backlog, from now on, in ``tally`` too."""
        self._tally.total -= self.backlog
        tally.total += self.backlog
        self._tally = tally

    def put_control(self, item: Item) -> None:
        """Queue a package that is not stream data."""
        self._control.append(item)
        n = len(item[0]) + len(item[1])
        self.bytes_queued += n
        self.control_bytes += n
        self._count += 1
        self._tally.total += n + PACKAGE_COST
        self._ready.set()

    def put_stream(self, key: StreamKey, item: Item) -> None:
        """Queue one DATA package of a stream."""
        q = self._streams.get(key)
        if q is None:
            q = self._streams[key] = collections.deque()
        q.append(item)
        n = len(item[0]) + len(item[1])
        self.bytes_queued += n
        self._count += 1
        self._tally.total += n + PACKAGE_COST
        self._ready.set()

    def pop(self) -> Item | None:
        """The next package to send, or None when empty."""
        if self._control:
            item = self._control.popleft()
            self.control_bytes -= len(item[0]) + len(item[1])
        elif self._streams:
            key, q = next(iter(self._streams.items()))
            item = q.popleft()
            if q:
                self._streams.move_to_end(key)
            else:
                del self._streams[key]
        else:
            return None
        n = len(item[0]) + len(item[1])
        self.bytes_queued -= n
        self._count -= 1
        self._tally.total -= n + PACKAGE_COST
        return item

    def clear(self) -> int:
        """Drop everything waiting (the peer is gone); returns the bytes dropped."""
        dropped = self.bytes_queued
        self._tally.total -= self.backlog
        self._control.clear()
        self._streams.clear()
        self.bytes_queued = self.control_bytes = self._count = 0
        return dropped

    async def get(self) -> Item:
        """Wait for the next package."""
        while True:
            item = self.pop()
            if item is not None:
                return item
            self._ready.clear()
            await self._ready.wait()
