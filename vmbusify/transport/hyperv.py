"""AF_HYPERV: a Windows host reaching a Linux guest over a Hyper-V socket.

Only Python 3.12+ on Windows has AF_HYPERV. asyncio's Proactor loop cannot connect such a
socket itself (it mishandles the address tuple and protocol), so the blocking connect runs
in a thread with HVSOCKET_CONNECT_TIMEOUT set, and the connected socket is then handed to
asyncio. The host only ever connects: the guest listens (hv_sock, ``vsock:any:PORT``).

Nothing here has run against a real Hyper-V host; the unit tests drive it with a fake socket.
"""

from __future__ import annotations

import asyncio
import errno
import socket

from vmbusify.errors import TransportError
from vmbusify.transport._streams import (
    ClientConnected,
    Streams,
    check_timeout,
    open_streams,
    timeout_error,
    transport_error,
)
from vmbusify.transport.address import HypervAddress

# hvsocket.h values, for reference when CPython does not export them.
HV_PROTOCOL_RAW = getattr(socket, "HV_PROTOCOL_RAW", 1)
HVSOCKET_CONNECT_TIMEOUT = getattr(socket, "HVSOCKET_CONNECT_TIMEOUT", 1)
HVSOCKET_CONNECT_TIMEOUT_MAX = getattr(socket, "HVSOCKET_CONNECT_TIMEOUT_MAX", 300000)
#: Extra time the asyncio guard waits beyond the socket's own connect timeout.
_GUARD_SLACK = 1.0

UNSUPPORTED = (
    "hyperv: addresses need a Windows host with AF_HYPERV (Python 3.12+ on Windows); "
    "a Linux guest on Hyper-V uses vsock addresses instead (hv_sock: listen on "
    "vsock:any:PORT, reach the host at vsock:host:PORT)")

_REFUSED_HINT = ("nothing listens on that port in the VM, the VM is off, or the port's "
                 "service GUID is not registered on the host (packaging/hyperv-register.ps1)")


def available() -> bool:
    """True if this Python can open AF_HYPERV sockets."""
    return hasattr(socket, "AF_HYPERV")


def _open_socket() -> socket.socket:
    """A new blocking AF_HYPERV stream socket (the tests replace this)."""
    # AF_HYPERV exists only on Windows builds (and stubs) of Python 3.12+.
    family = socket.AF_HYPERV  # type: ignore[attr-defined,unused-ignore]
    return socket.socket(family, socket.SOCK_STREAM, HV_PROTOCOL_RAW)


def _blocking_connect(sock: socket.socket, sockaddr: tuple[str, str], timeout: float) -> None:
    """Connect with the Hyper-V connect timeout set; runs in a worker thread."""
    millis = min(max(int(timeout * 1000), 1), HVSOCKET_CONNECT_TIMEOUT_MAX)
    sock.setsockopt(HV_PROTOCOL_RAW, HVSOCKET_CONNECT_TIMEOUT, millis)
    sock.connect(sockaddr)


def _hint(err: int | None) -> str:
    if err in (errno.ECONNREFUSED, errno.ECONNRESET):
        return _REFUSED_HINT
    if err == errno.ETIMEDOUT:
        return "the VM did not answer (is it running, with hv_sock loaded in the guest?)"
    return ""


async def connect_hyperv(address: HypervAddress, timeout: float) -> Streams:
    """Connect to ``(vmid, service_id)``; TransportError on failure or after ``timeout`` s."""
    check_timeout(address, timeout)
    if not available():
        raise TransportError(f"{address}: {UNSUPPORTED}")
    try:
        sock = _open_socket()
    except OSError as exc:
        raise transport_error(address, "connect", exc) from None
    try:
        await asyncio.wait_for(
            asyncio.to_thread(_blocking_connect, sock, address.sockaddr, timeout),
            timeout + _GUARD_SLACK)
        sock.setblocking(False)
    except TimeoutError:
        # Closing the socket also ends a connect still blocked in the thread.
        sock.close()
        raise timeout_error(address, "connect", timeout, _hint(errno.ETIMEDOUT)) from None
    except OSError as exc:
        sock.close()
        raise transport_error(address, "connect", exc, _hint(exc.errno)) from None
    except BaseException:
        sock.close()
        raise
    try:
        return await open_streams(sock)
    except OSError as exc:
        raise transport_error(address, "connect", exc) from None


async def listen_hyperv(address: HypervAddress, client_connected_cb: ClientConnected
                        ) -> asyncio.AbstractServer:
    """Always a TransportError: the Windows host connects, the Linux guest listens."""
    if not available():
        raise TransportError(f"{address}: {UNSUPPORTED}")
    raise TransportError(
        f"{address}: listening on hyperv: addresses is not supported; the host connects "
        "and the guest listens on vsock:any:PORT")
