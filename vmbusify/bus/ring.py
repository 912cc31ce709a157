"""A shared-memory lane for bulk bytes beside the bus (docs/performance.md, "A shared-memory
lane for bulk bytes").

Each laned worker link may carry two byte rings, one a direction, each a file in the bus's
root-only directory mapped by the worker and its mux (single producer, single consumer).
A DATA package whose payload the producer placed in the ring goes on the bus as a PKR: the
same header, on the same lane, in the same order, with a 16-byte reference (ring id,
absolute position, length) instead of its payload frame. ZeroMQ still carries every
message and its order; only the payload's bytes skip its two socket copies and its I/O
threads. A payload that does not fit (ring full, not negotiated, a peer of before the
rings) goes inline as before: nothing ever waits for ring space.

The consumer hands a received payload on as a read-only view of the ring and lets its
space go when the last view of it is gone (the tunnel's writer, a stream's reader: nobody
copies, and no view can see reused memory). It tells the producer how far the ring is free
with RLS messages (a cumulative position), batched.

Positions are absolute (they only grow); a payload that would cross the ring's end starts
at its beginning instead (the skipped tail is freed with the next release). The consumer
checks every reference against what it has taken and released (a stale or wrong one is a
malformed message, never a read outside the ring).

``RingSpace`` (producer) and ``RingTake`` (consumer) are the sans-I/O accounting, tested
alone (tests/unit/test_bus_ring.py); ``Ring`` maps a file, ``RingLink`` is one end's pair.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import re
import stat
import struct
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmbusify.bus.frames import Pkg, PkgRef
from vmbusify.bus.lanes import Lane, pkg_lane
from vmbusify.errors import BusError, RemoteProtocolError

#: Payloads smaller than this go inline (a ZeroMQ copy of them costs less than a PKR).
RING_MIN_PAYLOAD = 64 << 10
#: Ring sizes: a multiple of this, at most RING_MAX.
RING_UNIT = 64 << 10
RING_MAX = 64 << 20
#: The mapping reaches this far past the ring's end, so that a view rounded up to a whole
#: RING_UNIT (one ctypes type per unit count, not one per length) stays inside it.
GUARD = RING_UNIT
#: The consumer releases once this fraction of the ring is free to give back (1/n), or
#: when it has been idle for IDLE_RELEASE seconds.
RELEASE_EVERY = 4
IDLE_RELEASE = 0.005
#: Seconds a producer's ring must have been wholly released and unused before its pages
#: are given back (MADV_REMOVE: tmpfs frees them for both ends; the next payload faults
#: them in again).
TRIM_AFTER = 30.0
#: The reference a PKR carries: ring id, absolute position, length.
REF = struct.Struct(">IQI")
REF_SIZE = REF.size  # 16
#: A worker's ring size per direction, in MiB, from its environment (0: no rings).
RING_ENV = "VMBUSIFY_BUS_RING"
DEFAULT_RING_MIB = 8
#: Names of ring files in the bus directory.
_NAME = re.compile(r"ring\.[0-9]{1,10}\.[0-9a-f]{8}\.(?:tx|rx)")


def ring_size_from_env(environ: dict[str, str] | None = None) -> int:
    """The ring size (bytes per direction) ``VMBUSIFY_BUS_RING`` asks for (MiB; 0: none),
    DEFAULT_RING_MIB without it; a value that is no size gives none."""
    raw = (os.environ if environ is None else environ).get(RING_ENV)
    try:
        mib = DEFAULT_RING_MIB if raw is None else int(raw)
    except ValueError:
        return 0
    size = mib << 20
    return size if RING_UNIT <= size <= RING_MAX else 0


class RingSpace:
    """The producer's view of one ring: where the next payload goes and what is free.

    ``reserve(n)`` gives the absolute position of ``n`` bytes that fit before the ring's end,
    or None (no room: send inline); ``release(upto)`` takes the consumer's word that all
    before ``upto`` is free again.
    """

    __slots__ = ("head", "released", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        #: Where the next payload starts (absolute), and how far the consumer released.
        self.head = 0
        self.released = 0

    def reserve(self, n: int) -> int | None:
        """The position of ``n`` more bytes, or None if they do not fit now."""
        size = self.size
        if not 0 < n <= size:
            return None
        pos = self.head
        off = pos % size
        if off + n > size:
            pos += size - off  # start at the beginning; the tail is skipped
        if pos + n - self.released > size:
            return None
        self.head = pos + n
        return pos

    def release(self, upto: int) -> None:
        """The consumer is done with everything before ``upto``; RemoteProtocolError if it
        says more than was ever reserved (an older position is ignored)."""
        if upto > self.head:
            raise RemoteProtocolError(f"ring released to {upto}, past its head {self.head}")
        self.released = max(self.released, upto)


class _Taken:
    """One payload a consumer took: its span, and whether its last view is gone."""

    __slots__ = ("done", "end", "ref", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.done = False
        self.ref: Any = None  # the weak reference that watches its views


class RingTake:
    """The consumer's view of one ring: checks each reference, and works out how far the
    ring may be released (every payload before it done with, in order)."""

    __slots__ = ("_taken", "batch", "consumed", "sent", "size")

    def __init__(self, size: int, batch: int | None = None) -> None:
        self.size = size
        self.batch = batch if batch is not None else max(1, size // RELEASE_EVERY)
        #: The end of the last payload taken, and the last position released to the producer.
        self.consumed = 0
        self.sent = 0
        self._taken: collections.deque[_Taken] = collections.deque()

    def take(self, pos: int, n: int) -> _Taken:
        """Accept the payload at ``pos`` (``n`` bytes); RemoteProtocolError if the producer
        could not have put it there (out of order, outside the ring, over live bytes)."""
        size = self.size
        if not 0 < n <= size or pos < self.consumed or pos % size + n > size \
                or pos + n > self.sent + size:
            raise RemoteProtocolError(f"ring reference {pos}+{n} out of bounds (taken to "
                                      f"{self.consumed}, released to {self.sent}, size {size})")
        self.consumed = pos + n
        entry = _Taken(pos, pos + n)
        self._taken.append(entry)
        return entry

    def finish(self, entry: _Taken) -> None:
        """The last view of ``entry`` is gone."""
        entry.done = True
        taken = self._taken
        while taken and taken[0].done:
            taken.popleft()

    def releasable(self) -> int:
        """How far the ring is free: up to the first payload still in use."""
        return self._taken[0].start if self._taken else self.consumed

    def due(self, idle: bool = False) -> int | None:
        """The position to release now (and take it as sent), or None: less than a batch
        to give back (``idle``: anything)."""
        upto = self.releasable()
        if upto - self.sent >= (1 if idle else self.batch):
            self.sent = upto
            return upto
        return None

    @property
    def pending(self) -> bool:
        """Whether something could be released that was not."""
        return self.releasable() > self.sent


#: ctypes array types by RING_UNIT count (views are rounded up to whole units).
_ARRAYS: dict[int, Any] = {}


class Ring:
    """One ring file, mapped: ``size`` bytes of ring and GUARD beyond."""

    __slots__ = ("id", "map", "name", "size")

    def __init__(self, mm: mmap.mmap, size: int, ring_id: int, name: str) -> None:
        self.map = mm
        self.size = size
        self.id = ring_id
        self.name = name

    @staticmethod
    def check_size(size: int) -> None:
        if not RING_UNIT <= size <= RING_MAX or size % RING_UNIT:
            raise BusError(f"a ring of {size} bytes: not a multiple of {RING_UNIT} up to "
                           f"{RING_MAX}")

    @classmethod
    def create(cls, directory: Path, name: str, size: int, ring_id: int) -> Ring:
        """A new ring file (O_EXCL, mode 0600) in ``directory``, mapped."""
        cls.check_size(size)
        path = directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.ftruncate(fd, size + GUARD)
            mm = mmap.mmap(fd, size + GUARD)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(mm, size, ring_id, name)

    @classmethod
    def open(cls, directory: Path, name: str, size: int, ring_id: int) -> Ring:
        """The peer's ring file ``name`` in ``directory``, mapped; BusError if it is not a
        ring of this user's of ``size`` bytes."""
        cls.check_size(size)
        if not _NAME.fullmatch(name):
            raise BusError(f"not a ring file name: {name[:80]!r}")
        try:
            fd = os.open(directory / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise BusError(f"cannot open ring {name}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                    or st.st_size != size + GUARD or st.st_mode & 0o077):
                raise BusError(f"ring {name} is not a private file of {size + GUARD} bytes")
            mm = mmap.mmap(fd, size + GUARD)
        finally:
            os.close(fd)
        return cls(mm, size, ring_id, name)

    def trim(self) -> None:
        """Give the ring's pages back (its bytes are all released: none is read again)."""
        try:
            self.map.madvise(mmap.MADV_REMOVE, 0, len(self.map))
        except (AttributeError, OSError):
            pass  # not Linux, or a file system without holes: the pages stay

    def write(self, pos: int, data: bytes | memoryview) -> None:
        """Copy ``data`` in at absolute position ``pos`` (reserved, so it fits)."""
        off = pos % self.size
        self.map[off:off + len(data)] = data

    def buffer(self, pos: int, n: int) -> memoryview:
        """A writable view of ``n`` bytes at ``pos`` (to receive a payload into)."""
        off = pos % self.size
        return memoryview(self.map)[off:off + n]

    def view(self, pos: int, n: int, entry: _Taken, on_done: Callable[[_Taken], None]
             ) -> memoryview:
        """A read-only view of ``n`` bytes at ``pos``; ``on_done(entry)`` is called when the
        last view of it (slices included) is gone."""
        off = pos % self.size
        units = -(-n // RING_UNIT)
        array = _ARRAYS.get(units)
        if array is None:
            array = _ARRAYS[units] = ctypes.c_char * (units * RING_UNIT)
        owner = array.from_buffer(self.map, off)
        entry.ref = weakref.ref(owner, lambda _r: on_done(entry))
        return memoryview(owner).cast("B")[:n].toreadonly()

    def unlink(self, directory: Path) -> None:
        """Remove the file (the mappings stay)."""
        try:
            os.unlink(directory / self.name)
        except FileNotFoundError:
            pass


def ring_names(pid: int, ring_id: int) -> tuple[str, str]:
    """The file names of a worker's two rings: the one it writes, the one it reads."""
    return f"ring.{pid}.{ring_id:08x}.tx", f"ring.{pid}.{ring_id:08x}.rx"


def remove_stale(directory: Path) -> int:
    """Remove ring files of processes that are gone (a worker killed before its mux took
    them); returns how many."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if not _NAME.fullmatch(name):
            continue
        pid = int(name.split(".")[1])
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(directory / name)
            removed += 1
        except OSError:
            pass
    return removed


class RingLink:
    """One end's two rings of one worker link: ``tx`` it writes (the peer reads), ``rx`` it
    reads. ``send_release(ring_id, upto)`` tells the peer how far ``rx`` is free (called from
    the loop, never from inside a view's finalizer)."""

    def __init__(self, ring_id: int, tx: Ring, rx: Ring,
                 send_release: Callable[[int, int], None],
                 call_soon: Callable[..., Any], call_later: Callable[..., Any]) -> None:
        self.id = ring_id
        self.tx, self.rx = tx, rx
        self.space = RingSpace(tx.size)
        self.take = RingTake(rx.size)
        #: The peer reads ``tx`` (negotiated: REGOK for a worker, the REG for the mux).
        self.tx_on = False
        self._send_release = send_release
        self._call_soon, self._call_later = call_soon, call_later
        self._flush_due = False
        self._idle_timer: Any = None
        self._trim_timer: Any = None
        #: Payloads placed when the trim timer was set (none since: the ring is idle).
        self._placed_then = -1
        self.closed = False
        #: Payloads placed in the ring, and sent inline for want of room; times its pages
        #: were given back.
        self.placed = 0
        self.inline = 0
        self.trims = 0
        #: RLS messages received for ``tx`` (each one bus message from the consumer).
        self.releases = 0
        #: A payload being received straight into ``tx`` (``stage``): its view, its position
        #: and where the ring's head was before it.
        self._staged: tuple[memoryview, int, int] | None = None

    # -- producing -------------------------------------------------------------------------
    def stage(self, n: int) -> memoryview | None:
        """A writable view of ``n`` bytes of ``tx`` to receive a payload into (the mux's
        tunnel reads into it), or None (no room, or one is being received already). Until
        it is placed (``place(view)``: no copy) or taken back (``unstage``), nothing else
        is placed: its position must come first."""
        if not self.tx_on or self._staged is not None or n < RING_MIN_PAYLOAD:
            return None
        head = self.space.head
        pos = self.space.reserve(n)
        if pos is None:
            return None
        view = self.tx.buffer(pos, n)
        self._staged = (view, pos, head)
        return view

    @property
    def staged(self) -> memoryview | None:
        """The view a payload is being received into (``stage``), if any."""
        return self._staged[0] if self._staged is not None else None

    def unstage(self, view: memoryview) -> None:
        """``view`` (from ``stage``) was not placed: give its room back."""
        staged = self._staged
        if staged is not None and staged[0] is view:
            self._staged = None
            self.space.head = staged[2]

    def takes(self, msg: Pkg) -> bool:
        """Whether ``msg``'s payload may go through ``tx``: the peer maps it, the payload is
        large, and it is a bulk-lane package (a consumer takes a ring's payloads in their
        order, and the control lane is read first). The size is looked at before the header."""
        return (self.tx_on and len(msg.payload) >= RING_MIN_PAYLOAD
                and pkg_lane(msg.vmid, msg.header, len(msg.payload))[0] is Lane.BULK)

    def referenced(self, msg: Pkg) -> Pkg | PkgRef:
        """``msg`` as a PKR if its payload went into ``tx`` (``takes`` said it may), else
        ``msg`` itself (no room: inline)."""
        ref = self.place(msg.payload)
        return msg if ref is None else PkgRef(msg.vmid, msg.header, ref)

    def place(self, payload: bytes | memoryview) -> bytes | None:
        """Copy ``payload`` into ``tx`` and return its reference, or None (send it inline).
        A staged view is placed where it is."""
        n = len(payload)
        staged = self._staged
        if staged is not None:
            if payload is not staged[0]:
                return None
            self._staged = None
            self.placed += 1
            return REF.pack(self.id, staged[1], n)
        if not self.tx_on or n < RING_MIN_PAYLOAD:
            return None
        pos = self.space.reserve(n)
        if pos is None:
            self.inline += 1
            return None
        self.tx.write(pos, payload)
        self.placed += 1
        return REF.pack(self.id, pos, n)

    def released(self, ring_id: int, upto: int) -> None:
        """The peer's RLS; one for another ring (an older link) is ignored."""
        if ring_id == self.id:
            self.releases += 1
            self.space.release(upto)
            if self.space.released == self.space.head and self._trim_timer is None:
                self._placed_then = self.placed
                self._trim_timer = self._call_later(TRIM_AFTER, self._trim)

    def _trim(self) -> None:
        """TRIM_AFTER after the ring was last wholly released: if nothing was placed since
        and all is still released, its pages go back to the system."""
        self._trim_timer = None
        space = self.space
        if self.closed or self._staged is not None or space.released != space.head:
            return
        if self.placed != self._placed_then:  # used meanwhile: look again later
            self._placed_then = self.placed
            self._trim_timer = self._call_later(TRIM_AFTER, self._trim)
            return
        self.tx.trim()
        self.trims += 1

    # -- consuming -------------------------------------------------------------------------
    def resolve(self, ref: bytes | memoryview) -> memoryview:
        """The payload a reference stands for, as a read-only view of ``rx``;
        RemoteProtocolError for a stale or malformed one."""
        if len(ref) != REF_SIZE:
            raise RemoteProtocolError(f"ring reference of {len(ref)} bytes")
        ring_id, pos, n = REF.unpack(ref)
        if ring_id != self.id or self.closed:
            raise RemoteProtocolError(f"reference to ring {ring_id:08x}, not {self.id:08x}")
        entry = self.take.take(pos, n)
        return self.rx.view(pos, n, entry, self._finished)

    def _finished(self, entry: _Taken) -> None:
        # In a finalizer (whatever code dropped the last view): no I/O here.
        if self.closed:
            return
        self.take.finish(entry)
        if self._flush_due:
            return
        if self.take.releasable() - self.take.sent >= self.take.batch:
            self._flush_due = True
            self._call_soon(self._flush)
        elif self._idle_timer is None and self.take.pending:
            self._idle_timer = self._call_later(IDLE_RELEASE, self._idle)

    def _flush(self, idle: bool = False) -> None:
        self._flush_due = False
        if self.closed:
            return
        upto = self.take.due(idle)
        if upto is not None:
            try:
                self._send_release(self.id, upto)
            except BusError:
                pass  # the peer is gone; a new link makes new rings

    def _idle(self) -> None:
        self._idle_timer = None
        self._flush(idle=True)

    def close(self) -> None:
        """Stop: no more releases, no more references taken (mappings stay while views do)."""
        self.closed = True
        self.tx_on = False
        for timer in (self._idle_timer, self._trim_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._trim_timer = None
