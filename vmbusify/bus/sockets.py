"""ZeroMQ sockets of the bus: set-up (endpoints inside a root-only directory, no silent drops,
no linger) and BusSocket, which drives one from the asyncio loop.

BusSocket instead of pyzmq's asyncio sockets: those make a future (and for a zero-copy send,
a trip through pyzmq's garbage-collector thread) per message, which cost more CPU than
moving the bytes. Here the loop watches the socket's file descriptor and every waiting
message is handed to a callback at once; a send never waits, since high-water marks are off
and every byte that can queue is bounded by a stream's flow-control window.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import cast

import zmq
from zmq.backend import Socket as _RawSocket
from zmq.utils.monitor import recv_monitor_message

from vmbusify.bus.frames import BusMessage, Frames, Pkg, PkgRef, Release
from vmbusify.bus.lanes import CONTROL_SUFFIX, Lane, LaneSender
from vmbusify.bus.ring import Ring, RingLink, remove_stale, ring_names
from vmbusify.errors import BusError, RemoteProtocolError
from vmbusify.protocol.package import MAX_PAYLOAD_LIMIT
from vmbusify.system import ensure_private_dir

log = logging.getLogger(__name__)

#: Messages handled per wake-up before other callbacks get a turn.
RECV_BATCH = 64
#: pyzmq's compiled send and recv, without the Python layer of its Socket (zmq.sugar):
#: its send_multipart and recv_multipart cost 11-21 and 27 us a message of five frames,
#: these 4.4 and 15 (a getsockopt(RCVMORE) a frame, keyword checks); per package, in
#: every process of the data path (docs/performance.md, "The tunnel's data path").
_send_part = _RawSocket.send
_recv_part = _RawSocket.recv
_get_option = _RawSocket.get
_MORE = zmq.SNDMORE | zmq.NOBLOCK
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def shared_context() -> zmq.Context:
    """The process's one ZeroMQ context (linger 0), for worker links.

    One context per process, never terminated while the process lives: a context terminated
    by the garbage collector while a forgotten socket is still open blocks for ever
    (zmq_ctx_term waits for every socket), which a per-link context invites.
    """
    ctx: zmq.Context = zmq.Context.instance()
    ctx.linger = 0
    return ctx


#: Received frames at least this large are used in place (a view of the ZeroMQ message);
#: smaller ones are copied out, which is cheaper than keeping a message alive for them.
RECV_IN_PLACE = 64 << 10


def frame_payloads(frames: list[zmq.Frame]) -> list[bytes | memoryview]:
    """The contents of frames received with ``copy=False``: big ones as views, small as bytes.

    Sends of Python memory, by contrast, copy: a zero-copy send of it has pyzmq's
    garbage-collector thread take the GIL for every message to learn when libzmq let go of
    it, which cost more than the copy (measured with bench/tunnel.py). Memory that is
    ZeroMQ's own (``frame_buffer``) goes by reference.
    """
    return [f.buffer if len(f) >= RECV_IN_PLACE else f.bytes for f in frames]


#: Zeros to fill a new frame from (a private anonymous mapping that is only ever read, so
#: every page of it is the kernel's one zero page: the copy reads one cache-hot page).
_ZEROS = memoryview(mmap.mmap(-1, MAX_PAYLOAD_LIMIT, flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ))


def frame_buffer(n: int) -> memoryview:
    """A writable view of a new ZeroMQ frame of ``n`` bytes (an Allocator for
    PackageDecoder): a payload received into it goes on to the bus without a copy
    (``BusSocket.send`` hands the frame itself to ZeroMQ, which only counts a reference).

    The mux's decoder received a large payload into a bytearray, which ZeroMQ then copied:
    the bytearray's zeroing and that copy were 13 % of the guest mux's CPU in
    bench/tunnel.py (docs/performance.md, "The tunnel's data path").
    """
    if not 0 <= n <= MAX_PAYLOAD_LIMIT:
        raise ValueError(f"a frame buffer of {n} bytes is out of range")
    return zmq.Frame(_ZEROS[:n], copy=True).buffer


def _in_place(frames: Frames) -> Frames:
    """``frames`` with a last frame that is a whole view of a ZeroMQ frame (frame_buffer's,
    or a received one) replaced by that frame: ZeroMQ sends it by reference, not a copy."""
    last = frames[-1] if frames else b""
    if type(last) is memoryview:
        frame = last.obj
        if type(frame) is zmq.Frame and last.nbytes == len(frame):
            return [*frames[:-1], frame]
    return frames


def bus_directory(endpoint: str) -> Path | None:
    """The root-only directory of an ``ipc://`` bus endpoint (its socket and the rings
    beside it); None for another transport."""
    if not endpoint.startswith("ipc://"):
        return None
    return Path(endpoint[len("ipc://"):]).parent


def bind_router(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """The mux's ROUTER: raises on unroutable peers (ROUTER_MANDATORY) instead of dropping.

    High-water marks are off: every byte that can queue here is bounded by a stream's
    flow-control window, and a full queue must never drop a package silently.
    """
    directory = bus_directory(endpoint)
    if directory is not None:
        ensure_private_dir(directory)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    old = os.umask(0o177)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(old)
    return sock


def worker_identity(name: str) -> bytes:
    """A unique ZeroMQ identity for a worker: name + pid + random suffix (as circus does)."""
    return f"{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}".encode()


def connect_dealer(ctx: zmq.Context, endpoint: str, name: str,
                   identity: bytes | None = None) -> zmq.Socket:
    """A worker's DEALER with ``identity`` (default: a new ``worker_identity(name)``)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.IDENTITY, identity or worker_identity(name))
    sock.connect(endpoint)
    return sock


class BusSocket:
    """A ZeroMQ socket served by the running asyncio loop: ``on_message(frames)`` is called
    for each message received (frames as ``frame_payloads`` gives them); ``send`` never waits.

    ZeroMQ's descriptor only signals that the socket's state *may* have changed, and a send
    can swallow that signal for a message that arrived meanwhile: so every wake-up reads
    until nothing is left, and after the sends of each turn of the loop it checks whether a
    message is waiting.
    """

    def __init__(self, sock: zmq.Socket, on_message: Callable[[Frames], None],
                 context: zmq.Context | None = None) -> None:
        self.sock = sock
        #: A context of its own, terminated on close (the mux's); None: the shared one.
        self._context = context
        self.on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._fd = int(sock.getsockopt(zmq.FD))
        self._scheduled = False
        self._check_scheduled = False
        self._closed = False
        self._loop.add_reader(self._fd, self._readable)
        self._monitor: zmq.Socket | None = None
        self._on_peer: Callable[[bool], None] | None = None

    def watch_peer(self, on_peer: Callable[[bool], None]) -> None:
        """Call ``on_peer(True)`` when the connection to the peer is made (again) and
        ``on_peer(False)`` when it is lost (ZeroMQ's socket monitor): a worker learns at
        once that its mux went away, instead of at its next heartbeat."""
        mon = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._monitor, self._on_peer = mon, on_peer
        self._loop.add_reader(int(mon.getsockopt(zmq.FD)), self._monitor_readable)
        self._loop.call_soon(self._monitor_readable)  # ZeroMQ's FD signals edges: read now

    def _monitor_readable(self) -> None:
        mon, on_peer = self._monitor, self._on_peer
        while mon is not None and on_peer is not None and not self._closed:
            try:
                event = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                on_peer(event["event"] == zmq.EVENT_CONNECTED)
            except Exception:  # a handler's bug must not stop the bus
                log.exception("bus peer event handler failed")

    def _readable(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        sock = self.sock
        for _ in range(RECV_BATCH):
            try:
                frame = _recv_part(sock, zmq.NOBLOCK, False)
            except zmq.Again:
                return
            frames = [frame]
            while frame.more:  # the rest of a message is there once its first frame is
                frame = _recv_part(sock, 0, False)
                frames.append(frame)
            try:
                self.on_message(frame_payloads(frames))
            except Exception:  # a handler's bug must not stop the bus
                log.exception("bus message handler failed")
            if self._closed:
                return
        self._schedule()  # more may be waiting: go on after the loop's other callbacks

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._readable)

    @classmethod
    def router(cls, endpoint: str, on_message: Callable[[Frames], None]) -> BusSocket:
        """The mux's end of the bus: a ROUTER bound at ``endpoint`` (bind_router), with a
        ZeroMQ context of its own that ``close`` terminates."""
        ctx = zmq.Context()
        try:
            sock = bind_router(ctx, endpoint)
        except zmq.ZMQError as exc:
            ctx.term()
            raise BusError(f"cannot bind the bus at {endpoint}: {exc}") from None
        return cls(sock, on_message, ctx)

    @classmethod
    def dealer(cls, endpoint: str, name: str, on_message: Callable[[Frames], None]
               ) -> BusSocket:
        """A worker's end of the bus: a DEALER connected to ``endpoint`` (connect_dealer) on
        the process's shared context."""
        return cls(connect_dealer(shared_context(), endpoint, name), on_message)

    def send(self, frames: Frames) -> None:
        """Queue a message (copied, but for a last frame that is a ZeroMQ frame's whole
        view: that goes by reference, see ``frame_buffer``); raises BusError (e.g.
        EHOSTUNREACH: a ROUTER addressing a peer that is gone)."""
        sock = self.sock
        frames = _in_place(frames)
        try:
            for part in frames[:-1]:
                _send_part(sock, part, _MORE)
            _send_part(sock, frames[-1], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            raise BusError(str(exc)) from None
        if not self._check_scheduled:  # once per turn of the loop, not once per send
            self._check_scheduled = True
            self._loop.call_soon(self._check_events)

    def _check_events(self) -> None:
        """After the sends of one turn of the loop: read what they may have left unsignalled
        (asking for EVENTS costs two system calls, a poll and libzmq's getpid)."""
        self._check_scheduled = False
        if self._scheduled or self._closed:
            return  # a read is on its way anyway
        if cast(int, _get_option(self.sock, _EVENTS)) & _POLLIN:
            self._readable()

    def send_message(self, msg: BusMessage) -> None:
        """Send a bus message (a vmbusify.bus.frames dataclass); raises BusError."""
        self.send(msg.to_frames())

    def send_to(self, identity: bytes, msg: BusMessage) -> None:
        """On a ROUTER: send a bus message to the peer ``identity``; raises BusError."""
        self.send([identity, *msg.to_frames()])

    def close(self, linger_ms: int = 0) -> None:
        """Stop watching and close the socket (idempotent); ``linger_ms``: how long what is
        still queued may take to leave (0: dropped)."""
        if self._closed:
            return
        self._closed = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        if self._monitor is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(int(self._monitor.getsockopt(zmq.FD)))
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self.sock.close(linger=linger_ms)
        if self._context is not None:
            self._context.term()
            self._context = None


class LanedDealer:
    """A worker's end of the bus as two lanes (vmbusify.bus.lanes): a bulk DEALER and a
    control DEALER, whose identity is the bulk one's followed by CONTROL_SUFFIX, both
    connected to the mux's ROUTER. ``send_message`` stamps each message and sends it on its
    lane; ``on_message(lane, frames)`` gets what arrives (stamp still first).

    ``lanes=False``: one DEALER and no stamps, as before the lanes (for comparisons:
    ``VMBUSIFY_BUS_LANES=0``, bench/exec.py ``--ab``).
    """

    def __init__(self, endpoint: str, name: str,
                 on_message: Callable[[Lane, Frames], None], lanes: bool = True,
                 on_peer: Callable[[bool], None] | None = None, ring_size: int = 0) -> None:
        ctx = shared_context()
        #: The shared-memory rings beside the bus (vmbusify.bus.ring), in the bus's own
        #: root-only directory; None: none (not asked for, no lanes, not an ipc endpoint).
        self.rings: RingLink | None = None
        directory = bus_directory(endpoint)
        self._ring_size = ring_size if lanes and directory is not None else 0
        self._ring_dir = directory or Path()
        self.identity = worker_identity(name)
        #: When this link was made (CLOCK_MONOTONIC ns: one clock for every process of the
        #: machine), sent in each REG so the mux can tell a newer link from an older one.
        self.since = time.monotonic_ns()
        self.sender: LaneSender | None = LaneSender() if lanes else None
        bulk = connect_dealer(ctx, endpoint, name, self.identity)
        sockets = [BusSocket(bulk, lambda f: on_message(Lane.BULK, f))]
        if lanes:
            try:
                control = connect_dealer(ctx, endpoint, name, self.identity + CONTROL_SUFFIX)
            except zmq.ZMQError:
                sockets[0].close()
                raise
            sockets.append(BusSocket(control, lambda f: on_message(Lane.CONTROL, f)))
        self._sockets = sockets
        if on_peer is not None:
            for sock in sockets:  # each lane's connection is told (a caller takes the first)
                sock.watch_peer(on_peer)
        self._stale_removed = False
        if self._ring_size and self._ring_dir.is_dir():
            self._new_rings()  # else when the mux has made its directory (ring_accepted)

    def send_message(self, msg: BusMessage, lane: Lane | None = None) -> None:
        """Stamp ``msg`` and send it on its lane (``lane``: on that one); raises BusError.
        A PKG's large payload goes through the ring when there is room (a PKR)."""
        if self.sender is None:
            self._sockets[0].send(msg.to_frames())
            return
        rings = self.rings
        if rings is not None and type(msg) is Pkg and lane is None and rings.takes(msg):
            msg = rings.referenced(msg)
        lane, frames = self.sender.frames(msg, lane=lane)
        self._sockets[lane].send(frames)

    # -- rings -----------------------------------------------------------------------------
    def ring_buffer(self, n: int) -> memoryview | None:
        """A writable view of ``n`` bytes of the ring this end writes, to build a payload
        in: a PKG sent next with this very view as its payload goes as a PKR, uncopied.
        None: no ring, no room, too small for the ring, or a view is out already. One not
        sent is given back with ``ring_unbuffer``."""
        rings = self.rings
        return rings.stage(n) if rings is not None else None

    def ring_unbuffer(self, view: memoryview) -> None:
        """A view from ``ring_buffer`` that was not sent: its room is free again."""
        if self.rings is not None:
            self.rings.unstage(view)

    def _new_rings(self) -> None:
        """Make this link's two rings (again: a new mux maps new ones)."""
        self._close_rings()
        if not self._stale_removed:
            self._stale_removed = True
            remove_stale(self._ring_dir)
        ring_id = secrets.randbits(32) or 1
        tx_name, rx_name = ring_names(os.getpid(), ring_id)
        loop = asyncio.get_running_loop()
        try:
            tx = Ring.create(self._ring_dir, tx_name, self._ring_size, ring_id)
            try:
                rx = Ring.create(self._ring_dir, rx_name, self._ring_size, ring_id)
            except OSError:
                tx.unlink(self._ring_dir)
                raise
        except (OSError, BusError) as exc:
            log.warning("no shared-memory ring beside the bus (payloads go inline): %s", exc)
            return
        self.rings = RingLink(ring_id, tx, rx, self._send_release, loop.call_soon,
                              loop.call_later)

    def _send_release(self, ring_id: int, upto: int) -> None:
        self.send_message(Release(ring_id, upto))

    def ring_offer(self) -> dict[str, object] | None:
        """What the REG says of this link's rings (None: it has none)."""
        rings = self.rings
        if rings is None:
            return None
        return {"id": rings.id, "size": rings.tx.size, "tx": rings.tx.name,
                "rx": rings.rx.name}

    def ring_accepted(self, ring_id: int, offered: int = 0) -> bool:
        """The mux's REGOK: it mapped the rings ``ring_id`` (0: none) of those the REG
        offered (``offered``), so payloads may go through them; their files are no longer
        needed. True: rings were made only now (the mux's directory was not there before):
        register again to offer them."""
        rings = self.rings
        if rings is None:
            if self._ring_size and self.sender is not None:
                self._new_rings()
                return self.rings is not None
            return False
        if ring_id == rings.id:
            rings.tx_on = True
            for ring in (rings.tx, rings.rx):
                ring.unlink(self._ring_dir)
        elif offered == rings.id or ring_id:
            rings.tx_on = False  # the mux does not (or no longer) map these rings
        # Else the answer to an older REG that offered none (the first is sent on both
        # lanes, and its second answer can come after the one that took the rings).
        return False

    def payload_of(self, msg: PkgRef) -> memoryview:
        """A PKR's payload, a read-only view of the ring; RemoteProtocolError if there is
        no ring or the reference is stale or wrong."""
        if self.rings is None:
            raise RemoteProtocolError("a PKR, but this link has no ring")
        return self.rings.resolve(msg.ref)

    def ring_released(self, msg: Release) -> None:
        """The mux's RLS: room again in the ring this end writes."""
        if self.rings is not None:
            self.rings.released(msg.ring, msg.upto)

    def _close_rings(self) -> None:
        rings, self.rings = self.rings, None
        if rings is not None:
            rings.close()
            for ring in (rings.tx, rings.rx):
                ring.unlink(self._ring_dir)

    @property
    def laned(self) -> bool:
        """Whether this end speaks in two lanes."""
        return self.sender is not None

    def restart_numbering(self, new_rings: bool = True) -> None:
        """Number from 1 again (the mux restarted: its new process knows no numbers), with
        new rings (the next REG offers them) unless ``new_rings`` is False (the same mux
        forgot this worker: it keeps the rings it mapped)."""
        if self.sender is not None:
            self.sender = LaneSender()
        if self._ring_size and new_rings:
            self._new_rings()

    def close(self, linger_ms: int = 0) -> None:
        """Close both sockets (idempotent); ``linger_ms`` as for BusSocket.close."""
        self._close_rings()
        for sock in self._sockets:
            sock.close(linger_ms)
