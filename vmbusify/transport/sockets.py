"""``connect`` and ``listen`` for any address: dispatch to the module for its kind.

Both return asyncio streams (reader limit ``STREAM_LIMIT``) and raise only TransportError
(AddressError for a bad address string), whose message is one line naming the address.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from vmbusify.errors import TransportError
from vmbusify.transport._streams import (
    ClientConnected,
    Streams,
    timeout_error,
    transport_error,
)
from vmbusify.transport.address import Address, TransportKind, as_address
from vmbusify.transport.firecracker import connect_fc, listen_fc
from vmbusify.transport.hyperv import connect_hyperv, listen_hyperv
from vmbusify.transport.tcp import connect_tcp, listen_tcp
from vmbusify.transport.unix import connect_unix, listen_unix
from vmbusify.transport.vport import connect_vport, listen_vport
from vmbusify.transport.vsock import connect_vsock, listen_vsock

_Connector = Callable[[Any, float], Awaitable[Streams]]
_Listener = Callable[[Any, ClientConnected], Awaitable[asyncio.AbstractServer]]

_CONNECTORS: dict[TransportKind, _Connector] = {
    TransportKind.VSOCK: connect_vsock,
    TransportKind.HYPERV: connect_hyperv,
    TransportKind.FC: connect_fc,
    TransportKind.UNIX: connect_unix,
    TransportKind.TCP: connect_tcp,
    TransportKind.VPORT: connect_vport,
}
_LISTENERS: dict[TransportKind, _Listener] = {
    TransportKind.VSOCK: listen_vsock,
    TransportKind.HYPERV: listen_hyperv,
    TransportKind.FC: listen_fc,
    TransportKind.UNIX: listen_unix,
    TransportKind.TCP: listen_tcp,
    TransportKind.VPORT: listen_vport,
}


async def connect(address: Address | str, timeout: float) -> Streams:
    """Open a stream to ``address`` within ``timeout`` seconds.

    Raises TransportError (AddressError for a malformed string) with a one-line reason.
    """
    addr = as_address(address)
    try:
        return await _CONNECTORS[addr.kind](addr, timeout)
    except TransportError:
        raise
    except TimeoutError:  # a safety net: each kind reports its own timeouts
        raise timeout_error(addr, "connect", timeout) from None
    except OSError as exc:
        raise transport_error(addr, "connect", exc) from None


async def listen(address: Address | str, client_connected_cb: ClientConnected
                 ) -> asyncio.AbstractServer:
    """Listen on ``address``; ``client_connected_cb(reader, writer)`` runs per connection.

    The callback may be a plain function or a coroutine function, as with
    ``asyncio.start_server``. Raises TransportError with a one-line reason.
    """
    addr = as_address(address)
    try:
        return await _LISTENERS[addr.kind](addr, client_connected_cb)
    except TransportError:
        raise
    except OSError as exc:
        raise transport_error(addr, "listen", exc) from None
