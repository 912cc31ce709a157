"""Byte streams between two workers on the two ends of a tunnel, with credit windows.

A stream is identified on both ends by ``(vmid, peer entity, stream id)``; the opener picks
the id. The opener announces it with its own application REQUEST (PROXY-OPEN, EXEC-START...)
carrying the id in the package header; the acceptor calls ``StreamTable.accept``. After that
DATA packages carry bytes (flag EOF half-closes, flag RESET aborts) and WINDOW packages return
credit (see vmbusify.protocol.window).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from enum import Enum

from vmbusify.errors import FlowControlError, ProtocolError, VMBusifyError
from vmbusify.protocol.entities import entity_label
from vmbusify.protocol.package import Package, PackageFlag, PackageType, Payload
from vmbusify.protocol.window import (
    INITIAL_WINDOW,
    ReceiveWindow,
    SendWindow,
    decode_increment,
    encode_increment,
)

log = logging.getLogger(__name__)

StreamKey = tuple[str, int, int]  # (vmid, peer entity, stream id)
#: How a stream sends a package: (vmid, package) -> awaitable.
SendFn = Callable[[str, Package], Awaitable[None]]


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

    def __init__(self, table: StreamTable, vmid: str, local: int, peer: int, message_id: int,
                 stream_id: int) -> None:
        self._table = table
        self.vmid = vmid
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
        self._readable = asyncio.Event()
        self._credit = asyncio.Event()
        self._remote_eof = False
        self._local_eof = False

    @property
    def key(self) -> StreamKey:
        return (self.vmid, self.peer, self.id)

    def __repr__(self) -> str:
        return (f"<Stream vm={self.vmid} {entity_label(self.local)}->{entity_label(self.peer)}"
                f" id={self.id} {self.state.value}>")

    # -- sending ---------------------------------------------------------------------------
    def _package(self, ptype: PackageType, payload: Payload = b"",
                 flags: PackageFlag = PackageFlag.NONE) -> Package:
        return Package(ptype, self.local, self.message_id, 0, self.id, flags, payload)

    def _check_writable(self) -> None:
        if self.state is StreamState.RESET:
            raise StreamReset(self.reset_reason or "stream reset")
        if self._local_eof:
            raise StreamReset("write after EOF")

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send bytes, waiting for credit as needed; raises StreamReset if aborted."""
        view = memoryview(data)
        # Slices of immutable bytes go to ZeroMQ without a copy; anything mutable is copied,
        # since the caller may reuse its buffer before the bytes leave.
        immutable = isinstance(data, bytes)
        while view:
            self._check_writable()
            n = self._send.take(len(view))
            if n == 0:
                self._credit.clear()
                await self._credit.wait()
                continue
            chunk, view = (view[:n] if immutable else bytes(view[:n])), view[n:]
            self.bytes_out += n
            await self._table.send(self.vmid, self._package(PackageType.DATA, chunk))

    async def write_eof(self) -> None:
        """Half-close: tell the peer we send no more. Reading goes on."""
        if self._local_eof or self.state is StreamState.RESET:
            return
        self._local_eof = True
        await self._table.send(self.vmid, self._package(PackageType.DATA, flags=PackageFlag.EOF))
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
        chunk = self._chunks.popleft()
        grant = self._recv.on_consumed(len(chunk))
        if grant and self.state is not StreamState.RESET and not self._remote_eof:
            await self._table.send(
                self.vmid, self._package(PackageType.WINDOW, encode_increment(grant))
            )
        return chunk

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (never more than one window)."""
        return sum(len(c) for c in self._chunks)

    def _on_package(self, pkg: Package) -> None:
        if pkg.type is PackageType.WINDOW:
            self._send.grant(decode_increment(pkg.payload))
            self._credit.set()
            return
        if pkg.flags & PackageFlag.RESET:
            self._abort(bytes(pkg.payload).decode("utf-8", "replace") or "reset by peer")
            return
        if pkg.payload:
            if self._remote_eof:
                raise ProtocolError("DATA after EOF")
            self._recv.on_data(len(pkg.payload))
            self.bytes_in += len(pkg.payload)
            self._chunks.append(pkg.payload)
        if pkg.flags & PackageFlag.EOF:
            self._remote_eof = True
        self._readable.set()
        self._update_state()

    def _abort(self, reason: str) -> None:
        self.state = StreamState.RESET
        self.reset_reason = reason
        self._chunks.clear()
        self._readable.set()
        self._credit.set()
        self._table.forget(self)

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


class StreamTable:
    """Every open stream of one worker, and the id allocator for streams it opens."""

    def __init__(self, send: SendFn) -> None:
        self.send = send
        self._streams: dict[StreamKey, Stream] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._streams.values()))

    def open(self, vmid: str, local: int, peer: int, message_id: int) -> Stream:
        """A new stream this worker opens; announce it with a REQUEST carrying ``stream.id``."""
        while True:
            self._next_id = self._next_id % 0xFFFFFFFF + 1  # ids 1..2**32-1, 0 means none
            if (vmid, peer, self._next_id) not in self._streams:
                break
        return self._add(Stream(self, vmid, local, peer, message_id, self._next_id))

    def accept(self, vmid: str, local: int, request: Package, message_id: int) -> Stream:
        """The stream a peer's open REQUEST announced (its header carries the id)."""
        if request.stream == 0:
            raise ProtocolError("open request carries no stream id")
        key = (vmid, request.entity, request.stream)
        if key in self._streams:
            raise ProtocolError(f"stream {request.stream} is already open")
        return self._add(Stream(self, vmid, local, request.entity, message_id, request.stream))

    def _add(self, stream: Stream) -> Stream:
        self._streams[stream.key] = stream
        return stream

    def forget(self, stream: Stream) -> None:
        """Drop a finished stream from the table (idempotent)."""
        if self._streams.get(stream.key) is stream:
            del self._streams[stream.key]

    def get(self, vmid: str, peer: int, stream_id: int) -> Stream | None:
        return self._streams.get((vmid, peer, stream_id))

    async def on_package(self, vmid: str, pkg: Package) -> None:
        """Deliver a DATA or WINDOW package to its stream."""
        stream = self._streams.get((vmid, pkg.entity, pkg.stream))
        if stream is None:
            # Bytes still in flight after we reset or finished the stream: nothing to do.
            log.debug("vm=%s stream=%d: package for a closed stream dropped", vmid, pkg.stream)
            return
        try:
            stream._on_package(pkg)
        except (FlowControlError, ProtocolError) as exc:
            log.warning("vm=%s stream=%d: %s; resetting the stream", vmid, pkg.stream, exc)
            await stream.reset(str(exc))

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
