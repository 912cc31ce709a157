"""Glue shared by every socket kind: asyncio streams on a raw socket, and error wording.

Each kind module opens its socket its own way, then hands it to ``open_streams`` (a
connected socket) or ``serve`` (a listening socket). Failures become ``TransportError``
through ``transport_error``, so a user sees one line naming the address, never a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Awaitable, Callable

from vmbusify.errors import TransportError

#: StreamReader buffer limit: large enough that a caller can ``await reader.read(1 << 20)``
#: and a 1 MiB package plus its header fits in one readexactly().
STREAM_LIMIT = 4 << 20

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


def reason(exc: OSError) -> str:
    """A short human reason for an OSError, with the errno name when there is one."""
    text = exc.strerror or str(exc) or type(exc).__name__
    name = errno.errorcode.get(exc.errno) if isinstance(exc.errno, int) else None
    text = f"{text} ({name})" if name else text
    return " ".join(text.split())  # one line, whatever the platform put in it


def transport_error(address: object, action: str, exc: OSError | None = None,
                    hint: str = "") -> TransportError:
    """Build the TransportError for ``action`` on ``address`` failing, on one line."""
    parts = [f"{address}: {action} failed"]
    if exc is not None:
        parts.append(reason(exc))
    if hint:
        parts.append(hint)
    return TransportError(": ".join(parts))


def timeout_error(address: object, action: str, timeout: float, hint: str = "") -> TransportError:
    """Build the TransportError for ``action`` on ``address`` taking longer than ``timeout``."""
    tail = f": {hint}" if hint else ""
    return TransportError(f"{address}: {action} timed out after {timeout:g} s{tail}")


def check_timeout(address: object, timeout: float) -> None:
    """Reject a timeout that is not a positive number (a programming error, reported plainly)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise TransportError(f"{address}: connect timeout must be > 0 s, not {timeout!r}")


async def connect_nonblocking(sock: socket.socket, sockaddr: object) -> None:
    """Connect a non-blocking socket, waiting for writability on the running loop.

    Done by hand rather than with ``loop.sock_connect`` because that resolves non-Unix
    addresses on some loops (uvloop), which AF_VSOCK tuples do not survive.
    """
    loop = asyncio.get_running_loop()
    err = sock.connect_ex(sockaddr)  # type: ignore[arg-type]
    if err == 0:
        return
    if err not in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
        raise OSError(err, os.strerror(err))
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def on_writable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, on_writable)
    try:
        await ready
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def open_streams(sock: socket.socket) -> Streams:
    """Wrap a connected socket in asyncio streams (the socket is closed if that fails)."""
    try:
        return await asyncio.open_connection(sock=sock, limit=STREAM_LIMIT)
    except BaseException:
        sock.close()
        raise


async def serve(sock: socket.socket, client_connected_cb: ClientConnected) -> asyncio.Server:
    """Start serving a bound, listening socket (the socket is closed if that fails)."""
    try:
        return await asyncio.start_server(client_connected_cb, sock=sock, limit=STREAM_LIMIT)
    except BaseException:
        sock.close()
        raise


def take_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
              protocol: asyncio.BaseProtocol) -> tuple[bytes, bool]:
    """Hand the transport under ``reader``/``writer`` to ``protocol`` (e.g. a BufferedProtocol
    that reads into its own buffers); returns the bytes the StreamReader had received but
    nobody read yet, and whether it had already seen EOF. Both streams are dead afterwards,
    but keep a reference to the writer: a StreamWriter closes its transport when collected.

    asyncio has no public way to ask a StreamReader for its unread bytes; ``_buffer`` and
    ``_eof`` have been its attributes since asyncio began, and this is the one place that
    touches them.
    """
    transport = writer.transport
    transport.set_protocol(protocol)
    early = bytes(reader._buffer)  # type: ignore[attr-defined]
    reader._buffer.clear()  # type: ignore[attr-defined]
    eof = bool(reader._eof)  # type: ignore[attr-defined]
    if not eof and isinstance(transport, asyncio.ReadTransport) and not transport.is_reading():
        transport.resume_reading()  # the StreamReader may have paused it at its limit
    return early, eof
