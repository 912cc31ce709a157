"""Byte streams between two workers on the two ends of a tunnel, with credit windows.

A stream is identified on both ends by ``(vmid, peer entity, stream id)``; the opener picks
the id. The opener announces it with its own application REQUEST (PROXY-OPEN, EXEC-START...)
carrying the id in the package header; the acceptor calls ``StreamTable.accept``. After that
DATA packages carry bytes (flag EOF half-closes, flag RESET aborts) and WINDOW packages return
credit (see vmbusify.protocol.window).

Every stream is charged to its VM's share of the worker (vmbusify.bus.budget): the table
refuses to open or accept one past ``streams_per_vm`` / ``streams_total``; unread bytes past
``buffered_per_vm`` / ``buffered_total`` reset the stream that brought them; a writer waits
for the VM's send budget as well as its stream's credit. A peer that breaks flow control
(credit it was never owed, DATA past its credit, DATA after EOF) gets that stream reset.
Each of these is counted per VM (``StreamTable.budget.snapshot()``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Iterator
from enum import Enum

from vmbusify.bus.budget import Budget, Counter, TxWaiter, VMShare
from vmbusify.config import LimitsConfig
from vmbusify.errors import FlowControlError, LimitReached, ProtocolError, VMBusifyError
from vmbusify.logs import RateLimitedLog, printable
from vmbusify.protocol.entities import entity_label
from vmbusify.protocol.package import Package, PackageFlag, PackageType, Payload
from vmbusify.protocol.window import (
    INITIAL_WINDOW,
    MAX_CHUNK,
    ReceiveWindow,
    SendWindow,
    decode_increment,
    encode_increment,
)
from vmbusify.runtime import UsesLoop

__all__ = ["BUFFER_LIMIT_REASON", "LimitReached", "Stream", "StreamKey", "StreamReset",
           "StreamState", "StreamTable"]

log = logging.getLogger(__name__)

#: The reason a stream is reset with when its VM's unread bytes would pass the cap.
BUFFER_LIMIT_REASON = "buffer limit reached"

StreamKey = tuple[str, int, int]  # (vmid, peer entity, stream id)
#: Writes this large (or larger) may be held to go out with the next in one package of up
#: to MAX_CHUNK (Stream.write); smaller ones go at once, as interactive bytes should.
COALESCE_MIN = 64 << 10
#: How a stream sends a package: (vmid, package) -> awaitable. It must hand the package on
#: before it first suspends (a worker's link never suspends): packages leave in call order.
SendFn = Callable[[str, Package], Awaitable[None]]
#: The same, where sending never waits (a worker's link): held bytes then go from a loop
#: callback instead of a task of their own.
SendNowFn = Callable[[str, Package], None]
#: A writable buffer of ``n`` bytes where a payload sent by ``send_now`` travels uncopied
#: (a worker's shared-memory ring, vmbusify.bus.ring), or None; and how to give one back
#: unsent. See Stream.write_built.
BufferFn = Callable[[int], memoryview | None]
UnbufferFn = Callable[[memoryview], None]


class StreamState(Enum):
    """Life of a stream, as seen from one end."""

    OPEN = "open"
    #: We sent EOF; the peer may still send.
    LOCAL_EOF = "local-eof"
    #: The peer sent EOF; we may still send.
    REMOTE_EOF = "remote-eof"
    CLOSED = "closed"
    RESET = "reset"


class StreamReset(VMBusifyError):
    """The stream was aborted (by the peer, by us, or because the tunnel went down)."""


class Stream:
    """One end of a flow-controlled byte stream. Use from a single asyncio task per direction."""

    def __init__(self, table: StreamTable, share: VMShare, local: int, peer: int,
                 message_id: int, stream_id: int) -> None:
        self._table = table
        self._share = share
        self.vmid = share.vmid
        self.local = local
        self.peer = peer
        self.message_id = message_id
        self.id = stream_id
        self.state = StreamState.OPEN
        self.reset_reason = ""
        self.bytes_in = 0
        self.bytes_out = 0
        self._send = SendWindow(INITIAL_WINDOW)
        self._recv = ReceiveWindow(INITIAL_WINDOW)
        self._chunks: collections.deque[Payload] = collections.deque()
        #: Bytes in _chunks (charged to the VM's rx share).
        self._buffered = 0
        self._readable = asyncio.Event()
        self._credit = asyncio.Event()
        self._remote_eof = False
        self._local_eof = False
        #: The writer's place in line for the VM's send budget, while it waits.
        self._tx_waiter: TxWaiter | None = None
        #: Still charged to the VM's share (cleared once, when the stream ends).
        self._charged = True
        #: Bytes written and held to go out with the next writes in one package (see write).
        self._held: list[Payload] = []
        self._held_bytes = 0
        self._flush_scheduled = False
        #: The task sending held bytes, for a table without ``send_now`` (held: the loop
        #: keeps tasks by weak reference only).
        self._flusher: asyncio.Future[None] | None = None
        self._flush_error: VMBusifyError | None = None
        #: Called (never awaited) when bytes, EOF or a reset arrive: a reader that is a
        #: protocol callback, not a task (see read_nowait).
        self.on_readable: Callable[[], None] | None = None

    @property
    def key(self) -> StreamKey:
        return (self.vmid, self.peer, self.id)

    def __repr__(self) -> str:
        return (f"<Stream vm={self.vmid} {entity_label(self.local)}->{entity_label(self.peer)}"
                f" id={self.id} {self.state.value}>")

    # -- sending ---------------------------------------------------------------------------
    def _package(self, ptype: PackageType, payload: Payload = b"",
                 flags: PackageFlag = PackageFlag.NONE) -> Package:
        return Package(type=ptype, flags=flags, entity=self.local, message_id=self.message_id,
                       stream=self.id, payload=payload)

    def _check_writable(self) -> None:
        if self.state is StreamState.RESET:
            raise StreamReset(self.reset_reason or "stream reset")
        if self._local_eof:
            raise StreamReset("write after EOF")

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send bytes, waiting for credit (the stream's and the VM's send budget) as needed;
        raises StreamReset if aborted.

        A write of at least ``COALESCE_MIN`` bytes may be held (never more than
        ``MAX_CHUNK``, taken from the credit already) and go out with the writes after it in
        one package: at the latest when the loop next runs its callbacks, before this
        stream waits for credit, and before its EOF. A writer that reads 256 KiB at a time
        from a socket with more waiting then sends one package per MiB, not four."""
        if self._flush_error is not None:
            raise self._flush_error
        view = memoryview(data)
        # Slices of immutable bytes are kept as they are; anything mutable is copied, since
        # the caller may reuse its buffer before the bytes leave.
        immutable = isinstance(data, bytes)
        coalesce = view.nbytes >= COALESCE_MIN or self._held_bytes > 0
        budget, share, window = self._table.budget, self._share, self._send
        while view:
            self._check_writable()
            want = window.sendable(len(view))
            if want == 0:
                await self._flush()
                self._credit.clear()
                await self._credit.wait()
                continue
            # A stream already forgotten (finished by its owner) is no longer charged.
            n = budget.tx_try(share, want) if self._charged else want
            if n == 0:
                await self._flush()
                n = await self._wait_budget(want)
                if n == 0 or self.state is StreamState.RESET or not self._charged:
                    if n:
                        budget.tx_release(share, n)
                    continue  # withdrawn: _check_writable says why
            window.take(n)
            chunk, view = (view[:n] if immutable else bytes(view[:n])), view[n:]
            for pkg in self._stage(chunk, n, coalesce):
                await self._table.send(self.vmid, pkg)

    def write_nowait(self, data: bytes) -> int:
        """``write`` without waiting, for a table whose send never waits (``send_now``): sends
        (or holds, as ``write`` does) what the stream's credit and the VM's send budget allow
        now; the number of bytes taken (the rest is the caller's to ``write`` later).
        Raises StreamReset, or the error of an earlier send of held bytes."""
        if self._flush_error is not None:
            raise self._flush_error
        send_now = self._table.send_now
        assert send_now is not None, "write_nowait needs a table with send_now"
        self._check_writable()
        total = len(data)
        coalesce = total >= COALESCE_MIN or self._held_bytes > 0
        budget, share, window = self._table.budget, self._share, self._send
        view = memoryview(data)
        done = 0
        while done < total:
            want = window.sendable(total - done)
            n = (budget.tx_try(share, want) if self._charged else want) if want else 0
            if n == 0:
                break
            window.take(n)
            chunk: Payload = view[done:done + n] if done or n < total else data
            done += n
            for pkg in self._stage(chunk, n, coalesce):
                send_now(self.vmid, pkg)
        if done < total:  # the caller will wait for credit: what is held goes first
            held = self._take_held()
            if held is not None:
                send_now(self.vmid, held)
        return done

    def write_built(self, n: int, build: Callable[[memoryview], None]) -> bool:
        """Send ``n`` bytes as one DATA package whose payload ``build`` writes straight into
        the table's ``buffer`` (a worker's shared-memory ring: the bytes are written once,
        where the mux reads them), now. False, with nothing sent or taken, when that cannot
        be done now: a table without ``send_now`` or ``buffer``, more than MAX_CHUNK, less
        credit (the stream's or the VM's send budget) than ``n``, or no buffer (too small
        for the ring, no ring, no room); the caller then ``write``s the bytes as usual.
        Bytes held by earlier writes go first. Raises StreamReset, or the error of an
        earlier send of held bytes; what ``build`` raises (its buffer given back)."""
        if self._flush_error is not None:
            raise self._flush_error
        table = self._table
        send_now, buffer = table.send_now, table.buffer
        if send_now is None or buffer is None or not 0 < n <= MAX_CHUNK:
            return False
        self._check_writable()
        window = self._send
        if window.sendable(n) < n:
            return False
        budget, share, charged = table.budget, self._share, self._charged
        if charged:
            got = budget.tx_try(share, n)
            if got < n:
                if got:
                    budget.tx_release(share, got)
                return False
        held = self._take_held()  # first, and before the buffer: it may use the ring too
        if held is not None:
            send_now(self.vmid, held)
        view = buffer(n)
        if view is None:
            if charged:
                budget.tx_release(share, n)
            return False
        try:
            build(view)
        except BaseException:
            if table.unbuffer is not None:
                table.unbuffer(view)
            if charged:
                budget.tx_release(share, n)
            raise
        window.take(n)
        self.bytes_out += n
        try:
            send_now(self.vmid, self._package(PackageType.DATA, view))
        except BaseException:
            if table.unbuffer is not None:
                table.unbuffer(view)  # not placed (the link is closed): its room goes back
            raise
        return True

    def _stage(self, chunk: Payload, n: int, coalesce: bool) -> list[Package]:
        """The packages to send now, in order, for ``n`` bytes of credit-checked ``chunk``
        (held bytes first); what is held instead goes out from ``_flush_soon``."""
        self.bytes_out += n
        if not coalesce or (n == MAX_CHUNK and not self._held_bytes):
            return [self._package(PackageType.DATA, chunk)]
        out: list[Package] = []
        if self._held_bytes + n > MAX_CHUNK:
            pkg = self._take_held()
            if pkg is not None:
                out.append(pkg)
        self._held.append(chunk)
        self._held_bytes += n
        if self._held_bytes == MAX_CHUNK:
            out.append(self._take_held())  # type: ignore[arg-type]  # never None here
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            if self._table.send_now is not None:
                self._table.loop.call_soon(self._flush_soon)
            else:
                self._flusher = asyncio.ensure_future(self._flush_later())
        return out

    def _take_held(self) -> Package | None:
        """The bytes held by ``write`` as one DATA package (None: nothing to send; a reset
        drops what was held, in ``_abort``, and its credit goes back in ``_release``)."""
        if not self._held_bytes:
            return None
        held, self._held, self._held_bytes = self._held, [], 0
        return self._package(PackageType.DATA, held[0] if len(held) == 1 else b"".join(held))

    async def _flush(self) -> None:
        """Send the bytes held by ``write`` (if any) as one DATA package."""
        pkg = self._take_held()
        if pkg is not None:
            await self._table.send(self.vmid, pkg)

    def _flush_soon(self) -> None:
        """The writer's flush (a loop callback), once the loop has run what was ready (the
        writer's next reads among it); an error is raised by its next write or EOF."""
        self._flush_scheduled = False
        pkg = self._take_held()
        send_now = self._table.send_now
        if pkg is not None and send_now is not None:
            try:
                send_now(self.vmid, pkg)
            except VMBusifyError as exc:
                self._flush_error = exc

    async def _flush_later(self) -> None:
        """``_flush_soon`` as a task, for a table whose send may wait."""
        self._flush_scheduled = False
        try:
            await self._flush()
        except VMBusifyError as exc:
            self._flush_error = exc
        finally:
            if self._flusher is asyncio.current_task():
                self._flusher = None

    async def _wait_budget(self, want: int) -> int:
        waiter = self._tx_waiter = TxWaiter(want)
        try:
            return await self._table.budget.tx_wait(self._share, waiter)
        finally:
            self._tx_waiter = None

    async def write_eof(self) -> None:
        """Half-close: tell the peer we send no more. Reading goes on."""
        if self._flush_error is not None:
            raise self._flush_error
        if self._local_eof or self.state is StreamState.RESET:
            return
        await self._flush()
        self._local_eof = True
        await self._table.send(self.vmid, self._package(PackageType.DATA, flags=PackageFlag.EOF))
        self._update_state()

    def write_eof_nowait(self) -> None:
        """``write_eof`` for a table whose send never waits (``send_now``)."""
        if self._flush_error is not None:
            raise self._flush_error
        if self._local_eof or self.state is StreamState.RESET:
            return
        send_now = self._table.send_now
        assert send_now is not None, "write_eof_nowait needs a table with send_now"
        pkg = self._take_held()
        if pkg is not None:
            send_now(self.vmid, pkg)
        self._local_eof = True
        send_now(self.vmid, self._package(PackageType.DATA, flags=PackageFlag.EOF))
        self._update_state()

    async def reset(self, reason: str = "") -> None:
        """Abort both directions and tell the peer why."""
        if self.state in (StreamState.RESET, StreamState.CLOSED):
            self._table.forget(self)
            return
        self._abort(reason or "reset by this end")
        await self._table.send(
            self.vmid, self._package(PackageType.DATA, reason.encode()[:500], PackageFlag.RESET)
        )

    # -- receiving -------------------------------------------------------------------------
    async def read(self) -> Payload:
        """The next chunk of bytes; b"" once the peer sent EOF. Raises StreamReset."""
        while not self._chunks:
            if self.state is StreamState.RESET:
                raise StreamReset(self.reset_reason or "stream reset")
            if self._remote_eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk, grant, pay = self._consume()
        if grant:
            await self._table.send(self.vmid, grant)
        if pay:
            await self._table.pay_owed(self._share)
        return chunk

    def read_nowait(self) -> Payload | None:
        """``read`` without waiting, for a table whose send never waits (``send_now``): the
        next chunk, b"" once the peer sent EOF, None while there is nothing yet (set
        ``on_readable`` to hear of more). Raises StreamReset."""
        if not self._chunks:
            if self.state is StreamState.RESET:
                raise StreamReset(self.reset_reason or "stream reset")
            return b"" if self._remote_eof else None
        send_now = self._table.send_now
        assert send_now is not None, "read_nowait needs a table with send_now"
        chunk, grant, pay = self._consume()
        if grant:
            send_now(self.vmid, grant)
        if pay:
            for vmid, pkg in self._table.owed_packages(self._share):
                send_now(vmid, pkg)
        return chunk

    def _consume(self) -> tuple[Payload, Package | None, bool]:
        """Take the next chunk off the buffer: it, the WINDOW to send (if credit is due)
        and whether the VM's owed credit is to be paid now (``StreamTable.pay_owed``)."""
        chunk = self._chunks.popleft()
        n = len(chunk)
        self._buffered -= n
        if self._charged:
            self._table.budget.rx_release(self._share, n)
        recv, share = self._recv, self._share
        owed = recv.owed
        grant = recv.on_consumed(n)
        if not self._charged:  # finished (closed or reset): the peer wants no credit
            return chunk, None, False
        share.owed += recv.owed - owed
        if recv.owed:
            share.owing[self] = None
        else:
            share.owing.pop(self, None)
        window = None
        if grant and self.state is not StreamState.RESET:
            window = self._package(PackageType.WINDOW, encode_increment(grant))
        return chunk, window, share.owed > self._table.owed_max

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (never more than one window)."""
        return self._buffered

    def _on_package(self, pkg: Package) -> str:
        """Take one DATA or WINDOW package; "" or why the stream must be reset (raises
        FlowControlError / ProtocolError for a peer that broke the protocol)."""
        if pkg.type is PackageType.WINDOW:
            n = decode_increment(pkg.payload)
            self._send.grant(n)
            if self._charged:
                self._table.budget.tx_release(self._share, n)
            self._credit.set()
            return ""
        if pkg.flags & PackageFlag.RESET:
            self._abort(printable(pkg.payload, 500) or "reset by peer")
            return ""
        payload = pkg.payload
        if payload:
            if self._remote_eof:
                raise ProtocolError("DATA after EOF")
            n = len(payload)
            self._recv.on_data(n)
            if not self._table.budget.rx_take(self._share, n):
                return BUFFER_LIMIT_REASON
            self._buffered += n
            self.bytes_in += n
            self._chunks.append(payload)
        if pkg.flags & PackageFlag.EOF:
            self._remote_eof = True
        self._readable.set()
        self._update_state()
        if self.on_readable is not None:
            self.on_readable()
        return ""

    def _abort(self, reason: str) -> None:
        self.state = StreamState.RESET
        self.reset_reason = reason
        self._chunks.clear()
        self._held.clear()
        self._held_bytes = 0
        self._readable.set()
        self._credit.set()
        self._table.forget(self)
        self._buffered = 0
        if self.on_readable is not None:
            self.on_readable()

    def _release(self) -> None:
        """The stream is over: give its VM back what it was charged (once)."""
        if not self._charged:
            return
        self._charged = False
        budget, share = self._table.budget, self._share
        budget.remove_stream(share)
        if self in share.owing:
            del share.owing[self]
            share.owed -= self._recv.owed
        if self._buffered:
            budget.rx_release(share, self._buffered)
        if self._tx_waiter is not None:
            budget.tx_withdraw(share, self._tx_waiter)
        # Bytes sent and never credited back: no credit comes for a finished stream.
        unacked = self._send.unacked
        if unacked:
            budget.tx_release(share, unacked)

    def _update_state(self) -> None:
        if self.state is StreamState.RESET:
            return
        if self._local_eof and self._remote_eof:
            self.state = StreamState.CLOSED
            self._table.forget(self)
        elif self._local_eof:
            self.state = StreamState.LOCAL_EOF
        elif self._remote_eof:
            self.state = StreamState.REMOTE_EOF


class StreamTable(UsesLoop):
    """Every open stream of one worker, the id allocator for streams it opens, and the
    budget (per VM and in total) that caps them."""

    def __init__(self, send: SendFn, limits: LimitsConfig | None = None,
                 send_now: SendNowFn | None = None, buffer: BufferFn | None = None,
                 unbuffer: UnbufferFn | None = None) -> None:
        self.send = send
        #: ``send`` for callers that cannot wait (None: this table's send may suspend).
        self.send_now = send_now
        #: Where a payload is built to go uncopied (Stream.write_built; None: nowhere).
        self.buffer = buffer
        self.unbuffer = unbuffer
        self.budget = Budget(limits)
        self._streams: dict[StreamKey, Stream] = {}
        self._next_id = 0
        self._warn = RateLimitedLog(log, self.budget.limits.log_lines_per_minute)
        #: Credit a VM may be owed over all its streams before all of it is returned at
        #: once (see pay_owed).
        self.owed_max = self.budget.limits.buffered_per_vm // 4

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[Stream]:
        return iter(list(self._streams.values()))

    def open(self, vmid: str, local: int, peer: int, message_id: int) -> Stream:
        """A new stream this worker opens; announce it with a REQUEST carrying ``stream.id``.

        Raises LimitReached (its text is the reason; re-exported here) at a stream cap."""
        while True:
            self._next_id = self._next_id % 0xFFFFFFFF + 1  # ids 1..2**32-1, 0 means none
            if (vmid, peer, self._next_id) not in self._streams:
                break
        return self._add(vmid, local, peer, message_id, self._next_id)

    def accept(self, vmid: str, local: int, request: Package, message_id: int) -> Stream:
        """The stream a peer's open REQUEST announced (its header carries the id).

        Raises ProtocolError for a missing or duplicate id, LimitReached at a stream cap."""
        if request.stream == 0:
            raise ProtocolError("open request carries no stream id")
        key = (vmid, request.entity, request.stream)
        if key in self._streams:
            raise ProtocolError(f"stream {request.stream} is already open")
        return self._add(vmid, local, request.entity, message_id, request.stream)

    def _add(self, vmid: str, local: int, peer: int, message_id: int, stream_id: int) -> Stream:
        share = self.budget.vm(vmid)
        self.budget.add_stream(share)  # raises LimitReached
        stream = Stream(self, share, local, peer, message_id, stream_id)
        self._streams[stream.key] = stream
        return stream

    def room_for(self, vmid: str) -> str:
        """"" if a stream with ``vmid`` could be added now, else the reason (counted)."""
        return self.budget.stream_room(self.budget.vm(vmid))

    async def pay_owed(self, share: VMShare) -> None:
        """Return every byte of credit the VM's streams owe it, now.

        A stream returns credit at a quarter of its window (2 MiB), so a stream that brings
        less never returns any until it ends; the peer's sender counts those bytes against
        its send budget for this VM (``buffered_per_vm``) all the while. Hundreds of short
        streams at once (1,000 proxy connections, each echoing 512 KiB) then held the
        sender's whole budget, every writer waited for credit that was never sent, and no
        stream could finish to release its share: the burst stalled for good. So a VM is
        owed at most ``owed_max`` (a quarter of the budget) over all its streams: past it,
        every owing stream returns what it owes (one WINDOW each). A single stream never
        gets there (it owes under 2 MiB), so a bulk transfer sends no more packages."""
        for vmid, pkg in self.owed_packages(share):
            await self.send(vmid, pkg)

    def owed_packages(self, share: VMShare) -> list[tuple[str, Package]]:
        """The WINDOWs that pay what ``share``'s streams owe (see pay_owed), now counted as
        paid."""
        grants = [(s, s._recv.flush()) for s in share.owing]
        share.owing.clear()
        share.owed = 0
        return [(stream.vmid, stream._package(PackageType.WINDOW, encode_increment(grant)))
                for stream, grant in grants
                if grant and stream._charged and stream.state is not StreamState.RESET]

    def forget(self, stream: Stream) -> None:
        """Drop a finished stream from the table (idempotent)."""
        if self._streams.get(stream.key) is stream:
            del self._streams[stream.key]
        stream._release()

    def get(self, vmid: str, peer: int, stream_id: int) -> Stream | None:
        return self._streams.get((vmid, peer, stream_id))

    async def on_package(self, vmid: str, pkg: Package) -> None:
        """Deliver a DATA or WINDOW package to its stream.

        One for no open stream is dropped and counted; a peer breaking flow control or the
        VM's buffer cap gets the stream reset (counted, logged at most a few lines a minute).
        """
        stream = self._streams.get((vmid, pkg.entity, pkg.stream))
        if stream is None:
            if pkg.type is PackageType.WINDOW:
                # Credit for a stream this end finished: the peer paid what it owed (see
                # pay_owed) as our last bytes and EOF crossed it. Carries nothing; dropped.
                return
            # Never opened, or bytes still in flight after we reset or finished the stream.
            self.budget.count(vmid, Counter.UNKNOWN_STREAM)
            self._warn.log(logging.INFO, (vmid, Counter.UNKNOWN_STREAM),
                           "vm=%s stream=%d: %s for no open stream dropped", vmid, pkg.stream,
                           pkg.type.name)
            return
        try:
            reason = stream._on_package(pkg)
        except FlowControlError as exc:
            reason, counter = str(exc), Counter.CREDIT_RESETS
        except ProtocolError as exc:
            reason, counter = str(exc), Counter.BAD_PACKAGES
        else:
            if not reason:
                return
            counter = Counter.BUFFER_RESETS
        self.budget.count(vmid, counter)
        self._warn.warning((vmid, counter), "vm=%s stream=%d: %s; resetting the stream",
                           vmid, pkg.stream, reason)
        await stream.reset(reason)

    def drop_peer(self, vmid: str, entities: list[int], reason: str) -> int:
        """Abort every stream of a VM whose far end belongs to one of ``entities``."""
        lost = [s for s in self._streams.values() if s.vmid == vmid and s.peer in entities]
        for s in lost:
            s._abort(reason)
        return len(lost)

    def drop_vm(self, vmid: str, reason: str) -> int:
        """Abort every stream of a VM whose tunnel went down; returns how many."""
        lost = [s for s in self._streams.values() if s.vmid == vmid]
        for s in lost:
            s._abort(reason)
        return len(lost)
