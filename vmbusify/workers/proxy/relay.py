"""Move bytes between a TCP connection and a tunnel stream, both ways, with half-close.

The connection is a protocol of the loop's own transport (``SocketEnd``): the loop calls it
when bytes arrive or its buffer drains, and the stream calls it when bytes arrive from the
far side (``Stream.on_readable``), so relaying needs no task per direction and no poll
handle per read or write (``loop.sock_recv``/``sock_sendall`` cost both, every time).

Socket EOF becomes the stream's EOF (PROXY-CLOSE, flag EOF) and the stream's EOF becomes
``shutdown(SHUT_WR)`` (once what is buffered has gone), so a client that shuts its write side
still gets the whole reply. A socket error resets the stream (flag RESET); a reset stream
closes the socket with an RST (SO_LINGER 0), so an abort reaches the far program as an abort.

Memory stays bounded whatever the user does: reading stops (``pause_reading``) while the
stream has no credit (or the VM no send budget) for what was read, and the stream is read
only while the transport's buffer is under its high-water mark (``pause_writing``); what
the far side sends meanwhile waits in the stream, within its credit window.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import cast

from vmbusify.bus.streams import Stream, StreamReset
from vmbusify.errors import VMBusifyError

log = logging.getLogger(__name__)

_LINGER_RST = struct.pack("ii", 1, 0)
#: Bytes asked of the kernel per read: big reads mean few packages per byte.
READ_SIZE = 1 << 20
#: What every connection reads into (the loop's callbacks run one at a time, and what a
#: read brings is copied out before the next): one buffer, not one per connection.
_READ_BUFFER = memoryview(bytearray(READ_SIZE))
#: Bytes a connection may hold before its relay starts (the handshake, what follows it
#: while the far side connects); reading stops past it. More than one maximal handshake.
PRE_RELAY_LIMIT = 64 << 10
#: Bytes asked of the kernel per read until then (the socket's buffer may hold megabytes a
#: user sent ahead: they stay in the kernel).
PRE_RELAY_READ = 16 << 10
#: The transport's write buffer: the stream is not read while more than WRITE_HIGH bytes
#: wait for the user (plus at most one chunk, MAX_CHUNK), and again once under WRITE_LOW.
WRITE_HIGH = 256 << 10
WRITE_LOW = 64 << 10


class SocketEnd(asyncio.BufferedProtocol):
    """One TCP connection of the proxy (a user's, or the one to a target).

    Before ``relay``: ``recv`` and ``send`` for the handshake (what arrives is buffered, at
    most PRE_RELAY_LIMIT). From ``relay`` on, bytes go between the transport and the stream
    in the loop's callbacks; a task runs only while a write waits for credit."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        #: Set once the connection is closed (connection_lost).
        self.closed: asyncio.Future[None] = loop.create_future()
        #: Why the relay ended early: a StreamReset, or the socket's or the link's error.
        self.error: BaseException | None = None
        self._buf = bytearray()
        self._eof = False
        self._lost: BaseException | None = None
        #: connection_lost came (``closed`` may be cancelled instead, with its waiter).
        self._gone = False
        self._waiter: asyncio.Future[None] | None = None
        self._stream: Stream | None = None
        self._reading_paused = False
        self._writing_paused = False
        #: Writes what the stream's credit refused (reading is paused meanwhile).
        self._up_task: asyncio.Task[None] | None = None
        self._up_done = False
        self._down_done = False

    # -- the transport's callbacks ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport: no isinstance check.
        # Its TCP transports set TCP_NODELAY themselves (interactive protocols such as ssh).
        self.transport = tr = cast(asyncio.Transport, transport)
        tr.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._stream is None or self._up_task is not None:
            return _READ_BUFFER[:PRE_RELAY_READ]  # what arrives now is held here: a little
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(_READ_BUFFER[:nbytes])
        if self._stream is None or self._up_task is not None:
            self._buf += data
            if len(self._buf) > PRE_RELAY_LIMIT:
                self._pause_reading()
            self._wake()
        elif self.error is None:
            self._up(data)

    def eof_received(self) -> bool:
        self._eof = True
        if self._stream is None:
            self._wake()
        elif self._up_task is None:
            self._up_eof()
        return True  # keep the transport: the other direction may go on

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc
        self._gone = True
        if exc is not None and self.error is None and self._stream is not None \
                and not (self._up_done and self._down_done):
            self.error = exc
        if self._up_task is not None:
            self._up_task.cancel()
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- before the relay ------------------------------------------------------------------
    async def recv(self) -> bytes:
        """What arrived since the last call (waiting for something); b"" at EOF or once
        closed. Raises OSError if the connection failed."""
        while not self._buf:
            if self._lost is not None:
                raise self._lost
            if self._eof or self._gone:
                return b""
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buf)
        self._buf.clear()
        if self._reading_paused:
            self._resume_reading()
        return data

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the user (the transport sends what the socket takes now)."""
        transport = self.transport
        if transport is not None and data and not self._gone and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        """Close once what is queued has been sent."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once with an RST instead of a FIN, dropping what is queued."""
        transport = self.transport
        if transport is None or self._gone:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        transport.abort()

    @property
    def peername(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("peername")[:2]
        return str(host), int(port)

    @property
    def sockname(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    # -- the relay -------------------------------------------------------------------------
    def start(self, stream: Stream) -> None:
        """Relay between the connection and ``stream`` from now on, starting with what the
        connection holds already."""
        self._stream = stream
        stream.on_readable = self._pump
        if self._gone:
            self.error = self.error or self._lost or ConnectionResetError("connection closed")
            return
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            self._up(data)
        if self._eof and self._up_task is None:
            self._up_eof()
        if self._reading_paused and self._up_task is None:
            self._resume_reading()
        self._pump()

    def stop(self) -> None:
        """The relay is over: the stream no longer calls this end."""
        if self._stream is not None:
            self._stream.on_readable = None
        if self._up_task is not None:
            self._up_task.cancel()

    def _up(self, data: bytes) -> None:
        """Bytes from the socket into the stream: now, or from a task that waits for credit
        while reading is paused."""
        assert self._stream is not None
        try:
            n = self._stream.write_nowait(data)
        except VMBusifyError as exc:
            self._fail(exc)
            return
        if n < len(data):
            self._pause_reading()
            self._up_task = self.loop.create_task(self._up_later(data[n:]))

    async def _up_later(self, rest: bytes) -> None:
        assert self._stream is not None
        try:
            await self._stream.write(rest)
            while self._buf:  # arrived as reading stopped
                data = bytes(self._buf)
                self._buf.clear()
                await self._stream.write(data)
        except VMBusifyError as exc:
            self._up_task = None
            self._fail(exc)
            return
        self._up_task = None
        if self._eof:
            self._up_eof()
        elif self._reading_paused:
            self._resume_reading()

    def _up_eof(self) -> None:
        assert self._stream is not None
        if self._up_done or self.error is not None:
            return
        try:
            self._stream.write_eof_nowait()
        except VMBusifyError as exc:
            self._fail(exc)
            return
        self._up_done = True
        self._finish_if_done()

    def _pump(self) -> None:
        """Bytes from the stream to the socket while the transport's buffer has room."""
        stream, transport = self._stream, self.transport
        if stream is None or transport is None or self._down_done or self.error is not None:
            return
        try:
            while not self._writing_paused:
                chunk = stream.read_nowait()
                if chunk is None:
                    return
                if not chunk:
                    self._down_done = True
                    if not transport.is_closing():
                        transport.write_eof()
                    self._finish_if_done()
                    return
                transport.write(chunk)
        except VMBusifyError as exc:
            self._fail(exc)

    def _finish_if_done(self) -> None:
        if self._up_done and self._down_done and self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        """End the relay early: the RST goes to the user, ``relay`` tells the stream."""
        if self.error is None:
            self.error = exc
        self.abort()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None \
                and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


async def relay(end: SocketEnd, stream: Stream, label: str) -> None:
    """Relay until both directions ended; always closes the connection. Never raises (but
    for cancellation, which resets the stream)."""
    end.start(stream)
    try:
        await end.closed
    except asyncio.CancelledError:
        end.stop()
        end.abort()
        await stream.reset("proxy stopping")
        raise
    end.stop()
    exc = end.error
    if exc is None:
        return
    if isinstance(exc, StreamReset):
        log.debug("%s: stream reset: %s", label, exc)
    else:
        log.debug("%s: socket error: %s", label, exc)
        await stream.reset(f"socket error: {exc}")
