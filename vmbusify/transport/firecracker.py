"""Hybrid vsock (Firecracker, Cloud Hypervisor): vsock through the VMM's Unix socket.

Host-initiated: connect to the VMM's ``uds_path``, send ``CONNECT <port>\\n``, read
``OK <hostport>\\n``; after that the socket carries the guest's vsock stream. When the
guest's vsock driver is not up yet, or nothing listens on the port in the guest, the VMM
just closes the socket without a word, so a dropped handshake is retried with backoff
until the timeout.

Guest-initiated: the VMM connects to ``<uds_path>_<port>`` on the host, so listening on an
``fc:`` address means listening on that Unix socket.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re

from vmbusify.errors import TransportError
from vmbusify.transport._streams import (
    STREAM_LIMIT,
    ClientConnected,
    Streams,
    check_timeout,
    serve,
    timeout_error,
    transport_error,
)
from vmbusify.transport.address import UNIX_PATH_MAX, FirecrackerAddress
from vmbusify.transport.unix import bind_private

log = logging.getLogger(__name__)

#: First pause after a dropped handshake, and the cap the doubling stops at (seconds).
BACKOFF_INITIAL = 0.05
BACKOFF_MAX = 1.0
_REPLY_RE = re.compile(rb"OK ([0-9]{1,10})\n")
_REPLY_MAX = 64  # a real reply is at most 14 bytes

_CONNECT_HINTS = {
    errno.ENOENT: "no VMM socket there (is the VM running? is uds_path right?)",
    errno.ECONNREFUSED: "the VMM does not accept connections on that socket",
    errno.EACCES: "permission denied on the VMM socket or its directory",
}


class _Dropped(Exception):
    """The VMM closed the socket before answering CONNECT: worth another try."""


async def _read_reply(reader: asyncio.StreamReader, address: FirecrackerAddress) -> int:
    """Read the VMM's ``OK <hostport>`` line and return the host-side port."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise _Dropped from None
    except asyncio.LimitOverrunError:
        line = b"(an over-long line)"
    match = _REPLY_RE.fullmatch(line) if len(line) <= _REPLY_MAX else None
    if match is None:
        raise TransportError(
            f"{address}: connect failed: the VMM answered {line[:_REPLY_MAX]!r} to CONNECT, "
            "not 'OK <port>' (is this a hybrid vsock socket?)")
    return int(match.group(1))


async def _handshake(address: FirecrackerAddress) -> Streams:
    """One attempt: connect, send CONNECT, wait for OK. Raises _Dropped or OSError."""
    reader, writer = await asyncio.open_unix_connection(address.uds_path, limit=STREAM_LIMIT)
    try:
        writer.write(b"CONNECT %d\n" % address.port)
        await writer.drain()
        host_port = await _read_reply(reader, address)
    except BaseException:
        writer.close()
        raise
    log.debug("%s: connected (host-side port %d)", address, host_port)
    return reader, writer


async def connect_fc(address: FirecrackerAddress, timeout: float) -> Streams:
    """Connect to a guest vsock port through the VMM; retries dropped handshakes.

    TransportError at once if the VMM socket is missing or refuses, or if the VMM answers
    something other than ``OK``; after ``timeout`` seconds if the VMM keeps dropping us.
    """
    check_timeout(address, timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = BACKOFF_INITIAL
    drops = 0
    while True:
        remaining = deadline - loop.time()
        try:
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(_handshake(address), remaining)
        except (_Dropped, ConnectionResetError, BrokenPipeError):
            drops += 1
            log.debug("%s: the VMM dropped CONNECT (%d); retrying in %.2f s",
                      address, drops, delay)
        except TimeoutError as exc:
            if exc.errno is not None:
                raise transport_error(address, "connect", exc) from None
            if drops:
                hint = (f"the VMM closed the socket {drops} times: the guest's vsock driver "
                        f"is not up or nothing listens on vsock port {address.port} in it")
            else:
                hint = "the VMM never answered CONNECT"
            raise timeout_error(address, "connect", timeout, hint) from None
        except OSError as exc:
            raise transport_error(address, "connect", exc,
                                  _CONNECT_HINTS.get(exc.errno or 0, "")) from None
        await asyncio.sleep(min(delay, max(deadline - loop.time(), 0)))
        delay = min(delay * 2, BACKOFF_MAX)


async def listen_fc(address: FirecrackerAddress, client_connected_cb: ClientConnected
                    ) -> asyncio.AbstractServer:
    """Accept guest-initiated connections to ``address.port``: listen on ``<uds_path>_<port>``."""
    path = address.listen_path
    if len(path.encode()) > UNIX_PATH_MAX:
        raise transport_error(address, "listen",
                              hint=f"{path} is longer than {UNIX_PATH_MAX} bytes")
    sock = bind_private(path, address)
    try:
        return await serve(sock, client_connected_cb)
    except OSError as exc:
        raise transport_error(address, "listen", exc) from None
