"""Plain Unix stream sockets: private (mode 0600) listeners that clear stale socket files.

Firecracker's guest-initiated direction also listens on a Unix socket, so ``bind_private``
is shared with ``firecracker.py``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat

from vmbusify.transport._streams import (
    STREAM_LIMIT,
    ClientConnected,
    Streams,
    check_timeout,
    serve,
    timeout_error,
    transport_error,
)
from vmbusify.transport.address import UnixAddress

_BACKLOG = 64

_CONNECT_HINTS = {
    errno.ENOENT: "no such socket file (is the other end running?)",
    errno.ECONNREFUSED: "nothing listens on that socket",
    errno.EACCES: "permission denied on the socket or its directory",
}


def _in_use(path: str) -> bool:
    """True if something accepts connections on the Unix socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        err = probe.connect_ex(path)
    finally:
        probe.close()
    # EAGAIN: a live listener whose backlog is full. Anything else but a refusal: leave it.
    return err not in (errno.ECONNREFUSED, errno.ENOENT)


def remove_stale(path: str, shown: object) -> None:
    """Remove the socket file at ``path`` if no one listens on it.

    Refuses (TransportError) when ``path`` is something other than a socket, or a socket
    that a live process still listens on.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise transport_error(shown, "listen", exc) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise transport_error(shown, "listen",
                              hint=f"{path} exists and is not a socket; not removing it")
    if _in_use(path):
        raise transport_error(shown, "listen", hint=f"another process listens on {path}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise transport_error(shown, "listen", exc, f"cannot remove stale {path}") from None


def bind_private(path: str, shown: object) -> socket.socket:
    """A listening Unix socket at ``path`` with mode 0600, replacing a stale socket file."""
    remove_stale(path, shown)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux creates the socket file with the socket inode's mode (minus the umask), so
        # setting it before bind() leaves no moment where the file is open to others.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(path)
        os.chmod(path, 0o600)  # for platforms that ignore the fchmod above
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = "the directory does not exist" if exc.errno == errno.ENOENT else ""
        raise transport_error(shown, "listen", exc, hint) from None
    return sock


async def connect_unix(address: UnixAddress, timeout: float) -> Streams:
    """Connect to a Unix socket; TransportError on failure or after ``timeout`` seconds."""
    check_timeout(address, timeout)
    try:
        return await asyncio.wait_for(
            asyncio.open_unix_connection(address.path, limit=STREAM_LIMIT), timeout)
    except TimeoutError:
        raise timeout_error(address, "connect", timeout) from None
    except OSError as exc:
        hint = _CONNECT_HINTS.get(exc.errno or 0, "")
        raise transport_error(address, "connect", exc, hint) from None


async def listen_unix(address: UnixAddress, client_connected_cb: ClientConnected
                      ) -> asyncio.AbstractServer:
    """Listen on a private (0600) Unix socket; a stale socket file there is removed first."""
    sock = bind_private(address.path, address)
    try:
        return await serve(sock, client_connected_cb)
    except OSError as exc:
        raise transport_error(address, "listen", exc) from None

