"""Connecting to the command listener without handing the token to an impostor.

Before a client sends the token it checks who it is talking to:

* a Unix listener (``unix:/dir/control.sock``, the default): ``dir`` is a directory (not a
  link) owned by a trusted uid and writable by nobody else (no group or other write bit),
  the socket is a socket owned by a trusted uid, and the process that accepted the
  connection (SO_PEERCRED) runs as a trusted uid;
* a TCP listener (development only): the socket at the other end of this very connection
  (users/peer.py) is owned by a trusted uid.

Trusted uids: root, the user running the client, and the owner of the token file read (the
token only ever goes back to whoever could read it anyway). Anything else is refused with a
one-line reason and nothing is sent. Light on purpose: ``vmbusifyexec`` imports it.
"""

from __future__ import annotations

import os
import stat
import struct
from _socket import AF_UNIX, IPPROTO_TCP, SO_PEERCRED, SOCK_STREAM, SOL_SOCKET, TCP_NODELAY
from _socket import socket as raw_socket

from vmbusify.control.token import ListenerDown
from vmbusify.errors import ControlError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import TypeVar

    #: The socket class a connection is made of: socket.socket, or the C type under it
    #: (``_socket.socket``), which vmbusifyexec uses: the socket module's import (enum
    #: classes, selectors) is ~3 ms of its start.
    S = TypeVar("S", bound=raw_socket)

#: How long a TCP client waits for the listener to accept the connection (until then the
#: kernel cannot tell whose socket it is).
ACCEPT_WAIT = 2.0
_REFUSE = "refusing to send the control token to"


def trusted_uids(token_owner: int) -> frozenset[int]:
    """The uids a client may send the token to."""
    return frozenset((0, os.geteuid(), token_owner))


def describe(kind: str, where: str, port: int) -> str:
    """The listener's address as the config says it."""
    return f"unix:{where}" if kind == "unix" else f"{where}:{port}"


def _owner(uid: int) -> str:
    return "root" if uid == 0 else f"uid {uid}"


def check_unix_path(path: str, trusted: frozenset[int]) -> None:
    """The checks on a Unix listener's directory and socket file; ControlError if one fails."""
    where = os.path.dirname(path) or "."
    try:
        dst = os.lstat(where)
        sst = os.lstat(path)
    except FileNotFoundError:
        raise ListenerDown(f"the command listener at unix:{path} is not running") from None
    except PermissionError:
        raise ControlError(f"cannot reach the command listener at unix:{path}: permission "
                           "denied (run as root or as a member of group vmbusify)") from None
    if not stat.S_ISDIR(dst.st_mode):
        raise ControlError(f"{_REFUSE} unix:{path}: {where} is not a directory")
    if dst.st_uid not in trusted:
        raise ControlError(f"{_REFUSE} unix:{path}: its directory {where} is owned by "
                           f"{_owner(dst.st_uid)}, not root")
    if dst.st_mode & 0o022:
        raise ControlError(f"{_REFUSE} unix:{path}: its directory {where} is writable by "
                           f"others (mode {stat.S_IMODE(dst.st_mode):04o})")
    if not stat.S_ISSOCK(sst.st_mode):
        raise ControlError(f"{_REFUSE} unix:{path}: it is not a socket")
    if sst.st_uid not in trusted:
        raise ControlError(f"{_REFUSE} unix:{path}: the socket is owned by "
                           f"{_owner(sst.st_uid)}, not root")


def connect_unix_socket(path: str, timeout: float) -> socket.socket:
    """A connected Unix stream socket (with ``timeout`` set), waiting out a full backlog
    (``connect_unix_as`` of socket.socket)."""
    import socket

    return connect_unix_as(socket.socket, path, timeout)


def connect_unix_as(new: type[S], path: str, timeout: float) -> S:
    """A connected Unix stream socket of class ``new`` (with ``timeout`` set), waiting out a
    full backlog.

    A Unix connect with a timeout is non-blocking underneath, and Linux answers it with EAGAIN
    at once while the listener's accept queue is full (a burst of clients, a busy listener),
    instead of waiting as a TCP connect does: retried here until ``timeout`` runs out.
    OSError as connect() raises it.
    """
    import time  # here: the common case never waits

    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        sock = new(AF_UNIX, SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            if time.monotonic() + pause >= deadline:
                raise TimeoutError(f"{path}: the listener's backlog stayed full for "
                                   f"{timeout:g}s") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            continue
        except BaseException:
            sock.close()
            raise
        return sock


def _connect_unix(new: type[S], path: str, trusted: frozenset[int], timeout: float) -> S:
    check_unix_path(path, trusted)
    try:
        sock = connect_unix_as(new, path, timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        raise ListenerDown(f"the command listener at unix:{path} is not running") from None
    except PermissionError:
        raise ControlError(f"cannot reach the command listener at unix:{path}: permission "
                           "denied (run as root or as a member of group vmbusify)") from None
    except OSError as exc:
        raise ControlError(f"cannot reach the command listener at unix:{path}: "
                           f"{exc.strerror or exc}") from None
    # SO_PEERCRED (users/peer.py's unix_peer_uid; that module loads for TCP only)
    uid = struct.unpack("3i", sock.getsockopt(SOL_SOCKET, SO_PEERCRED, 12))[1]
    if uid not in trusted:
        sock.close()
        raise ControlError(f"{_REFUSE} unix:{path}: the process listening there runs as "
                           f"{_owner(uid)}, not root")
    return sock


def _connect_tcp(host: str, port: int, trusted: frozenset[int], timeout: float
                 ) -> socket.socket:
    import socket
    import time

    # Imported here: only a TCP listener (development only) needs it, and vmbusifyexec's
    # start is its latency (docs/exec.md, "A light client").
    from vmbusify.users.peer import TCP_ESTABLISHED, tcp_peer
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise ListenerDown(f"the command listener at {host}:{port} is not running") from None
    except OSError as exc:
        raise ControlError(f"cannot reach the command listener at {host}:{port}: "
                           f"{exc.strerror or exc}") from None
    # The socket that took this connection is the listener's own (its uid is the
    # listener's) once the handshake is through; until then (SYN_RECV) nobody's uid shows.
    deadline = time.monotonic() + ACCEPT_WAIT
    while True:
        try:
            peer = tcp_peer(sock)
        except OSError:
            peer = None
        if peer is not None and peer.state == TCP_ESTABLISHED:
            break
        if time.monotonic() > deadline:
            sock.close()
            raise ControlError(f"{_REFUSE} {host}:{port}: cannot tell which user listens "
                               "there (not a local socket?)")
        time.sleep(0.002)
    if peer.uid not in trusted:
        sock.close()
        raise ControlError(f"{_REFUSE} {host}:{port}: the port is held by {_owner(peer.uid)}"
                           ", not root (someone else bound it; use a unix: listener)")
    return sock


def connect_verified(kind: str, where: str, port: int, token_owner: int,
                     timeout: float = 10.0) -> socket.socket:
    """A connected socket to the command listener, checked as the module says; ControlError
    with a one-line reason otherwise (nothing has been sent)."""
    import socket

    return connect_verified_as(socket.socket, kind, where, port, token_owner, timeout)


def connect_verified_as(new: type[S], kind: str, where: str, port: int, token_owner: int,
                        timeout: float = 10.0) -> S:
    """``connect_verified`` with a socket of class ``new`` (socket.socket or the C type
    under it, ``_socket.socket``, which needs no import of the socket module)."""
    trusted = trusted_uids(token_owner)
    if kind == "unix":
        return _connect_unix(new, where, trusted, timeout)
    tcp = _connect_tcp(where, port, trusted, timeout)
    tcp.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
    if type(tcp) is new:
        return tcp  # type: ignore[return-value]  # socket.socket asked for, and made
    sock = new(fileno=tcp.detach())
    sock.settimeout(timeout)
    return sock
