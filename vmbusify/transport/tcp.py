"""TCP: for development and tests on loopback, never a way to reach a production VM."""

from __future__ import annotations

import asyncio
import errno

from vmbusify.transport._streams import (
    STREAM_LIMIT,
    ClientConnected,
    Streams,
    check_timeout,
    timeout_error,
    transport_error,
)
from vmbusify.transport.address import TcpAddress

_CONNECT_HINTS = {errno.ECONNREFUSED: "nothing listens there"}
_LISTEN_HINTS = {errno.EADDRINUSE: "the port is taken", errno.EACCES: "ports below 1024 need root"}


async def connect_tcp(address: TcpAddress, timeout: float) -> Streams:
    """Connect over TCP; TransportError on failure or after ``timeout`` seconds."""
    check_timeout(address, timeout)
    try:
        return await asyncio.wait_for(
            asyncio.open_connection(address.host, address.port, limit=STREAM_LIMIT), timeout)
    except TimeoutError:
        raise timeout_error(address, "connect", timeout) from None
    except OSError as exc:
        raise transport_error(address, "connect", exc,
                              _CONNECT_HINTS.get(exc.errno or 0, "")) from None


async def listen_tcp(address: TcpAddress, client_connected_cb: ClientConnected
                     ) -> asyncio.AbstractServer:
    """Listen over TCP on the address's host and port."""
    try:
        return await asyncio.start_server(client_connected_cb, address.host, address.port,
                                          limit=STREAM_LIMIT)
    except OSError as exc:
        raise transport_error(address, "listen", exc,
                              _LISTEN_HINTS.get(exc.errno or 0, "")) from None
