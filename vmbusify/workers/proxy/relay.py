"""Move bytes between a TCP socket and a tunnel stream, both ways, with half-close.

Each direction is one task. Socket EOF becomes the stream's EOF (PROXY-CLOSE, flag EOF) and
the stream's EOF becomes ``shutdown(SHUT_WR)``, so a client that shuts its write side still
gets the whole reply. A socket error resets the stream (flag RESET); a reset stream closes
the socket with an RST (SO_LINGER 0), so an abort reaches the far program as an abort.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

from vmbusify.bus.streams import Stream, StreamReset

log = logging.getLogger(__name__)

#: Bytes asked of the kernel per read: big reads mean few packages per byte.
READ_SIZE = 1 << 20
_LINGER_RST = struct.pack("ii", 1, 0)


def tune(sock: socket.socket) -> None:
    """Non-blocking, no Nagle delay (interactive protocols such as ssh go through)."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def abort_socket(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    sock.close()


async def _sock_to_stream(sock: socket.socket, stream: Stream) -> None:
    loop = asyncio.get_running_loop()
    while True:
        data = await loop.sock_recv(sock, READ_SIZE)
        if not data:
            await stream.write_eof()
            return
        await stream.write(data)


async def _stream_to_sock(sock: socket.socket, stream: Stream) -> None:
    loop = asyncio.get_running_loop()
    while True:
        data = await stream.read()
        if not data:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        await loop.sock_sendall(sock, data)


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()


async def relay(sock: socket.socket, stream: Stream, label: str) -> None:
    """Relay until both directions ended; always closes ``sock``. Never raises."""
    up = asyncio.ensure_future(_sock_to_stream(sock, stream))
    down = asyncio.ensure_future(_stream_to_sock(sock, stream))
    for task in (up, down):  # an exception left behind when relay() is cancelled: seen here
        task.add_done_callback(_retrieve)
    aborted = False
    try:
        pending = {up, down}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # Both directions may end in the same turn (a reset fails both): retrieve every
            # exception, or asyncio logs "Task exception was never retrieved" with a traceback.
            errors = [exc for exc in (task.exception() for task in done) if exc is not None]
            if not errors:
                continue
            aborted = True
            exc = errors[0]
            if isinstance(exc, StreamReset):
                log.debug("%s: stream reset: %s", label, exc)
            else:
                log.debug("%s: socket error: %s", label, exc)
                await stream.reset(f"socket error: {exc}")
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            pending = set()
    except asyncio.CancelledError:
        aborted = True
        for t in (up, down):
            t.cancel()
        await stream.reset("proxy stopping")
        raise
    finally:
        if aborted:
            abort_socket(sock)
        else:
            sock.close()
