"""Two lanes on every bus hop, so that control never waits behind another stream's bytes.

Each worker talks to its mux over two ZeroMQ connections (docs/protocol.md, "The bus: two
lanes"): the *bulk* lane carries stream bytes (a DATA package with a payload), the *control*
lane everything else (REQUESTs and their ACKs, MESSAGEs such as START and EXIT, EOF and
RESET, WINDOW credit, REG heartbeats, CTL, EVT). A receiver takes the control lane first,
so a new exec's START or EXIT no longer queues behind up to a credit window (8 MiB) of
another stream's output already handed to ZeroMQ.

Two lanes can reorder one stream: its EOF could overtake its last bytes (truncated output),
its first DATA could overtake the REQUEST that opens it (bytes for an unknown stream). So
every message carries a *stamp* (its lane, its number on that lane, and a dependency):

- the sender numbers each lane's messages 1, 2, 3, ...; for each stream (``(vmid, stream
  id)`` of the package header) it remembers on which lane and with which number it sent the
  stream's last message. A message of that stream sent on the *other* lane depends on that
  number: the receiver takes it only once it has taken that message of the other lane.
- a message that must follow everything sent before it (UNREG, EVT: a worker stopping, a
  tunnel gone) depends on the other lane's last number (a barrier);
- messages of stream 0 (tunnel-wide MESSAGEs, REG, CTL, ...) depend on nothing: they pass
  every stream's bytes. A message that must not pass a stream's bytes names the stream in
  its header.

Each lane is first-in first-out (one ZeroMQ connection), so one number per lane says what
was taken, and the order of one stream is the order it was sent in. A dependency always
names a message sent earlier, so two lanes never wait for each other. A lane's head that
waits holds the lane behind it (FIFO): only a stream whose bytes are already queued makes
control wait, and only until those bytes are taken.

This module is sans-I/O (no ZeroMQ, no asyncio): ``LaneSender`` stamps, ``LaneReceiver``
orders; both are tested as codecs (tests/unit/test_bus_lanes.py). vmbusify/bus/sockets.py
(``LanedDealer``) and the mux (vmbusify/mux/app.py) do the I/O.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Container, Hashable
from dataclasses import dataclass
from enum import IntEnum
from typing import Generic, TypeVar

from vmbusify.bus.frames import BusMessage, Evt, Frames, Pkg, PkgRef, Unreg
from vmbusify.errors import RemoteProtocolError
from vmbusify.protocol.package import HEADER_SIZE, PackageFlag, PackageType


class Lane(IntEnum):
    """Which of a hop's two connections a message takes."""

    #: Stream bytes: DATA packages with a payload.
    BULK = 0
    #: Everything else; a receiver takes it first.
    CONTROL = 1

    @property
    def other(self) -> Lane:
        """The other lane."""
        return Lane.CONTROL if self is Lane.BULK else Lane.BULK


#: The first byte of a stamp frame; a BusKind (ASCII) never starts with it, so a message
#: without a stamp (a worker or test of before the lanes) is told apart and taken as it comes.
STAMP_MARK = 0x01
_STAMP = struct.Struct(">BBQQ")  # mark, lane, seq, dep
STAMP_SIZE = _STAMP.size  # 18
#: The control lane's ZeroMQ identity is the worker's bulk identity followed by this.
CONTROL_SUFFIX = b"/c"
#: Streams whose last lane a sender remembers; past it the oldest are forgotten and a
#: stream it no longer knows depends on the newest number it forgot (never less safe).
MAX_STREAMS = 4096
#: Seconds a lane's head may wait for a message of the other lane that is not coming (the
#: far end restarted and that message went to the old process) before it is taken anyway.
HOLD_MAX = 2.0

_DATA = int(PackageType.DATA)
_RESET = int(PackageFlag.RESET)


@dataclass(frozen=True, slots=True)
class Stamp:
    """A message's lane, its number on that lane (from 1) and the number of the other
    lane's message it must follow (0: none)."""

    lane: Lane
    seq: int
    dep: int = 0

    def to_frame(self) -> bytes:
        """The stamp frame that goes before the message's own frames."""
        return _STAMP.pack(STAMP_MARK, self.lane, self.seq, self.dep)

    @staticmethod
    def is_stamp(frame: bytes | memoryview) -> bool:
        """Whether ``frame`` is a stamp (else it is a message's kind: no stamp)."""
        return len(frame) > 0 and frame[0] == STAMP_MARK

    @classmethod
    def parse(cls, frame: bytes | memoryview) -> Stamp:
        """A received stamp frame; RemoteProtocolError if malformed."""
        if len(frame) != STAMP_SIZE:
            raise RemoteProtocolError(f"bus stamp is {len(frame)} bytes, not {STAMP_SIZE}")
        _, lane, seq, dep = _STAMP.unpack(frame)
        if lane > 1 or seq == 0:  # unpacked unsigned: 0 (BULK) or 1 (CONTROL)
            raise RemoteProtocolError(f"bus stamp with lane {lane} and number {seq}")
        return cls(_LANES[lane], seq, dep)


#: Lane by its wire number, without Lane(n)'s lookup per message.
_LANES = (Lane.BULK, Lane.CONTROL)


def pkg_lane(vmid: str, header: bytes | memoryview, payload_size: int
             ) -> tuple[Lane, Hashable | None]:
    """The lane of a package and the stream it belongs to (None: stream 0), read from its
    24-byte header without decoding the rest."""
    if len(header) != HEADER_SIZE:
        return Lane.CONTROL, None
    stream = int.from_bytes(header[16:20], "big")
    key = (vmid, stream) if stream else None
    if header[5] == _DATA and payload_size and not header[7] & _RESET:
        return Lane.BULK, key
    return Lane.CONTROL, key


def classify(msg: BusMessage) -> tuple[Lane, Hashable | None, bool]:
    """A message's lane, its stream (None: none) and whether it is a barrier (it must follow
    everything sent before it: UNREG, EVT)."""
    if type(msg) is Pkg:
        lane, key = pkg_lane(msg.vmid, msg.header, len(msg.payload))
        return lane, key, False
    if type(msg) is PkgRef:  # the same lane as the PKG it stands for
        lane, key = pkg_lane(msg.vmid, msg.header, msg.length)
        return lane, key, False
    return Lane.CONTROL, None, type(msg) in (Unreg, Evt)


class LaneSender:
    """Numbers one end's messages on one hop and says what each must follow."""

    def __init__(self, max_streams: int = MAX_STREAMS) -> None:
        self._seq = [0, 0]
        #: stream -> (lane, number) of its last message; insertion order is age.
        self._last: dict[Hashable, tuple[Lane, int]] = {}
        #: Per lane, the newest number of a forgotten stream's last message.
        self._floor = [0, 0]
        self._max = max_streams

    def stamp(self, lane: Lane, key: Hashable | None = None, barrier: bool = False) -> Stamp:
        """The stamp of the next message on ``lane`` (of stream ``key``)."""
        other = lane.other
        dep = 0
        if barrier:
            dep = self._seq[other]
        elif key is not None:
            prev = self._last.pop(key, None)
            if prev is None:
                dep = self._floor[other]
            elif prev[0] is other:
                dep = prev[1]
        seq = self._seq[lane] + 1
        self._seq[lane] = seq
        if key is not None:
            self._last[key] = (lane, seq)
            if len(self._last) > self._max:
                old = next(iter(self._last))
                old_lane, old_seq = self._last.pop(old)
                self._floor[old_lane] = max(self._floor[old_lane], old_seq)
        return Stamp(lane, seq, dep)

    def frames(self, msg: BusMessage, usable: Container[Lane] | None = None,
               lane: Lane | None = None) -> tuple[Lane, list[bytes | memoryview]]:
        """The lane ``msg`` goes on and its frames, stamp first. ``usable``: the lanes known
        to be connected (a message for another goes on the other lane, in its order there);
        ``lane``: this lane whatever the message (a worker proving its bulk connection)."""
        kind, key, barrier = classify(msg)
        if lane is None:
            lane = kind if usable is None or kind in usable else kind.other
        return lane, [self.stamp(lane, key, barrier).to_frame(), *msg.to_frames()]


T = TypeVar("T")


class _Entry(Generic[T]):
    __slots__ = ("dep", "item", "seq", "since")

    def __init__(self, seq: int, dep: int, item: T, since: float) -> None:
        self.seq = seq
        self.dep = dep
        self.item = item
        self.since = since


class LaneReceiver(Generic[T]):
    """Merges what came on one hop's two lanes into the order to handle it: control first,
    each stream in the order it was sent (see the module's docstring).

    ``push`` what arrived; ``pop`` until it gives None. A message without a stamp (a peer
    of before the lanes) is queued on the bulk lane and taken in its turn.
    """

    def __init__(self) -> None:
        self._queues: tuple[collections.deque[_Entry[T]], collections.deque[_Entry[T]]] = (
            collections.deque(), collections.deque())
        #: Per lane: the number of the last message taken, and of the last one received.
        self._taken = [0, 0]
        self._seen = [0, 0]
        #: How often the far end was found to have started numbering again.
        self.restarts = 0
        #: How many held messages were taken without what they waited for (HOLD_MAX).
        self.expired = 0

    def __len__(self) -> int:
        return len(self._queues[0]) + len(self._queues[1])

    def push(self, stamp: Stamp | None, item: T, now: float = 0.0) -> None:
        """Queue what arrived (``stamp`` None: unstamped, taken in turn on the bulk lane)."""
        if stamp is None:
            self._queues[Lane.BULK].append(_Entry(0, 0, item, now))
            return
        lane = stamp.lane
        seen = self._seen[lane]
        if seen and stamp.seq <= seen:
            self._restart()  # the far end numbers from 1 again: a new process or mux
        elif not seen and not self._queues[lane]:
            # The first message seen on this lane: it numbers from here (a far end that
            # was there before this receiver, e.g. a worker meeting a new mux).
            self._taken[lane] = max(self._taken[lane], stamp.seq - 1)
        self._seen[lane] = stamp.seq
        self._queues[lane].append(_Entry(stamp.seq, stamp.dep, item, now))

    def _restart(self) -> None:
        """Forget the old numbering: what is queued is taken in order, waiting for nothing."""
        self.restarts += 1
        for q in self._queues:
            for e in q:
                e.seq = e.dep = 0
        self._taken = [0, 0]
        self._seen = [0, 0]

    def pop(self) -> T | None:
        """The next message to handle, or None (nothing queued, or all waits)."""
        for lane in (Lane.CONTROL, Lane.BULK):
            q = self._queues[lane]
            if q and q[0].dep <= self._taken[lane.other]:
                e = q.popleft()
                if e.seq:
                    self._taken[lane] = e.seq
                return e.item
        return None

    def expire(self, now: float, hold_max: float = HOLD_MAX) -> int:
        """Let a lane's head go that has waited ``hold_max`` seconds for a message that
        never came (nothing else can be taken); returns how many were let go."""
        released = 0
        while not self._ready():
            heads = [q[0] for q in self._queues if q]
            if not heads:
                break
            oldest = min(heads, key=lambda e: e.since)
            if now - oldest.since < hold_max:
                break
            oldest.dep = 0
            released += 1
        self.expired += released
        return released

    def _ready(self) -> bool:
        return any(q and q[0].dep <= self._taken[lane.other]
                   for lane, q in zip((Lane.BULK, Lane.CONTROL), self._queues, strict=True))


def split_stamp(frames: Frames) -> tuple[Stamp | None, Frames]:
    """A received message's stamp (None: it has none) and its own frames."""
    if frames and Stamp.is_stamp(frames[0]):
        return Stamp.parse(frames[0]), frames[1:]
    return None, frames
