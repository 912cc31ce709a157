"""One live tunnel: a hypervisor socket carrying vmbus packages, with HELLO and liveness.

The Tunnel reads packages with the sans-I/O decoder and hands application packages to the
mux; it writes from a fair OutQueue. Tunnel-level messages (HELLO, PING, PONG, BYE) are
handled here. vsock has no keepalive, so both ends ping every ``ping_interval`` and a peer
silent for ``dead_after`` seconds is declared dead; a malformed package closes the tunnel
with a logged reason and nothing else.

Nothing runs for an idle tunnel but one timer every ``ping_interval``: writing is a callback
the loop runs once after packages are queued (and again when the socket drains), pinging a
timer, not a task each (docs/performance.md, "Idle VMs on one host mux").

Reading is done by a BufferedProtocol that lets the socket fill the decoder's own buffers
(a bulk payload lands straight in the buffer that goes on to ZeroMQ), so the mux copies no
stream byte in user space. The tunnel takes the transport over from the asyncio streams the
transport layer connected with.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from enum import Enum
from typing import cast

from vmbusify.bus.sockets import frame_buffer
from vmbusify.config import LimitsConfig, TunnelConfig
from vmbusify.errors import ProtocolError, TunnelError
from vmbusify.logs import printable
from vmbusify.mux.scheduler import PACKAGE_COST, OutQueue, Tally
from vmbusify.protocol.entities import Entity, TunnelMessage
from vmbusify.protocol.package import (
    PROTOCOL_VERSION,
    Header,
    Package,
    PackageDecoder,
    PackageType,
)
from vmbusify.protocol.tunnel import Auth, Bye, Hello, Ping, Pong, Stats, WorkerLost
from vmbusify.runtime import release_free_memory
from vmbusify.transport import take_over

log = logging.getLogger(__name__)

#: Transport write buffer above which the writer waits for the socket to drain. Small: what
#: waits in the transport is first come, first served, while the OutQueue lets control
#: packages (an exec's START and EXIT, pings) pass stream data. With 1 MiB here a ping
#: beside a saturating stream took 1.7 ms (p99 5.8), with 64 KiB 1.0 ms (p99 2.2), at the
#: same throughput (bench/tunnel.py).
WRITE_HIGH_WATER = 64 << 10
_DEFAULT_LIMITS = LimitsConfig()
#: The guest end waits for the host's PINGs: it pings only when none came for this many
#: intervals (a host that stopped pinging), and once in RTT_EVERY intervals for its own
#: ``rtt_ms``. More than one interval, so its timer never ties with the host's next PING.
PASSIVE_GRACE = 1.5
RTT_EVERY = 6
#: Dropping at least this much of a gone peer's queue is worth handing memory back to the OS.
_TRIM_AFTER = 8 << 20


class CloseReason(str, Enum):
    """Why a tunnel ended (for logs and status)."""

    EOF = "peer closed the connection"
    PROTOCOL = "protocol error"
    DEAD = "peer stopped answering"
    BYE = "peer said goodbye"
    LOCAL = "closed by this end"
    ERROR = "socket error"


class BacklogPool(Tally):
    """The send queues of every tunnel of one mux, against ``[limits] tunnel_backlog_total``.

    Each VM's own cap (``tunnel_backlog``) keeps it from filling the host alone; this keeps
    many VMs, each under its cap, from doing it together. Past the total the tunnel with the
    most waiting is closed (usually the one that stopped reading), not whoever came last.
    """

    __slots__ = ("limit", "tunnels")

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.tunnels: set[Tunnel] = set()

    def join(self, tunnel: Tunnel) -> None:
        """Count ``tunnel``'s queue in this pool until the tunnel closes."""
        tunnel.out.share(self)
        tunnel.pool = self
        self.tunnels.add(tunnel)

    def relieve(self) -> Tunnel | None:
        """Close the tunnel with the most waiting; returns it (None if the pool is empty)."""
        if not self.tunnels:
            return None
        worst = max(self.tunnels, key=lambda t: t.out.backlog)
        worst._backlog_full(f"the mux holds {self.total} bytes for all peers, limit "
                            f"{self.limit}")
        return worst


class _Wire(asyncio.BufferedProtocol):
    """The socket's side of a Tunnel: bytes go into its decoder, events to the tunnel."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        #: The transport holds WRITE_HIGH_WATER or more: the writer waits for resume_writing.
        self.paused = False
        self._spare: memoryview | None = None  # for reads after the decoder died

    def get_buffer(self, sizehint: int) -> memoryview:
        try:
            return self.tunnel._decoder.get_buffer()
        except ProtocolError:
            # The tunnel is closing; what still arrives is dropped. Made only then: 4 KiB
            # a tunnel that almost never needs it.
            if self._spare is None:
                self._spare = memoryview(bytearray(4096))
            return self._spare

    def buffer_updated(self, nbytes: int) -> None:
        self.tunnel._on_bytes(nbytes)

    def eof_received(self) -> bool:
        self.tunnel._on_closed(CloseReason.EOF.value)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.tunnel._on_closed(CloseReason.EOF.value)
        else:
            self.tunnel._on_closed(f"{CloseReason.ERROR.value}: {exc}")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.tunnel._schedule_flush()


class Tunnel:
    """A connected tunnel to one peer (the host's view of a VM, or the guest's of its host)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 config: TunnelConfig, label: str,
                 on_package: Callable[[Tunnel, Package], None], lead: bool = True) -> None:
        self.config = config
        #: The host's end pings every interval; the guest's (lead=False) answers them and
        #: pings only when they stop (``_ping_tick``).
        self.lead = lead
        self.label = label
        self.on_package = on_package
        self.on_hello: Callable[[Tunnel, Hello], None] | None = None
        self.on_worker_lost: Callable[[Tunnel, WorkerLost], None] | None = None
        self.peer_hello: Hello | None = None
        #: The peer's last STATS (a guest's own counters, cleaned) and when it came.
        self.peer_stats: Stats | None = None
        self.peer_stats_at = 0.0
        self.connected_since = time.time()
        self.rtt_ms: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.close_reason = ""
        self.closed = asyncio.Event()
        self.out = OutQueue()
        #: Packages dispatched per wake-up before the other tunnels get their turn
        #: (``[limits] read_budget``; the mux sets it when the tunnel is attached).
        self.read_budget = _DEFAULT_LIMITS.read_budget
        #: What may wait in ``out`` (OutQueue.backlog: control and DATA) before the peer is
        #: taken for one that does not read and the tunnel is closed (``tunnel_backlog``).
        self.backlog_limit = _DEFAULT_LIMITS.tunnel_backlog
        #: Times the read budget ran out (reading paused for one turn of the loop).
        self.read_yields = 0
        #: 1 if this tunnel was closed for its backlog.
        self.backlog_closes = 0
        #: The mux's queues over every VM (set when the mux attaches the tunnel).
        self.pool: BacklogPool | None = None
        self._reading_paused = False
        # Large payloads are received into ZeroMQ frames: the bus sends them on uncopied;
        # or, where ``stage`` gives one, into the shared-memory ring of the worker they go to.
        self._decoder = PackageDecoder(config.max_payload, self._allocate)
        #: The mux's: a buffer in a worker's ring for a payload of this header, or None.
        self.stage: Callable[[Header], memoryview | None] | None = None
        self._last_recv = time.monotonic()
        #: PINGs awaiting their PONG: when sent, and who waits (None: the timer's own).
        self._pings: dict[int, tuple[float, asyncio.Future[float] | None]] = {}
        self._nonce = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        self._writing = False  # packages go out once our HELLO is queued (answer())
        self._flush_scheduled = False
        self._ping_timer: asyncio.TimerHandle | None = None
        self._next_ping = 0.0
        self._last_ping = 0.0  # when this end last sent a PING of its own
        self._peer_ping = 0.0  # when the peer's last PING came
        self._running = False  # packages are dispatched once the handshake is done
        self._arrived = asyncio.Event()  # a package (or the end) came during the handshake
        self._wire = _Wire(self)
        self.transport = writer.transport
        # Held, though unused: a StreamWriter closes its transport when collected.
        self._streams = (reader, writer)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        early, eof = take_over(reader, writer, self._wire)
        if early:
            self._decoder.receive_data(early)
            self._arrived.set()
        if eof:
            self._on_closed(CloseReason.EOF.value)

    def _allocate(self, n: int) -> memoryview:
        """Where a large payload is received: a ring's (``stage``) or a new ZeroMQ frame."""
        stage, header = self.stage, self._decoder.receiving
        if stage is not None and header is not None:
            view = stage(header)
            if view is not None:
                return view
        return frame_buffer(n)

    def move_payload(self, view: memoryview) -> bool:
        """If a payload is being received into ``view`` (a ring's), go on in a ZeroMQ frame
        instead; True if so (the ring's room may be given back)."""
        return self._decoder.move_body(view, frame_buffer)

    # -- life ------------------------------------------------------------------------------
    async def handshake(self, hello: Hello, timeout: float) -> Hello:
        """Send our HELLO and wait for the peer's; a BYE instead raises TunnelError."""
        self.answer(hello)
        return await self.receive_hello(timeout, hello.protocol_version)

    def answer(self, hello: Hello) -> None:
        """Send our HELLO and start writing (the guest does this once the host's HELLO came)."""
        self.send_package(hello.package())
        self._writing = True
        self._schedule_flush()

    async def receive_hello(self, timeout: float,
                            protocol_version: int = PROTOCOL_VERSION) -> Hello:
        """Wait for the peer's HELLO; a BYE, anything else or another version raises."""
        pkg = await self._handshake_package("HELLO", timeout)
        if pkg.entity != Entity.TUNNEL or pkg.message_id != TunnelMessage.HELLO:
            raise ProtocolError(f"{self.label}: first package is not a HELLO")
        self.peer_hello = Hello.from_payload(pkg.payload)
        if self.peer_hello.protocol_version != protocol_version:
            raise ProtocolError(f"{self.label}: peer speaks protocol "
                                f"{self.peer_hello.protocol_version}, we speak "
                                f"{protocol_version}")
        return self.peer_hello

    async def receive_auth(self, timeout: float) -> Auth:
        """Wait for the peer's AUTH (the package after its HELLO); a BYE or anything else
        raises. Nothing else is dispatched meanwhile: packages behind it wait for run()."""
        pkg = await self._handshake_package("AUTH", timeout)
        if pkg.entity != Entity.TUNNEL or pkg.message_id != TunnelMessage.AUTH:
            raise ProtocolError(f"{self.label}: expected AUTH, got entity {pkg.entity} "
                                f"message {pkg.message_id}")
        return Auth.from_payload(pkg.payload)

    async def _handshake_package(self, what: str, timeout: float) -> Package:
        """The next package, within ``timeout``; a BYE raises TunnelError with its reason."""
        try:
            pkg = await asyncio.wait_for(self._next_package(what), timeout)
        except TimeoutError:
            raise TunnelError(f"{self.label}: no {what} within {timeout:g}s") from None
        if (pkg.entity == Entity.TUNNEL and pkg.message_id == TunnelMessage.BYE
                and pkg.type is PackageType.MESSAGE):
            reason = printable(Bye.from_payload(pkg.payload).reason, 500)
            raise TunnelError(f"{self.label}: peer refused: {reason}")
        return pkg

    async def _next_package(self, what: str) -> Package:
        while True:
            pkg = self._decoder.next_package()  # raises on a malformed package
            if pkg is not None:
                return pkg
            if self.closed.is_set():
                raise TunnelError(f"{self.label}: connection closed during {what}")
            self._arrived.clear()
            await self._arrived.wait()

    async def run(self) -> str:
        """Serve the tunnel until it ends; returns why it ended. Call after handshake()."""
        self._next_ping = time.monotonic() + max(0.05, self.config.ping_interval)
        self._ping_tick()
        try:
            self._running = True
            self._dispatch()  # anything that came with the HELLO
            await self.closed.wait()
        except asyncio.CancelledError:
            self._set_reason(CloseReason.LOCAL.value)
            raise
        finally:
            await self._teardown()
        return self.close_reason

    def _on_bytes(self, n: int) -> None:
        """The wire put ``n`` more bytes into the decoder."""
        if self.closed.is_set():
            return  # bytes after the end (or after a malformed package) are dropped
        self._last_recv = time.monotonic()
        self.bytes_in += n
        try:
            self._decoder.buffer_updated(n)
        except ProtocolError:
            pass  # the decoder is dead: the error is raised by next_package, below or in
            #       the handshake, and the tunnel closes with it as the reason
        if self._running:
            if not self._reading_paused:
                self._dispatch()
        else:
            self._arrived.set()
            if self.bytes_in > self._decoder.max_payload + (64 << 10):
                # Before run() nothing is dispatched (a guest waits for its lock and pings
                # the live tunnel first): read no more than a whole HELLO until then.
                self._yield_reading(count=False)

    def _dispatch(self) -> None:
        """Hand on the packages decoded so far, at most ``read_budget`` of them: then reading
        pauses and the rest waits one turn of the loop, so a peer that floods small packages
        (a 64 KiB read holds ~2,700) delays the other tunnels by one budget, not one read."""
        budget = self.read_budget
        try:
            while (pkg := self._decoder.next_package()) is not None:
                self._handle(pkg)
                budget -= 1
                if budget <= 0:
                    self._yield_reading()
                    return
        except ProtocolError as exc:
            self.close(f"{CloseReason.PROTOCOL.value}: {exc}")
            return
        if self._reading_paused:
            self._reading_paused = False
            if not self.transport.is_closing():
                cast(asyncio.ReadTransport, self.transport).resume_reading()

    def _yield_reading(self, count: bool = True) -> None:
        """The budget is spent: stop reading, go on with what is decoded at the next turn
        (once running: run() dispatches what came during the handshake)."""
        if self.closed.is_set():
            return
        if not self._reading_paused:
            self._reading_paused = True
            if not self.transport.is_closing():
                cast(asyncio.ReadTransport, self.transport).pause_reading()
        if count:
            self.read_yields += 1
            asyncio.get_running_loop().call_soon(self._resume_dispatch)

    def _resume_dispatch(self) -> None:
        if not self.closed.is_set():
            self._dispatch()

    def _on_closed(self, reason: str) -> None:
        """The peer closed, or the socket failed."""
        self._set_reason(reason)
        self.close()

    def _schedule_flush(self) -> None:
        """Write what is queued at the loop's next turn (once, however many packages come
        meanwhile: those queued in one turn leave in the OutQueue's order, control first)."""
        if self._writing and not self._flush_scheduled and not self._wire.paused:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand the socket queued packages until it holds WRITE_HIGH_WATER (then
        resume_writing brings us back) or nothing waits."""
        self._flush_scheduled = False
        transport, wire, out = self.transport, self._wire, self.out
        while not wire.paused:
            item = out.pop()
            if item is None:
                return
            if transport.is_closing():
                return
            header, payload = item
            if payload:
                transport.writelines((header, payload))  # one writev for both
            else:
                transport.write(header)
            self.bytes_out += len(header) + len(payload)

    def _ping_tick(self) -> None:
        """Ping every ``ping_interval`` (the guest's end: only when the host's PINGs stopped
        for PASSIVE_GRACE intervals, and once in RTT_EVERY intervals for its ``rtt_ms``);
        declare the peer dead exactly ``dead_after`` seconds after the last byte it sent (not
        at the next ping), so detection time is the setting.

        The host's PINGs tell the guest its host is alive, so between two ends of this
        release one PING and one PONG cross per idle interval, not two of each. A timer, not
        a task: an idle tunnel costs one timer handle per interval."""
        self._ping_timer = None
        if self.closed.is_set():
            return
        now = time.monotonic()
        deadline = self._last_recv + self.config.dead_after
        if now >= deadline:
            self._set_reason(f"{CloseReason.DEAD.value} for {now - self._last_recv:.1f}s")
            self.close()
            return
        interval = max(0.05, self.config.ping_interval)
        if now >= self._next_ping:
            pinged = self._peer_ping + PASSIVE_GRACE * interval
            if (not self.lead and pinged > now
                    and now - self._last_ping < RTT_EVERY * interval):
                self._next_ping = pinged  # the host pings: wait until it stops
            else:
                self._next_ping = now + interval
                self._last_ping = now
                nonce = next(self._nonce)
                self._pings[nonce] = (now, None)
                self.send_package(Ping(nonce).package())
                for old in [n for n in self._pings if n < nonce - 10]:
                    self._pings.pop(old)
        self._ping_timer = self._loop.call_later(min(self._next_ping, deadline) - now,
                                                 self._ping_tick)

    def _set_reason(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason

    def close(self, reason: str = "") -> None:
        """Ask the tunnel to end (run() returns soon after)."""
        if reason:
            self._set_reason(reason)
        self._set_reason(CloseReason.LOCAL.value)
        self.closed.set()
        self._arrived.set()
        self.transport.close()  # what is already written still goes out first
        # Nothing queued here will be sent now: let it go at once, not when this object
        # does (its runner keeps it through the reconnect backoff).
        if self.out.clear() >= _TRIM_AFTER:
            release_free_memory()
        if self.pool is not None:
            self.pool.tunnels.discard(self)

    async def refuse(self, reason: str) -> None:
        """Turn a new connection away: a BYE with the reason instead of a HELLO, then close."""
        if not self.transport.is_closing():
            self.transport.write(Bye(reason).package().encode())
        await self.abort(reason)

    async def abort(self, reason: str = "") -> None:
        """Close now and wait for every task of this tunnel to finish."""
        self.close(reason)
        await self._teardown()

    async def _teardown(self) -> None:
        self.closed.set()
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        for _, fut in self._pings.values():
            if fut is not None and not fut.done():
                fut.set_exception(TunnelError(f"{self.label}: tunnel closed"))
                # Mark the exception seen (a waiter may be gone already), or asyncio logs
                # "Future exception was never retrieved" when the future goes.
                fut.exception()
        self.transport.close()
        if self.transport.get_write_buffer_size():
            # A peer that does not read (frozen, or hostile) would keep the socket, and this
            # tunnel, alive for as long as it likes: close() waits for the bytes to go out.
            self.transport.abort()
        self.out.clear()  # close() did; but a package may have come in since

    # -- traffic ---------------------------------------------------------------------------
    def send_package(self, pkg: Package) -> None:
        """Queue a whole package (control priority unless it is stream DATA)."""
        self.send_raw(pkg.header(), pkg.payload, pkg.type, pkg.entity, pkg.stream)

    def send_raw(self, header: bytes, payload: bytes | memoryview, ptype: PackageType,
                 entity: int, stream: int) -> None:
        """Queue an encoded package; DATA goes in its stream's round-robin slot."""
        if self.closed.is_set():
            return
        out = self.out
        cost = len(header) + len(payload) + PACKAGE_COST
        if out.backlog + cost > self.backlog_limit:
            self._backlog_full()
            return
        pool = self.pool
        if pool is not None and pool.total + cost > pool.limit and pool.relieve() is self:
            return
        if ptype is PackageType.DATA:
            out.put_stream((entity, stream), (header, payload))
        else:
            out.put_control((header, payload))
        self._schedule_flush()

    def _backlog_full(self, why: str = "") -> None:
        """The peer leaves more waiting than ``backlog_limit`` (it sends PINGs or REQUESTs
        and never reads the answers, or granted itself credit it does not read), or the
        most of every peer when the mux's total is reached (``why``): cut it off. A reading
        peer never comes near: the writer drains the queue as the socket takes it."""
        out = self.out
        why = why or f"limit {self.backlog_limit}"
        log.warning("%s: the peer is not reading (%d bytes in %d packages waiting; %s): "
                    "closing the tunnel", self.label, out.bytes_queued, len(out), why)
        self.backlog_closes = 1
        self.close(f"peer not reading: {out.bytes_queued} bytes waiting")

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time of one PING, in milliseconds."""
        nonce = next(self._nonce)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = (time.monotonic(), fut)
        self.send_package(Ping(nonce).package())
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TunnelError(f"{self.label}: no PONG within {timeout:g}s") from None
        finally:
            self._pings.pop(nonce, None)

    def _handle(self, pkg: Package) -> None:
        if pkg.entity != Entity.TUNNEL or pkg.type is PackageType.ACK:
            # ACKs the mux itself sends (e.g. "no worker handles this") carry entity 0.
            self.on_package(self, pkg)
            return
        if pkg.type is not PackageType.MESSAGE:
            raise ProtocolError(f"tunnel message of type {pkg.type.name}")
        if pkg.message_id == TunnelMessage.PING:
            self._peer_ping = time.monotonic()
            self.send_package(Pong(Ping.from_payload(pkg.payload).nonce).package())
        elif pkg.message_id == TunnelMessage.PONG:
            entry = self._pings.pop(Pong.from_payload(pkg.payload).nonce, None)
            if entry is not None:
                rtt = (time.monotonic() - entry[0]) * 1000
                self.rtt_ms = rtt
                if entry[1] is not None and not entry[1].done():
                    entry[1].set_result(rtt)
        elif pkg.message_id == TunnelMessage.HELLO:
            self.peer_hello = Hello.from_payload(pkg.payload)
            log.info("%s: peer addresses now %s", self.label, ", ".join(self.peer_hello.ips))
            if self.on_hello is not None:
                self.on_hello(self, self.peer_hello)
        elif pkg.message_id == TunnelMessage.WORKER_LOST:
            lost = WorkerLost.from_payload(pkg.payload)
            if self.on_worker_lost is not None:
                self.on_worker_lost(self, lost)
        elif pkg.message_id == TunnelMessage.STATS:
            self.peer_stats = Stats.from_payload(pkg.payload)
            self.peer_stats_at = time.time()
        elif pkg.message_id == TunnelMessage.BYE:
            self._set_reason(f"{CloseReason.BYE.value}: {Bye.from_payload(pkg.payload).reason}")
            self.close()
        else:
            raise ProtocolError(f"unknown tunnel message {pkg.message_id}")
